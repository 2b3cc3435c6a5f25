"""Synthetic EM-like 3-D volumes with organelle labels, written in the formats the extractor reads.

Why: the volume pipeline must run offline (``dinocell extract-volumes`` with no manifest) and the tests
must exercise every reader (OME-Zarr v2/v3 multiscale, N5, TIFF stacks) without real data.  Each
volume holds three organelle classes with instance ids — ``nucleus`` (large spheres), ``mito``
(capsules) and ``vesicle`` (small spheres) — painted without overlap on a textured background, then
blurred and noised like a FIB-SEM stack.  Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.errors import DataError
from dinocell.paths import write_atomic, write_folder_atomic, write_text_atomic

#: Organelle classes of the synthetic volumes, in painting order.
SYNTH_CLASSES = ("nucleus", "mito", "vesicle")

#: Grey value of each class in the raw (uint8) volume; background is textured around 150.
_CLASS_INTENSITY = {"nucleus": 95.0, "mito": 55.0, "vesicle": 215.0}

FORMATS = ("zarr3", "zarr2", "n5", "tiff")


@dataclass
class SyntheticVolume:
    """One synthetic volume: uint8 raw (Z,Y,X) and per-class uint32 instance-id arrays."""

    raw: np.ndarray
    labels: dict[str, np.ndarray]


def _paint_sphere(lab: np.ndarray, occ: np.ndarray, center: np.ndarray, radius: float, value: int) -> None:
    lo = np.maximum(np.floor(center - radius).astype(int), 0)
    hi = np.minimum(np.ceil(center + radius).astype(int) + 1, lab.shape)
    if np.any(hi <= lo):
        return
    zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    inside = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius**2
    sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    inside &= ~occ[sl]
    lab[sl][inside] = value
    occ[sl] |= inside


def _paint_capsule(lab: np.ndarray, occ: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float,
                   value: int) -> None:
    lo = np.maximum(np.floor(np.minimum(a, b) - radius).astype(int), 0)
    hi = np.minimum(np.ceil(np.maximum(a, b) + radius).astype(int) + 1, lab.shape)
    if np.any(hi <= lo):
        return
    grid = np.stack(np.meshgrid(*(np.arange(lo[i], hi[i]) for i in range(3)), indexing="ij"), -1).astype(float)
    ab = b - a
    t = np.clip(((grid - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    closest = a + t[..., None] * ab
    inside = np.sum((grid - closest) ** 2, -1) <= radius**2
    sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    inside &= ~occ[sl]
    lab[sl][inside] = value
    occ[sl] |= inside


def make_synthetic_volume(shape: Sequence[int] = (64, 64, 64), seed: int = 0,
                          density: float = 1.0) -> SyntheticVolume:
    """Render one volume; object counts scale with the volume so small test volumes stay labelled."""
    from scipy import ndimage

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"synthetic volume shape must be 3-D with every side >= 8, got {shape}")
    rng = np.random.default_rng(seed)
    dims = np.asarray(shape, float)
    n_vox = float(np.prod(dims))
    occ = np.zeros(shape, bool)
    labels = {c: np.zeros(shape, np.uint32) for c in SYNTH_CLASSES}

    n_nuc = int(rng.integers(1, 3))
    for i in range(n_nuc):
        radius = rng.uniform(0.18, 0.28) * dims.min()
        center = rng.uniform(radius * 0.5, dims - radius * 0.5)
        _paint_sphere(labels["nucleus"], occ, center, radius, i + 1)

    n_mito = max(2, int(round(density * n_vox / 12_000)))
    for i in range(n_mito):
        a = rng.uniform(0, dims)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-9
        length = rng.uniform(0.1, 0.25) * dims.min() + 4
        _paint_capsule(labels["mito"], occ, a, a + direction * length, rng.uniform(1.5, 3.0), i + 1)

    n_ves = max(3, int(round(density * n_vox / 5_000)))
    for i in range(n_ves):
        _paint_sphere(labels["vesicle"], occ, rng.uniform(0, dims), rng.uniform(1.2, 2.8), i + 1)

    # Textured cytoplasm, organelle grey values, a dark nuclear envelope, then blur and shot-like noise.
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    raw = 150.0 + 12.0 * texture / (texture.std() + 1e-9)
    for cls, value in _CLASS_INTENSITY.items():
        raw[labels[cls] > 0] = value
    nuc = labels["nucleus"] > 0
    envelope = nuc & ~ndimage.binary_erosion(nuc, iterations=1)
    raw[envelope] = 35.0
    raw = ndimage.gaussian_filter(raw, 0.8) + rng.normal(0.0, 6.0, size=shape)
    # Keep instance ids that the painting order fully covered (drop empty ids by relabelling).
    for cls in SYNTH_CLASSES:
        lab = labels[cls]
        ids = np.unique(lab)
        ids = ids[ids > 0]
        if len(ids) and ids[-1] != len(ids):
            lut = np.zeros(int(ids[-1]) + 1, np.uint32)
            lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
            labels[cls] = lut[lab]
    return SyntheticVolume(raw=np.clip(raw, 0, 255).astype(np.uint8), labels=labels)


# --------------------------------------------------------------------------------------------------
# Writers (TensorStore for zarr v2/v3 and N5, tifffile for TIFF stacks)
# --------------------------------------------------------------------------------------------------


def _downsample(arr: np.ndarray, factor: int, is_label: bool) -> np.ndarray:
    """2x pyramid level: stride for labels (keeps ids), block mean for raw."""
    if factor == 1:
        return arr
    if is_label:
        return np.ascontiguousarray(arr[::factor, ::factor, ::factor])
    z, y, x = (s // factor * factor for s in arr.shape)
    a = arr[:z, :y, :x].astype(np.float32)
    a = a.reshape(z // factor, factor, y // factor, factor, x // factor, factor).mean((1, 3, 5))
    return np.round(a).astype(arr.dtype)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def _ts_write(spec: dict[str, Any], data: np.ndarray) -> None:
    import tensorstore as ts

    store = ts.open(spec, create=True, delete_existing=True).result()
    store.write(data).result()


def _chunk_of(shape: Sequence[int]) -> list[int]:
    return [min(int(s), 32) for s in shape]


def _write_level(path: Path, data: np.ndarray, fmt: str, scale: Sequence[float],
                 translation: Sequence[float]) -> None:
    """Write one pyramid level ``data`` (Z,Y,X) as a zarr v2/v3 or N5 array at ``path``."""
    dtype = np.dtype(data.dtype).name
    kv = {"driver": "file", "path": str(path)}
    if fmt == "zarr3":
        _ts_write({"driver": "zarr3", "kvstore": kv, "metadata": {
            "shape": list(data.shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": _chunk_of(data.shape)}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3}}]}}, data)
    elif fmt == "zarr2":
        _ts_write({"driver": "zarr", "kvstore": kv, "metadata": {
            "shape": list(data.shape), "chunks": _chunk_of(data.shape), "dtype": np.dtype(data.dtype).str,
            "compressor": {"id": "zstd", "level": 3}}}, data)
    elif fmt == "n5":
        # N5 lists dimensions fastest-first (x, y, z): store the transposed array and say so.
        xyz = np.ascontiguousarray(data.transpose(2, 1, 0))
        _ts_write({"driver": "n5", "kvstore": kv, "metadata": {
            "dimensions": list(xyz.shape), "blockSize": _chunk_of(xyz.shape), "dataType": dtype,
            "compression": {"type": "gzip"}}}, xyz)
        attrs_path = path / "attributes.json"
        attrs = json.loads(attrs_path.read_text())
        attrs.update({"axes": ["x", "y", "z"], "units": ["nm", "nm", "nm"],
                      "pixelResolution": {"dimensions": list(scale)[::-1], "unit": "nm"},
                      "offset": list(translation)[::-1]})
        _write_json(attrs_path, attrs)
    else:
        raise ValueError(f"unknown array format {fmt}")


def _ome_multiscales(levels: list[tuple[str, list[float], list[float]]], name: str, version: str) -> dict:
    return {
        "version": version,
        "name": name,
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": p, "coordinateTransformations": [
            {"type": "scale", "scale": s}, {"type": "translation", "translation": t}]} for p, s, t in levels],
    }


def write_multiscale(path: str | os.PathLike[str], data: np.ndarray, fmt: str = "zarr3",
                     resolution: Sequence[float] = (8.0, 8.0, 8.0), translation: Sequence[float] = (0, 0, 0),
                     n_levels: int = 2, is_label: bool = False) -> Path:
    """Write ``data`` as a multiscale group (``s0``, ``s1``...) with OME-Zarr (or N5) scale metadata.

    Zarr v3 groups carry OME-Zarr 0.5 attributes (``attributes.ome.multiscales``), zarr v2 groups
    OME-Zarr 0.4 ``.zattrs``, N5 groups a ``multiscales`` attribute plus ``pixelResolution`` per level.
    TIFF writes a single stack (no pyramid; its resolution goes into the manifest instead).
    """
    root = Path(path)
    if fmt == "tiff":
        import tifffile

        return write_atomic(root, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib",
                                                               photometric="minisblack"), needed=data.nbytes)
    if root.exists():
        shutil.rmtree(root)
    levels = []
    res = np.asarray(resolution, float)
    trans = np.asarray(translation, float)
    for lvl in range(n_levels):
        f = 2**lvl
        level_data = _downsample(data, f, is_label)
        if min(level_data.shape) < 1:
            break
        scale = (res * f).tolist()
        # Voxel i of a level covers [t + i*s, t + (i+1)*s): a coarser level starts at the same corner.
        _write_level(root / f"s{lvl}", level_data, fmt, scale, trans.tolist())
        levels.append((f"s{lvl}", scale, trans.tolist()))
    ms = _ome_multiscales(levels, root.name, "0.5" if fmt == "zarr3" else "0.4")
    if fmt == "zarr3":
        _write_json(root / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                         "attributes": {"ome": {"version": "0.5", "multiscales": [ms]}}})
    elif fmt == "zarr2":
        _write_json(root / ".zgroup", {"zarr_format": 2})
        _write_json(root / ".zattrs", {"multiscales": [ms]})
    else:
        _write_json(root / "attributes.json", {"n5": "4.0.0", "multiscales": [ms]})
    return root


def _container_suffix(fmt: str) -> str:
    return {"zarr3": ".zarr", "zarr2": ".zarr", "n5": ".n5", "tiff": ""}[fmt]


def write_synthetic_dataset(out_dir: str | os.PathLike[str], n_volumes: int = 4,
                            shape: Sequence[int] = (64, 64, 64), seed: int = 0, fmt: str = "zarr3",
                            resolution: Sequence[float] = (8.0, 8.0, 8.0), n_levels: int = 2,
                            label_fraction_box: float | None = None, dataset: str = "synthetic",
                            manifest_name: str = "manifest.yaml") -> Path:
    """Write ``n_volumes`` synthetic volumes plus a manifest (YAML) and return the manifest's path.

    ``label_fraction_box`` (e.g. 0.75): the odd-numbered volumes get labels only inside a central box
    of that relative size (written with a translation), like annotated crops inside a larger EM volume.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = np.asarray(resolution, float)
    entries = []
    for v in range(n_volumes):
        vol = make_synthetic_volume(shape, seed=seed * 1000 + v)
        name = f"vol_{v:03d}"
        entry: dict[str, Any] = {"name": name, "dataset": dataset, "labels": {}}
        if fmt == "tiff":
            raw_path = write_multiscale(out / f"{name}_raw.tif", vol.raw, "tiff")
            entry["raw"] = raw_path.name
            entry["resolution"] = res.tolist()
        else:
            container = out / f"{name}{_container_suffix(fmt)}"
            write_multiscale(container / "raw", vol.raw, fmt, res, n_levels=n_levels)
            entry["raw"] = f"{container.name}/raw"
        box_lo = np.zeros(3, int)
        box_hi = np.asarray(vol.raw.shape)
        if label_fraction_box is not None and v % 2 == 1:
            size = np.maximum((box_hi * label_fraction_box).astype(int), 1)
            box_lo = (box_hi - size) // 2
            box_hi = box_lo + size
        for cls, lab in vol.labels.items():
            crop = lab[box_lo[0]:box_hi[0], box_lo[1]:box_hi[1], box_lo[2]:box_hi[2]]
            trans = (box_lo * res).tolist()
            if fmt == "tiff":
                p = write_multiscale(out / f"{name}_{cls}.tif", np.ascontiguousarray(crop), "tiff")
                entry["labels"][cls] = p.name
                if box_lo.any() or (box_hi != np.asarray(vol.raw.shape)).any():
                    entry.setdefault("label_offsets", {})[cls] = trans
            else:
                container = out / f"{name}{_container_suffix(fmt)}"
                write_multiscale(container / "labels" / cls, np.ascontiguousarray(crop), fmt, res, trans,
                                 n_levels=n_levels, is_label=True)
                entry["labels"][cls] = f"{container.name}/labels/{cls}"
        entries.append(entry)
    import yaml

    manifest = out / manifest_name
    return write_text_atomic(manifest, yaml.safe_dump({"volumes": entries, "synthetic": {
        "n_volumes": n_volumes, "shape": list(shape), "seed": seed, "format": fmt,
        "resolution": res.tolist()}}, sort_keys=False))


def synthetic_edge_for(output_image_dim: int) -> int:
    """Side of the default synthetic volumes: room for random crops of the requested size."""
    return int(np.ceil(output_image_dim * 1.25 / 8.0) * 8)


def ensure_default_synthetic(output_dir: str | os.PathLike[str], output_image_dim: int,
                             n_volumes: int = 4, seed: int = 0) -> Path:
    """The embedded default dataset under ``output_dir``; generated once, atomically, then reused."""
    edge = synthetic_edge_for(output_image_dim)
    root = Path(output_dir) / f"synthetic_source_e{edge}"
    manifest = root / "manifest.yaml"
    if manifest.is_file():
        return manifest
    write_folder_atomic(root, lambda tmp: write_synthetic_dataset(
        tmp, n_volumes=n_volumes, shape=(edge, edge, edge), seed=seed, fmt="zarr3", label_fraction_box=0.75))
    if not manifest.is_file():  # the folder was there already (not made here): do not guess what it holds
        raise DataError(f"{root} exists but has no manifest.yaml; remove it to regenerate the synthetic volumes")
    return manifest
