"""Opening 3-D arrays with their physical grid: zarr v2/v3 (OME-Zarr multiscale), N5, TIFF; local or s3://.

Why TensorStore: one reader for every chunked format and for S3 (concurrent chunk reads, optional
endpoint override) that reads only the boxes a crop needs.  Every array comes back as a
:class:`VolumeArray` in (z, y, x) order with scale and translation in nm, so sampling can place
raw and label arrays that live on different grids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.data.decode import decode_image
from dinocell.errors import DataError
from dinocell.extract.volumes.config import TIFF_SUFFIXES, S3Options


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
        if uri.startswith("s3://"):
            parent, _, key = uri.rpartition("/")
            raw = _read_key(parent, key, s3)
            if raw is None:
                raise DataError(f"TIFF stack not found: {uri}")
            arr = decode_image(raw, "TIFF stack", name=uri)
        else:
            arr = decode_image(uri, "TIFF stack")
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
