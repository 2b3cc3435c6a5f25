"""3-D volumes -> per-slice DINOv3 features -> ``(C, D, H, W)`` TensorStore zarr arrays + metadata.

One call of :func:`extract_volume` produces, for volume index ``i`` in ``output_dir``::

    volume_{i:06d}_features.zarr   (C, D, H, W) float16  per-voxel features (C = embed dim)
    volume_{i:06d}_gt.zarr         (K, D, H, W) uint32   instance ids per class (0 = background)
    volume_{i:06d}_mask.zarr       (1, D, H, W) uint8    1 where the ground truth is defined
    volume_{i:06d}_metadata.json   written last, atomically: its presence marks the volume complete

Why this shape of pipeline: extraction is the slow, GPU-bound step and training on the cached
features must be I/O bound, so every volume is an independent, idempotent unit (resumable on a
cluster) whose completion marker is written only after every array write has been committed.

Inputs are listed in a manifest (YAML or CSV); each raw/label URI is a zarr v2/v3 array or OME-Zarr
multiscale group (level chosen by resolution), an N5 array or group, or a TIFF stack, on local disk
or ``s3://`` (TensorStore's S3 kvstore, optional endpoint override).  The crop for index ``i`` is
drawn with ``numpy.random.default_rng([seed, i])``, so the volume index is the seed of its crop.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPRESSIONS = ("none", "zstd", "blosc-lz4")
AXES_CHOICES = ("z", "zyx")
ARRAYS = ("features", "gt", "mask")
FEATURE_DTYPES = ("float16", "float32")
TIFF_SUFFIXES = (".tif", ".tiff")
#: Spatial chunk edge of every output array (the "64" in the default ``[C_chunk, 64, 64, 64]``).
DEFAULT_SPATIAL_CHUNK = 64
#: Feature channels per chunk by default: 16 x 64^3 float16 = 8 MiB, large enough for fast reads.
DEFAULT_CHANNEL_CHUNK = 16

#: The random-initialised backbone used when no model is given (runs offline, but features are noise).
TINY_MODEL = {"name": "vit_small_patch16_dinov3", "in_chans": 1, "patch_size": 8, "embed_dim": 32,
              "depth": 2, "num_heads": 2}


class RandomInitWarning(UserWarning):
    """The backbone has random weights: features are only good for testing the pipeline."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class S3Options:
    """How ``s3://`` URIs are opened (TensorStore S3 kvstore)."""

    endpoint: str | None = None
    region: str = "us-east-1"
    anonymous: bool = False


@dataclass
class ModelSpec:
    """Which backbone to run: a dinocell export/run folder, a timm name (+ official weights), or none.

    With nothing set, a tiny random-initialised ViT is used (with a :class:`RandomInitWarning`).
    ``seed`` makes random initialisation identical on every worker of a cluster run.
    """

    backbone: str | None = None
    model_name: str | None = None
    weights: str | None = None
    seed: int = 0


@dataclass
class ExtractionConfig:
    """Everything that defines how volume ``i`` is extracted (saved in each volume's metadata)."""

    output_dir: str
    manifest: str | None = None  # None: the embedded synthetic dataset (generated under output_dir)
    base_resolution: list[float] | None = None  # nm (z, y, x); None: the raw array's finest level
    output_image_dim: int = 128
    min_label_fraction: float = 0.0
    min_unique_ids: int = 0
    min_ground_truth_fraction: float = 0.0
    max_tries: int = 100
    seed: int = 0
    axes: str = "z"  # "z": slices along z; "zyx": slices along all three axes, features averaged
    batch_size: int = 32
    compression: str = "zstd"
    compression_level: int | None = None
    checksum: bool = True  # zstd frame checksum, or a crc32c codec for none/blosc-lz4
    chunks: list[int] | None = None  # [C_chunk, 64, 64, 64] by default
    feature_dtype: str = "float16"
    device: str | None = None  # None: cuda if available (and gpu is not False), else cpu
    gpu: bool | None = None
    num_threads: int | None = None  # torch intra-op threads per volume
    model: ModelSpec = field(default_factory=ModelSpec)
    s3: S3Options = field(default_factory=S3Options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractionConfig:
        data = dict(data)
        model = ModelSpec(**data.pop("model", {}) or {})
        s3 = S3Options(**data.pop("s3", {}) or {})
        return cls(model=model, s3=s3, **data)

    def validate(self) -> None:
        """One-line ConfigErrors for values that would only fail deep inside a cluster job."""
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"--compression must be one of {', '.join(COMPRESSIONS)}; got '{self.compression}'")
        if self.axes not in AXES_CHOICES:
            raise ConfigError(f"--axes must be one of {', '.join(AXES_CHOICES)}; got '{self.axes}'")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}")
        if self.output_image_dim < 8:
            raise ConfigError(f"--output-image-dim must be >= 8; got {self.output_image_dim}")
        if self.chunks is not None and (len(self.chunks) != 4 or min(self.chunks) < 1):
            raise ConfigError(f"--chunks needs 4 positive integers (C, D, H, W); got {self.chunks}")
        if self.base_resolution is not None:
            if len(self.base_resolution) not in (1, 3) or min(self.base_resolution) <= 0:
                raise ConfigError("--base-resolution needs 1 or 3 positive numbers (nm)")
        for name in ("min_label_fraction", "min_ground_truth_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1]; got {v}")
        if self.batch_size < 1 or self.max_tries < 1:
            raise ConfigError("--batch-size and --max-tries must be >= 1")


def _base_resolution(cfg: ExtractionConfig) -> np.ndarray | None:
    if cfg.base_resolution is None:
        return None
    r = np.asarray(cfg.base_resolution, float)
    return np.repeat(r, 3) if r.size == 1 else r


# --------------------------------------------------------------------------------------------------
# Opening arrays: zarr v2/v3 (OME-Zarr multiscale), N5, TIFF; local or s3://
# --------------------------------------------------------------------------------------------------


def kvstore_spec(uri: str, s3: S3Options | None = None) -> dict[str, Any]:
    """TensorStore kvstore spec for a local path, ``file://`` URI or ``s3://bucket/key`` URI."""
    s3 = s3 or S3Options()
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise DataError(f"bad s3 URI (no bucket): {uri}")
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "aws_region": s3.region,
                                "path": key.strip("/") + "/" if key.strip("/") else ""}
        if s3.endpoint:
            spec["endpoint"] = s3.endpoint
        if s3.anonymous:
            spec["aws_credentials"] = {"type": "anonymous"}
        return spec
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise DataError(f"unsupported URI scheme in {uri} (use a local path, file:// or s3://)")
    return {"driver": "file", "path": str(Path(uri).absolute()) + "/"}


def _join(uri: str, child: str) -> str:
    return uri.rstrip("/") + "/" + child.strip("/")


def _read_key(uri: str, key: str, s3: S3Options | None) -> bytes | None:
    """Bytes of ``uri/key`` or None when it does not exist."""
    import tensorstore as ts

    try:
        kv = ts.KvStore.open(kvstore_spec(uri, s3)).result()
        res = kv.read(key).result()
    except Exception as e:  # network errors, permission errors: one line for the user
        raise DataError(f"cannot read {_join(uri, key)}: {str(e).splitlines()[0]}") from None
    if res.state != "value":
        return None
    return bytes(res.value)


def _read_json(uri: str, key: str, s3: S3Options | None) -> dict[str, Any] | None:
    raw = _read_key(uri, key, s3)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise DataError(f"{_join(uri, key)} is not valid JSON") from None


@dataclass
class VolumeArray:
    """A 3-D (z, y, x) array with its physical grid: voxel ``i`` covers ``[t + i*s, t + (i+1)*s)`` nm."""

    uri: str
    data: Any  # tensorstore.TensorStore (already viewed as z, y, x) or numpy array
    scale: np.ndarray
    translation: np.ndarray
    level: str | None = None
    fmt: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        d = self.data.dtype
        return np.dtype(d.numpy_dtype if hasattr(d, "numpy_dtype") else d)

    def read_box(self, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """Index box ``[lo, hi)``; parts outside the array are zero (background / no data)."""
        lo = np.asarray(lo, int)
        hi = np.asarray(hi, int)
        out = np.zeros(np.maximum(hi - lo, 0), self.dtype)
        clo = np.clip(lo, 0, self.shape)
        chi = np.clip(hi, 0, self.shape)
        if np.any(chi <= clo):
            return out
        src = tuple(slice(a, b) for a, b in zip(clo, chi, strict=True))
        block = self.data[src]
        if not isinstance(block, np.ndarray):
            try:
                block = block.read().result()
            except Exception as e:
                raise DataError(f"cannot read {self.uri}: {str(e).splitlines()[0]}") from None
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(clo, chi, lo, strict=True))
        out[dst] = block
        return out


_UNIT_TO_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1000.0, "um": 1000.0, "µm": 1000.0,
               "angstrom": 0.1, "millimeter": 1e6, "mm": 1e6, "": 1.0, None: 1.0}


def _spatial_axes(axes: Any, ndim: int) -> tuple[list[int], float]:
    """Indices of the z, y, x axes in an OME ``axes`` list and the unit factor to nm."""
    if not axes:
        if ndim < 3:
            raise DataError(f"array has {ndim} dimensions; need 3 (z, y, x)")
        return list(range(ndim - 3, ndim)), 1.0
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    idx = []
    for name in ("z", "y", "x"):
        if name not in names:
            raise DataError(f"multiscale axes {names} lack '{name}'")
        idx.append(names.index(name))
    unit = units[idx[-1]]
    if unit not in _UNIT_TO_NM:
        raise DataError(f"unknown spatial unit '{unit}'")
    return idx, _UNIT_TO_NM[unit]


def _ome_levels(ms: dict[str, Any], ndim_hint: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(path, scale zyx nm, translation zyx nm) per dataset of an OME-Zarr / COSEM multiscale entry."""
    datasets = ms.get("datasets") or []
    if not datasets:
        raise DataError("multiscale metadata has no datasets")
    levels = []
    for ds in datasets:
        path = ds["path"]
        if "coordinateTransformations" in ds:
            axes = ms.get("axes")
            ndim = len(axes) if axes else (ndim_hint or 3)
            idx, factor = _spatial_axes(axes, ndim)
            scale = np.ones(ndim)
            trans = np.zeros(ndim)
            for tf in list(ds["coordinateTransformations"]) + list(ms.get("coordinateTransformations") or []):
                if tf.get("type") == "scale" and "scale" in tf:
                    scale = scale * np.asarray(tf["scale"], float)
                elif tf.get("type") == "translation" and "translation" in tf:
                    trans = trans + np.asarray(tf["translation"], float)
            levels.append((path, scale[idx] * factor, trans[idx] * factor))
        elif "transform" in ds:  # COSEM-style N5 multiscales
            tf = ds["transform"]
            names = list(tf.get("axes") or ["z", "y", "x"])
            scale = np.asarray(tf.get("scale", [1, 1, 1]), float)
            trans = np.asarray(tf.get("translate", [0, 0, 0]), float)
            order = [names.index(a) for a in "zyx"]
            unit = (tf.get("units") or ["nm"])[order[-1]]
            factor = _UNIT_TO_NM.get(unit, 1.0)
            levels.append((path, scale[order] * factor, trans[order] * factor))
        else:
            levels.append((path, np.full(3, np.nan), np.zeros(3)))
    return levels


def choose_level(scales: Sequence[np.ndarray], target: np.ndarray | None) -> int:
    """Coarsest level that is still at least as fine as ``target`` (finest if all are coarser)."""
    vols = [float(np.prod(s)) for s in scales]
    if target is None:
        return int(np.argmin(vols))
    ok = [i for i, s in enumerate(scales) if np.all(s <= target * (1 + 1e-3))]
    if ok:
        return max(ok, key=lambda i: vols[i])
    return int(np.argmin(vols))


def _squeeze_leading(store: Any, uri: str) -> Any:
    """View an array with extra leading singleton axes (c, t) as 3-D."""
    nd = len(store.shape)
    if nd == 3:
        return store
    if nd < 3 or any(int(s) != 1 for s in store.shape[: nd - 3]):
        raise DataError(f"{uri} has shape {tuple(store.shape)}; need (z, y, x) with optional singleton axes")
    return store[(0,) * (nd - 3)]


def _open_ts(driver: str, uri: str, s3: S3Options | None, context: Any = None) -> Any:
    import tensorstore as ts

    spec = {"driver": driver, "kvstore": kvstore_spec(uri, s3)}
    try:
        return ts.open(spec, read=True, context=context).result()
    except Exception as e:
        raise DataError(f"cannot open {driver} array {uri}: {str(e).splitlines()[0]}") from None


def _n5_level_meta(attrs: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray, bool]:
    """(scale zyx, translation zyx, stored as xyz?) from an N5 dataset's attributes."""
    axes = attrs.get("axes")
    xyz = axes is None or [str(a).lower() for a in axes] == ["x", "y", "z"]
    res = attrs.get("pixelResolution")
    if isinstance(res, dict):
        res = res.get("dimensions")
    if res is None:
        res = attrs.get("resolution")
    off = attrs.get("offset")
    scale = np.asarray(res, float)[::-1] if res is not None and xyz else (
        np.asarray(res, float) if res is not None else None)
    trans = np.asarray(off, float)[::-1] if off is not None and xyz else (
        np.asarray(off, float) if off is not None else np.zeros(3))
    return scale, trans, xyz


def open_volume_array(uri: str, target: np.ndarray | None = None, s3: S3Options | None = None,
                      resolution: Sequence[float] | None = None, offset: Sequence[float] | None = None,
                      context: Any = None) -> VolumeArray:
    """Open ``uri`` as a (z, y, x) :class:`VolumeArray`, choosing the multiscale level for ``target`` nm.

    ``resolution``/``offset`` (nm) apply to arrays whose files carry no scale (TIFF, plain arrays);
    without them such arrays are assumed to be at ``target`` (or 1 nm) with offset 0.
    """
    default_scale = np.asarray(resolution, float) if resolution is not None else (
        target if target is not None else np.ones(3))
    default_trans = np.asarray(offset, float) if offset is not None else np.zeros(3)
    if uri.lower().endswith(TIFF_SUFFIXES):
        import tifffile

        try:
            if uri.startswith("s3://"):
                parent, _, key = uri.rpartition("/")
                raw = _read_key(parent, key, s3)
                if raw is None:
                    raise DataError(f"TIFF stack not found: {uri}")
                arr = tifffile.imread(io.BytesIO(raw))
            else:
                if not Path(uri).is_file():
                    raise DataError(f"TIFF stack not found: {uri}")
                arr = tifffile.imread(uri)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read TIFF stack {uri}: {e}") from None
        arr = np.asarray(arr)
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3:
            raise DataError(f"TIFF stack {uri} has shape {arr.shape}; need (z, y, x)")
        return VolumeArray(uri, arr, default_scale.copy(), default_trans.copy(), None, "tiff")

    zarr3 = _read_json(uri, "zarr.json", s3)
    if zarr3 is not None:
        if zarr3.get("node_type") == "array":
            store = _squeeze_leading(_open_ts("zarr3", uri, s3, context), uri)
            return VolumeArray(uri, store, default_scale.copy(), default_trans.copy(), None, "zarr3")
        attrs = zarr3.get("attributes") or {}
        ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
        return _open_multiscale(uri, ms, "zarr3", target, s3, context)
    zarray = _read_json(uri, ".zarray", s3)
    if zarray is not None:
        store = _squeeze_leading(_open_ts("zarr", uri, s3, context), uri)
        return VolumeArray(uri, store, default_scale.copy(), default_trans.copy(), None, "zarr2")
    zattrs = _read_json(uri, ".zattrs", s3)
    if zattrs is not None or _read_json(uri, ".zgroup", s3) is not None:
        return _open_multiscale(uri, (zattrs or {}).get("multiscales"), "zarr2", target, s3, context)
    n5 = _read_json(uri, "attributes.json", s3)
    if n5 is not None:
        if "dimensions" in n5:
            return _open_n5_level(uri, n5, None, default_scale, default_trans, s3, context)
        ms = n5.get("multiscales")
        if ms:
            return _open_multiscale(uri, ms, "n5", target, s3, context)
        # A plain N5 group of s0, s1, ... levels, each with pixelResolution.
        levels = []
        for k in range(16):
            attrs = _read_json(_join(uri, f"s{k}"), "attributes.json", s3)
            if attrs is None:
                break
            scale, trans, _ = _n5_level_meta(attrs)
            levels.append((f"s{k}", scale if scale is not None else default_scale * 2**k, trans))
        if not levels:
            raise DataError(f"N5 group {uri} has no datasets s0, s1, ...")
        i = choose_level([lv[1] for lv in levels], target)
        attrs = _read_json(_join(uri, levels[i][0]), "attributes.json", s3) or {}
        return _open_n5_level(_join(uri, levels[i][0]), attrs, levels[i][0], levels[i][1], levels[i][2],
                              s3, context)
    raise DataError(f"cannot open {uri}: no zarr.json, .zarray, .zattrs or attributes.json "
                    "(not a zarr/N5 array, OME-Zarr group or TIFF stack)")


def _open_n5_level(uri: str, attrs: dict[str, Any], level: str | None, scale: np.ndarray,
                   trans: np.ndarray, s3: S3Options | None, context: Any) -> VolumeArray:
    store = _open_ts("n5", uri, s3, context)
    meta_scale, meta_trans, xyz = _n5_level_meta(attrs)
    if xyz:
        store = store.T  # N5 lists dimensions x, y, z (fastest first)
    store = _squeeze_leading(store, uri) if len(store.shape) != 3 else store
    s = meta_scale if meta_scale is not None else scale
    t = meta_trans if "offset" in attrs else trans
    return VolumeArray(uri, store, np.asarray(s, float), np.asarray(t, float), level, "n5")


def _open_multiscale(uri: str, ms: Any, fmt: str, target: np.ndarray | None, s3: S3Options | None,
                     context: Any) -> VolumeArray:
    if not ms:
        raise DataError(f"{uri} is a group without multiscales metadata; point the manifest at an array "
                        "or an OME-Zarr multiscale group")
    levels = _ome_levels(ms[0] if isinstance(ms, list) else ms)
    if fmt == "n5":  # levels without transforms: read scale from each level's attributes
        fixed = []
        for path, scale, trans in levels:
            if np.isnan(scale).any():
                attrs = _read_json(_join(uri, path), "attributes.json", s3) or {}
                s, t, _ = _n5_level_meta(attrs)
                scale, trans = (s if s is not None else np.ones(3)), t
            fixed.append((path, scale, trans))
        levels = fixed
    i = choose_level([lv[1] for lv in levels], target)
    path, scale, trans = levels[i]
    level_uri = _join(uri, path)
    if fmt == "n5":
        attrs = _read_json(level_uri, "attributes.json", s3) or {}
        va = _open_n5_level(level_uri, attrs, path, scale, trans, s3, context)
        va.scale, va.translation = np.asarray(scale, float), np.asarray(trans, float)
        return va
    store = _squeeze_leading(_open_ts("zarr3" if fmt == "zarr3" else "zarr", level_uri, s3, context), level_uri)
    return VolumeArray(level_uri, store, np.asarray(scale, float), np.asarray(trans, float), path, fmt)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


@dataclass
class VolumeEntry:
    """One input volume: a raw array, optional per-class label arrays and an optional crop (nm)."""

    name: str
    raw: str
    labels: dict[str, str] = field(default_factory=dict)
    crop: list[float] | None = None  # [z0, y0, x0, z1, y1, x1] in nm: where samples and GT live
    dataset: str = ""
    resolution: list[float] | None = None  # nm, for arrays that carry no scale (TIFF, plain arrays)
    label_offsets: dict[str, list[float]] = field(default_factory=dict)  # nm, same purpose


def _resolve_uri(uri: str, base: Path) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    return str((base / uri).resolve())


def _numbers(value: Any, n: int | None, what: str) -> list[float] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(";", " ").replace(",", " ").replace("[", " ").replace("]", " ").split()]
    if isinstance(value, (int, float)):
        value = [value]
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"manifest {what} must be numbers; got {value!r}") from None
    if n is not None and len(out) not in ((n, 1) if n == 3 else (n,)):
        raise ConfigError(f"manifest {what} needs {n} numbers; got {len(out)}")
    return out * 3 if (n == 3 and len(out) == 1) else out


def _entry(d: dict[str, Any], i: int, base: Path) -> VolumeEntry:
    if not isinstance(d, dict):
        raise ConfigError(f"manifest volume #{i} must be a mapping")
    if not d.get("raw"):
        raise ConfigError(f"manifest volume #{i} ({d.get('name', '?')}) has no 'raw' URI")
    labels = d.get("labels") or {}
    if isinstance(labels, str):  # "mito=uri;er=uri"
        pairs = [p for p in labels.split(";") if p.strip()]
        try:
            labels = dict(p.split("=", 1) for p in pairs)
        except ValueError:
            raise ConfigError(f"manifest volume #{i}: labels must look like 'mito=uri;er=uri'") from None
    for k, v in d.items():  # CSV style: label_<class> columns
        if k.startswith("label_") and k != "label_offsets" and isinstance(v, str) and v.strip():
            labels[k[len("label_"):]] = v
    if not isinstance(labels, dict):
        raise ConfigError(f"manifest volume #{i}: 'labels' must map class names to URIs")
    crop = _numbers(d.get("crop"), 6, f"volume #{i} crop")
    if crop is not None and not all(crop[k] < crop[k + 3] for k in range(3)):
        raise ConfigError(f"manifest volume #{i} crop must be [z0, y0, x0, z1, y1, x1] with z0<z1 ...")
    offsets = {str(k): _numbers(v, 3, f"volume #{i} label_offsets.{k}") or [0.0] * 3
               for k, v in (d.get("label_offsets") or {}).items()}
    return VolumeEntry(
        name=str(d.get("name") or f"volume_{i}"),
        raw=_resolve_uri(str(d["raw"]).strip(), base),
        labels={str(k).strip(): _resolve_uri(str(v).strip(), base) for k, v in labels.items()},
        crop=crop, dataset=str(d.get("dataset") or ""),
        resolution=_numbers(d.get("resolution"), 3, f"volume #{i} resolution"),
        label_offsets=offsets)


def load_manifest(path: str | os.PathLike[str]) -> list[VolumeEntry]:
    """Read a YAML (``volumes: [...]``) or CSV manifest; relative paths are relative to its folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"manifest not found: {p}")
    base = p.parent
    if p.suffix.lower() == ".csv":
        import pandas as pd

        try:
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        except Exception as e:
            raise ConfigError(f"manifest {p} is not a readable CSV: {e}") from None
        rows = df.to_dict("records")
    else:
        import yaml

        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError:
            raise ConfigError(f"manifest {p} is not valid YAML") from None
        rows = data.get("volumes") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ConfigError(f"manifest {p} must hold a list of volumes (top-level 'volumes:' key)")
    entries = [_entry(r, i, base) for i, r in enumerate(rows)]
    if not entries:
        raise ConfigError(f"manifest {p} lists no volumes")
    return entries


# --------------------------------------------------------------------------------------------------
# Crop sampling
# --------------------------------------------------------------------------------------------------


@dataclass
class SampledCrop:
    """The accepted crop of one volume index, resampled onto the output grid."""

    entry: VolumeEntry
    entry_index: int
    origin_nm: np.ndarray
    resolution: np.ndarray
    raw: np.ndarray  # float32 (D, H, W) in [0, 1]
    gt: np.ndarray  # uint32 (K, D, H, W)
    mask: np.ndarray  # uint8 (1, D, H, W)
    classes: list[str]
    tries: int
    stats: dict[str, Any]
    raw_info: dict[str, Any]


def _nearest_indices(origin: float, step: float, n: int, trans: float, scale: float,
                     size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index of each output voxel centre along one axis, and whether it lies inside."""
    centres = origin + (np.arange(n) + 0.5) * step
    idx = np.floor((centres - trans) / scale).astype(np.int64)
    return idx, (idx >= 0) & (idx < size)


def sample_nearest(arr: VolumeArray, origin: np.ndarray, res: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resampling of ``arr`` onto an n^3 grid; returns (values, inside-mask)."""
    per_axis = [_nearest_indices(origin[a], res[a], n, arr.translation[a], arr.scale[a], arr.shape[a])
                for a in range(3)]
    out = np.zeros((n, n, n), arr.dtype)
    inside = np.zeros((n, n, n), bool)
    if not all(v.any() for _, v in per_axis):
        return out, inside
    lo = [int(idx[v].min()) for idx, v in per_axis]
    hi = [int(idx[v].max()) + 1 for idx, v in per_axis]
    block = arr.read_box(lo, hi)
    sel_out = np.ix_(*(np.flatnonzero(v) for _, v in per_axis))
    sel_src = np.ix_(*(idx[v] - lo[a] for a, (idx, v) in enumerate(per_axis)))
    out[sel_out] = block[sel_src]
    inside[sel_out] = True
    return out, inside


def _to_unit(a: np.ndarray) -> np.ndarray:
    """Raw intensities to float32 [0, 1] by dtype range (floats already in [0, 1] kept, else min-max)."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return ((a.astype(np.float64) - info.min) / (info.max - info.min)).astype(np.float32)
    a = a.astype(np.float32)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if lo >= 0.0 and hi <= 1.0:
        return np.nan_to_num(a)
    return np.nan_to_num((a - lo) / max(hi - lo, 1e-12))


def sample_raw(arr: VolumeArray, origin: np.ndarray, res: np.ndarray, n: int) -> np.ndarray:
    """Raw crop on the output grid in [0, 1]: a direct read when grids align, else trilinear."""
    start = (origin - arr.translation) / arr.scale
    ratio = res / arr.scale
    if np.allclose(ratio, 1.0, atol=1e-6) and np.allclose(start, np.round(start), atol=1e-6):
        lo = np.round(start).astype(int)
        return _to_unit(arr.read_box(lo, lo + n))
    import torch
    import torch.nn.functional as F

    # Continuous source coordinate of each output voxel centre (voxel i's centre sits at i + 0.5).
    coords = [start[a] + (np.arange(n) + 0.5) * ratio[a] - 0.5 for a in range(3)]
    lo = [int(np.floor(c.min())) for c in coords]
    hi = [int(np.floor(c.max())) + 2 for c in coords]
    block = torch.from_numpy(_to_unit(arr.read_box(lo, hi)))[None, None]
    sizes = [h - low for low, h in zip(lo, hi, strict=True)]
    norm = [torch.from_numpy(2.0 * (c - low) / max(s - 1, 1) - 1.0).float()
            for c, low, s in zip(coords, lo, sizes, strict=True)]
    gz, gy, gx = torch.meshgrid(*norm, indexing="ij")
    grid = torch.stack([gx, gy, gz], -1)[None]  # grid_sample wants (x, y, z) order
    out = F.grid_sample(block, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, 0].numpy().astype(np.float32)


def _relabel_if_needed(lab: np.ndarray) -> np.ndarray:
    """uint32 ids; ids that do not fit int32 (the loader's tensor type) are renumbered 1..n."""
    if lab.size and np.issubdtype(lab.dtype, np.integer) and int(lab.max()) >= 2**31:
        _, inv = np.unique(lab, return_inverse=True)
        zero_is_bg = (lab == 0).any()
        inv = inv.reshape(lab.shape) + (0 if zero_is_bg else 1)
        return inv.astype(np.uint32)
    return lab.astype(np.uint32)


def sample_crop(entries: Sequence[VolumeEntry], index: int, cfg: ExtractionConfig) -> SampledCrop:
    """Pick volume ``index % len(entries)`` and a random crop (seeded by ``index``) meeting the criteria."""
    entry_index = index % len(entries)
    entry = entries[entry_index]
    rng = np.random.default_rng([cfg.seed, index])
    target = _base_resolution(cfg)
    raw = open_volume_array(entry.raw, target, cfg.s3, entry.resolution)
    res = target if target is not None else raw.scale.copy()
    n = cfg.output_image_dim
    size_nm = n * res
    lo_nm = raw.translation
    hi_nm = raw.translation + np.asarray(raw.shape) * raw.scale
    if np.any(size_nm > hi_nm - lo_nm + 1e-6):
        raise DataError(f"volume {entry.name}: raw extent {np.round(hi_nm - lo_nm, 2).tolist()} nm is smaller "
                        f"than the output crop {n} voxels x {res.tolist()} nm; lower --output-image-dim")
    labels = {}
    for cls, uri in entry.labels.items():
        labels[cls] = open_volume_array(uri, res, cfg.s3, entry.resolution, entry.label_offsets.get(cls))
    classes = list(labels)

    # Region whose centre a crop must lie in: the manifest crop, else the labelled region, else all.
    if entry.crop is not None:
        roi_lo, roi_hi = np.asarray(entry.crop[:3]), np.asarray(entry.crop[3:])
    elif labels:
        roi_lo = np.min([a.translation for a in labels.values()], 0)
        roi_hi = np.max([a.translation + np.asarray(a.shape) * a.scale for a in labels.values()], 0)
    else:
        roi_lo, roi_hi = lo_nm, hi_nm
    # Crop origins on the output grid, counted in output voxels from the raw origin.
    k_min = np.ceil((np.maximum(lo_nm, roi_lo - size_nm / 2) - lo_nm) / res - 1e-9).astype(int)
    k_max = np.floor((np.minimum(hi_nm - size_nm, roi_hi - size_nm / 2) - lo_nm) / res + 1e-9).astype(int)
    k_min = np.maximum(k_min, 0)
    if np.any(k_max < k_min):
        raise DataError(f"volume {entry.name}: the crop/labelled region lies outside the raw volume")

    best: tuple[float, dict[str, Any]] | None = None
    for attempt in range(1, cfg.max_tries + 1):
        k = np.array([rng.integers(a, b + 1) for a, b in zip(k_min, k_max, strict=True)])
        origin = lo_nm + k * res
        gt = np.zeros((len(classes), n, n, n), np.uint32)
        valid = np.ones((n, n, n), bool)
        for c, cls in enumerate(classes):
            vals, inside = sample_nearest(labels[cls], origin, res, n)
            gt[c] = _relabel_if_needed(vals)
            valid &= inside
        if not classes:
            valid[:] = False
        if entry.crop is not None and classes:
            for a in range(3):
                centres = origin[a] + (np.arange(n) + 0.5) * res[a]
                keep = (centres >= roi_lo[a]) & (centres < roi_hi[a])
                shape = [1, 1, 1]
                shape[a] = n
                valid &= keep.reshape(shape)
        gt *= valid[None]
        fg = (gt > 0).any(0) if classes else np.zeros((n, n, n), bool)
        stats = {
            "label_fraction": float(fg.mean()),
            "valid_gt_fraction": float(valid.mean()),
            "unique_ids": int(sum(len(np.unique(g[g > 0])) for g in gt)),
        }
        ok = (stats["label_fraction"] >= cfg.min_label_fraction
              and stats["unique_ids"] >= cfg.min_unique_ids
              and stats["valid_gt_fraction"] >= cfg.min_ground_truth_fraction)
        if ok:
            raw_crop = sample_raw(raw, origin, res, n)
            stats["class_fractions"] = {cls: float((gt[c] > 0).mean()) for c, cls in enumerate(classes)}
            stats["class_unique_ids"] = {cls: int(len(np.unique(gt[c][gt[c] > 0]))) for c, cls in enumerate(classes)}
            return SampledCrop(
                entry=entry, entry_index=entry_index, origin_nm=origin, resolution=res, raw=raw_crop,
                gt=gt, mask=valid[None].astype(np.uint8), classes=classes, tries=attempt, stats=stats,
                raw_info={"uri": raw.uri, "level": raw.level, "format": raw.fmt,
                          "scale_nm": raw.scale.tolist(), "shape": list(raw.shape),
                          "origin_voxel": k.tolist()})
        score = stats["valid_gt_fraction"] + stats["label_fraction"]
        if best is None or score > best[0]:
            best = (score, stats)
    assert best is not None
    raise DataError(
        f"volume {entry.name} (index {index}): no crop met min_label_fraction={cfg.min_label_fraction}, "
        f"min_unique_ids={cfg.min_unique_ids}, min_ground_truth_fraction={cfg.min_ground_truth_fraction} "
        f"in {cfg.max_tries} tries (best: {best[1]})")


# --------------------------------------------------------------------------------------------------
# Backbone selection (shared with fields.py)
# --------------------------------------------------------------------------------------------------

_MODEL_CACHE: dict[str, tuple[Any, dict[str, Any]]] = {}
_MODEL_LOCK = threading.Lock()


def _match_backbone_state(state: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Find the prefix under which a checkpoint stores the backbone (teacher preferred)."""
    first = keys[0]
    prefixes = {k[: -len(first)] for k in state if k.endswith(first)}
    complete = [p for p in prefixes if all(p + k in state for k in keys)]
    if not complete:
        raise DataError("checkpoint holds no complete backbone state dict matching the run's model config")
    complete.sort(key=lambda p: (("teacher" not in p), ("student" in p), len(p)))
    p = complete[0]
    return {k: state[p + k] for k in keys}


def _load_from_run_folder(folder: Path, img_size: int) -> tuple[Any, dict[str, Any]]:
    exports = sorted(folder.glob("export/*.safetensors")) + sorted(folder.glob("*.safetensors"))
    if exports:
        from dinocell.models.backbone import load_backbone

        path = max(exports, key=lambda p: p.stat().st_mtime)
        return load_backbone(path), {"source": "export", "path": str(path)}
    ckpt = folder / "checkpoints" / "last.ckpt"
    cfg_path = folder / "config.yaml"
    if ckpt.is_file() and cfg_path.is_file():
        import torch
        import yaml

        from dinocell.config import config_from_dict
        from dinocell.models.backbone import build_backbone

        cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()) or {})
        cfg.model.pretrained = None
        model = build_backbone(cfg.model, img_size)
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        model.load_state_dict(_match_backbone_state(state, list(model.state_dict())))
        return model, {"source": "checkpoint", "path": str(ckpt)}
    raise DataError(f"run folder {folder} has neither export/*.safetensors nor checkpoints/last.ckpt + config.yaml")


def load_model(spec: ModelSpec, img_size: int = 224, device: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Build the backbone described by ``spec`` in eval mode; cached per process (cluster workers)."""
    key = json.dumps([dataclasses.asdict(spec), img_size, device], sort_keys=True)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
        import torch

        from dinocell.config import ModelConfig

        if spec.backbone:
            path = Path(spec.backbone)
            if path.is_dir():
                model, info = _load_from_run_folder(path, img_size)
            elif path.is_file():
                from dinocell.models.backbone import load_backbone

                model, info = load_backbone(path), {"source": "export", "path": str(path)}
            else:
                raise DataError(f"--backbone not found: {path}")
        else:
            from dinocell.models.backbone import build_backbone

            if spec.model_name:
                mcfg = ModelConfig(name=spec.model_name, in_chans=1, pretrained=spec.weights)
                if spec.weights and not Path(spec.weights).is_file():
                    raise DataError(f"--weights not found: {spec.weights}")
            else:
                mcfg = ModelConfig(**TINY_MODEL)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                model = build_backbone(mcfg, img_size)
            info = {"source": "official" if spec.weights else "random-init", "path": spec.weights}
            if not spec.weights:
                what = f"'{spec.model_name}'" if spec.model_name else "a tiny ViT (embed 32, depth 2, patch 8)"
                warnings.warn(f"no --backbone/--weights given: using {what} with RANDOM weights "
                              f"(seed {spec.seed}); features only exercise the pipeline", RandomInitWarning,
                              stacklevel=2)
        dev = device or "cpu"
        model = model.to(dev).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        info.update({
            "name": getattr(model, "timm_name", spec.model_name or TINY_MODEL["name"]),
            "embed_dim": int(getattr(model, "embed_dim", 0)),
            "patch_size": int(getattr(model, "patch_size", 0) or 0),
            "n_blocks": int(getattr(model, "n_blocks", 0) or 0),
            "device": dev,
        })
        _MODEL_CACHE[key] = (model, info)
        return model, info


def resolve_device(cfg: ExtractionConfig) -> str:
    """cuda when available and not disabled with ``--no-gpu``; cpu otherwise."""
    if cfg.device:
        return cfg.device
    if cfg.gpu is False:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def bilinear_matrix(n_in: int, n_out: int) -> Any:
    """(n_out, n_in) matrix M with ``M @ v`` = 1-D bilinear resize of ``v`` (align_corners=False).

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear")``: output sample ``i`` reads
    source position ``(i + 0.5) * n_in / n_out - 0.5``, clamped at the borders.
    """
    import torch

    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1.0 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m.float()


def _slot(out: Any, axis: str, idx: int | slice) -> Any:
    """View of ``out`` (C, D, H, W) for slice(s) ``idx`` taken along ``axis``."""
    return out[:, idx] if axis == "z" else out[:, :, idx] if axis == "y" else out[:, :, :, idx]


def _store(dst: Any, up: Any, overwrite: bool) -> None:
    if overwrite:
        dst.copy_(up)  # one strided pass: layout + cast to float16
    else:
        dst += up


def compute_volume_features(raw: np.ndarray, model: Any, axes: str = "z", batch_size: int = 32,
                            out_dtype: str = "float16") -> np.ndarray:
    """Per-slice patch features upsampled (bilinear) to every voxel: (D, H, W) -> (C, D, H, W).

    ``axes="zyx"`` slices along all three axes and averages, which removes the stair-step along z
    that single-axis slicing leaves in anisotropic features (3x the compute).  Upsampling is done as
    two small matrix products (separable bilinear), which is faster than ``F.interpolate`` for the
    large channel counts of ViT features, and written straight into the float16 output.
    """
    import torch

    from dinocell.extract.encode import encode_features

    if axes not in AXES_CHOICES:
        raise ConfigError(f"axes must be one of {', '.join(AXES_CHOICES)}")
    patch = int(getattr(model, "patch_size", 1) or 1)
    if any(s % patch for s in raw.shape):
        raise ConfigError(f"volume sides {raw.shape} must be multiples of the patch size {patch} "
                          "(choose --output-image-dim accordingly)")
    device = next(model.parameters()).device
    vol = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    d, h, w = vol.shape
    tdtype = getattr(torch, out_dtype)
    out: torch.Tensor | None = None
    single = axes == "z"
    # Slices along z, y, x: permutation of the volume and of the upsampled batch back to (C, D, H, W).
    plans = {"z": ((0, 1, 2), (1, 0, 2, 3)), "y": ((1, 0, 2), (1, 2, 0, 3)), "x": ((2, 0, 1), (1, 2, 3, 0))}
    with torch.inference_mode():
        for axis in ("z",) if single else ("z", "y", "x"):
            perm, back = plans[axis]
            slices = vol.permute(*perm)
            n_slices, a, b = slices.shape
            mats: tuple[torch.Tensor, torch.Tensor] | None = None
            for s0 in range(0, n_slices, batch_size):
                s1 = min(s0 + batch_size, n_slices)
                x = slices[s0:s1, None].contiguous().to(device)
                feats = encode_features(model, x, pool="patch", batch_size=batch_size).float().to(device)
                c = feats.shape[1]
                if out is None:
                    out = (torch.empty if single else torch.zeros)((c, d, h, w),
                                                                   dtype=tdtype if single else torch.float32)
                if mats is None:
                    mats = (bilinear_matrix(feats.shape[2], a).to(device),
                            bilinear_matrix(feats.shape[3], b).to(device).T.contiguous())
                if device.type != "cpu":  # whole batch on the accelerator, cast before the transfer
                    up = (mats[0] @ feats @ mats[1]).permute(*back).to(out.dtype).cpu()
                    _store(_slot(out, axis, slice(s0, s1)), up, single)
                    continue
                # CPU: cache-sized pieces (~2 MB of float32 per product) so every upsampled value is
                # cast and stored while still in cache: ~3x faster than whole-batch products.
                cc = max(1, (1 << 19) // max(1, a * b))
                for j in range(s1 - s0):
                    for c0 in range(0, c, cc):
                        up = mats[0] @ feats[j, c0:c0 + cc] @ mats[1]  # (cc, a, b) = one slice's layout
                        _store(_slot(out[c0:c0 + cc], axis, s0 + j), up, single)
    assert out is not None
    if not single:
        out = (out / 3.0).to(tdtype)
    return out.numpy()


# --------------------------------------------------------------------------------------------------
# Writing (TensorStore zarr v3) and completion markers
# --------------------------------------------------------------------------------------------------


def volume_name(index: int) -> str:
    return f"volume_{int(index):06d}"


def volume_paths(output_dir: str | os.PathLike[str], index: int) -> dict[str, Path]:
    """Paths of one volume's arrays, metadata marker and error log."""
    out = Path(output_dir)
    name = volume_name(index)
    return {
        "features": out / f"{name}_features.zarr",
        "gt": out / f"{name}_gt.zarr",
        "mask": out / f"{name}_mask.zarr",
        "metadata": out / f"{name}_metadata.json",
        "error": out / "logs" / f"{name}.err",
    }


def codecs_for(compression: str, dtype: str, level: int | None = None, checksum: bool = True) -> list[dict[str, Any]]:
    """zarr v3 codec chain for ``none``, ``zstd`` or ``blosc-lz4`` (byte-shuffled by element size).

    ``checksum``: without one a flipped byte in a chunk can decode silently into wrong values (even
    through zstd), so ``check --verify`` could not see it.  zstd carries its own frame checksum (no
    measurable cost); the other chains get a ``crc32c`` codec (costs read speed on uncompressed data).
    """
    chain: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        # level 1: ~1.7x faster writes than 3 for ~5% more bytes on ViT features (the write, not the
        # model, is the bottleneck of a GPU extraction job)
        chain.append({"name": "zstd", "configuration": {"level": 1 if level is None else int(level),
                                                        "checksum": bool(checksum)}})
    elif compression == "blosc-lz4":
        chain.append({"name": "blosc", "configuration": {
            "cname": "lz4", "clevel": 5 if level is None else int(level), "shuffle": "shuffle",
            "typesize": np.dtype(dtype).itemsize, "blocksize": 0}})
    elif compression != "none":
        raise ConfigError(f"compression must be one of {', '.join(COMPRESSIONS)}; got '{compression}'")
    if checksum and compression != "zstd":
        chain.append({"name": "crc32c"})
    return chain


def array_spec(path: str | os.PathLike[str], shape: Sequence[int], dtype: str, chunks: Sequence[int],
               compression: str, level: int | None = None, checksum: bool = True) -> dict[str, Any]:
    """TensorStore spec creating a zarr v3 array; every chunk is stored (so ``check`` can count them)."""
    chunk_shape = [max(1, min(int(c), int(s))) for c, s in zip(chunks, shape, strict=True)]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "store_data_equal_to_fill_value": True,
        "metadata": {
            "shape": [int(s) for s in shape],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
            "chunk_key_encoding": {"name": "default"},
            "fill_value": 0,
            "codecs": codecs_for(compression, dtype, level, checksum),
        },
    }


def default_chunks(n_channels: int, cfg: ExtractionConfig) -> dict[str, list[int]]:
    """Chunk shapes per array: features ``[C_chunk, 64, 64, 64]``, gt all classes, mask 1."""
    if cfg.chunks is not None:
        c, d, h, w = (int(v) for v in cfg.chunks)
    else:
        c, d, h, w = DEFAULT_CHANNEL_CHUNK, DEFAULT_SPATIAL_CHUNK, DEFAULT_SPATIAL_CHUNK, DEFAULT_SPATIAL_CHUNK
    return {"features": [min(c, max(n_channels, 1)), d, h, w], "gt": [64, d, h, w], "mask": [1, d, h, w]}


def expected_chunks(shape: Sequence[int], chunks: Sequence[int]) -> int:
    """Number of chunk files a fully written array has."""
    n = 1
    for s, c in zip(shape, chunks, strict=True):
        c = max(1, min(int(c), int(s))) if s else 1
        n *= math.ceil(int(s) / c) if s else 0
    return n


def count_chunk_files(array_path: str | os.PathLike[str]) -> int:
    """Chunk files present under a local zarr v3 array (default key encoding: ``c/i/j/k/l``)."""
    root = Path(array_path) / "c"
    if not root.is_dir():
        return 0
    return sum(len(files) for _, _, files in os.walk(root))


def dir_size_bytes(path: str | os.PathLike[str]) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write JSON to a temp name, fsync, then ``os.replace``: readers never see a partial file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def read_metadata(output_dir: str | os.PathLike[str], index: int) -> dict[str, Any] | None:
    """A volume's metadata, or None when missing or unreadable."""
    p = volume_paths(output_dir, index)["metadata"]
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def quick_verify(output_dir: str | os.PathLike[str], index: int,
                 metadata: dict[str, Any] | None = None) -> list[str]:
    """Cheap completeness check (no chunk reads): metadata sane, arrays' shapes and chunk counts match.

    Empty list = complete.  Used by the runner to skip finished volumes and by ``check``.
    """
    meta = metadata if metadata is not None else read_metadata(output_dir, index)
    if meta is None:
        return ["metadata missing or unreadable"]
    problems = []
    if meta.get("format_version") != FORMAT_VERSION or meta.get("volume_index") != index:
        problems.append("metadata has the wrong format version or volume index")
    paths = volume_paths(output_dir, index)
    for name in ARRAYS:
        zj = paths[name] / "zarr.json"
        try:
            zmeta = json.loads(zj.read_text())
        except (OSError, json.JSONDecodeError):
            problems.append(f"{name}: zarr.json missing or unreadable")
            continue
        shape = meta.get("shapes", {}).get(name)
        if list(zmeta.get("shape", [])) != list(shape or []):
            problems.append(f"{name}: shape {zmeta.get('shape')} != metadata {shape}")
            continue
        if zmeta.get("data_type") != meta.get("dtypes", {}).get(name):
            problems.append(f"{name}: dtype {zmeta.get('data_type')} != metadata {meta.get('dtypes', {}).get(name)}")
        chunks = zmeta["chunk_grid"]["configuration"]["chunk_shape"]
        want = expected_chunks(zmeta["shape"], chunks)
        have = count_chunk_files(paths[name])
        if have != want:
            problems.append(f"{name}: {have} of {want} chunk files present")
    return problems


def _manifest_for(cfg: ExtractionConfig) -> Path:
    if cfg.manifest:
        return Path(cfg.manifest)
    from dinocell.extract.synthetic_volumes import ensure_default_synthetic

    return ensure_default_synthetic(cfg.output_dir, cfg.output_image_dim)


def extract_volume(cfg: ExtractionConfig, index: int, model: Any = None,
                   model_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract volume ``index`` into ``cfg.output_dir`` and return its metadata (written last).

    Any stale metadata is removed first, so an interrupted re-extraction can never leave a marker
    pointing at half-written arrays.
    """
    import tensorstore as ts
    import torch

    cfg.validate()
    t_start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = volume_paths(out_dir, index)
    paths["metadata"].unlink(missing_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))

    if model is None:
        model, model_info = load_model(cfg.model, cfg.output_image_dim, resolve_device(cfg))
    t_model = time.perf_counter()
    manifest = _manifest_for(cfg)
    entries = load_manifest(manifest)
    crop = sample_crop(entries, index, cfg)
    t_sampled = time.perf_counter()
    feats = compute_volume_features(crop.raw, model, cfg.axes, cfg.batch_size, cfg.feature_dtype)
    t_features = time.perf_counter()
    if not np.isfinite(feats).all():
        raise DataError(f"volume {index}: the model produced NaN/Inf features")

    chunks = default_chunks(feats.shape[0], cfg)
    arrays = {"features": (feats, cfg.feature_dtype), "gt": (crop.gt, "uint32"), "mask": (crop.mask, "uint8")}
    futures = []
    stores = {}
    for name, (data, dtype) in arrays.items():
        spec = array_spec(paths[name], data.shape, dtype, chunks[name], cfg.compression, cfg.compression_level,
                          cfg.checksum)
        try:
            stores[name] = ts.open(spec, create=True, delete_existing=True).result()
        except Exception as e:
            raise DataError(f"cannot create {paths[name]}: {str(e).splitlines()[0]}") from None
        futures.append(stores[name].write(data))
    for f in futures:
        f.result()
    t_written = time.perf_counter()

    storage = {f"{name}_gb": dir_size_bytes(paths[name]) / 1e9 for name in ARRAYS}
    storage["total_gb"] = sum(storage.values())
    f32 = feats.astype(np.float32, copy=False)
    meta = {
        "format_version": FORMAT_VERSION,
        "volume_index": int(index),
        "volume_name": volume_name(index),
        "status": "complete",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "paths": {name: paths[name].name for name in ARRAYS},
        "source": {
            "manifest": str(manifest),
            "dataset": crop.entry.dataset or Path(crop.entry.raw).parent.name,
            "entry_name": crop.entry.name,
            "entry_index": crop.entry_index,
            "raw": crop.entry.raw,
            "labels": dict(crop.entry.labels),
            "raw_level": crop.raw_info["level"],
            "raw_format": crop.raw_info["format"],
            "raw_scale_nm": crop.raw_info["scale_nm"],
            "raw_shape": crop.raw_info["shape"],
            "origin_nm": crop.origin_nm.tolist(),
            "origin_voxel": crop.raw_info["origin_voxel"],
            "tries": crop.tries,
        },
        "shapes": {name: list(arrays[name][0].shape) for name in ARRAYS},
        "dtypes": {name: arrays[name][1] for name in ARRAYS},
        "chunks": {name: [max(1, min(c, s)) for c, s in zip(chunks[name], arrays[name][0].shape, strict=True)]
                   for name in ARRAYS},
        "configuration": {
            "model": dict(model_info or {}),
            "resolution_nm": crop.resolution.tolist(),
            "output_image_dim": cfg.output_image_dim,
            "axes": cfg.axes,
            "compression": cfg.compression,
            "compression_level": cfg.compression_level,
            "checksum": cfg.checksum,
            "chunks": chunks["features"],
            "feature_dtype": cfg.feature_dtype,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "criteria": {"min_label_fraction": cfg.min_label_fraction, "min_unique_ids": cfg.min_unique_ids,
                         "min_ground_truth_fraction": cfg.min_ground_truth_fraction},
        },
        "timing": {
            "model_seconds": t_model - t_start,
            "sampling_seconds": t_sampled - t_model,
            "extraction_seconds": t_features - t_sampled,
            "write_seconds": t_written - t_features,
            "total_seconds": time.perf_counter() - t_start,
        },
        "storage": storage,
        "statistics": {
            "classes": crop.classes,
            "valid_gt_fraction": crop.stats["valid_gt_fraction"],
            "label_fraction": crop.stats["label_fraction"],
            "unique_ids": crop.stats["unique_ids"],
            "class_fractions": crop.stats["class_fractions"],
            "class_unique_ids": crop.stats["class_unique_ids"],
            "feature_mean": float(f32.mean()),
            "feature_std": float(f32.std()),
        },
    }
    write_json_atomic(paths["metadata"], meta)
    paths["error"].unlink(missing_ok=True)
    return meta
