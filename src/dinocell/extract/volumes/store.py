"""The on-disk store: paths, zarr v3 codecs and chunks, the feature-to-voxel grid, completion checks.

Why TensorStore zarr v3 with a metadata marker written last: every volume is an independent unit
that a cluster job can write, a crash can interrupt and a rerun can redo; a volume counts as
complete only when its metadata parses and the arrays' ``zarr.json`` shapes/dtypes and chunk-file
counts match it (:func:`quick_verify`), so no half-written volume can look complete.

Two stores (``metadata["store"]``, absent = ``voxel`` for caches written before it existed):

* ``patch``: features ``(C, D, H/p, W/p)`` at the ViT's patch grid, gt/mask at full resolution;
* ``voxel``: features ``(C, D, H, W)`` upsampled to every voxel.

:class:`FeatureGrid` (``metadata["grid"]``) says which voxels each feature cell describes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.errors import ConfigError, DataError
from dinocell.extract.volumes.config import (
    ARRAYS,
    COMPRESSIONS,
    DEFAULT_CHANNEL_CHUNK,
    DEFAULT_SPATIAL_CHUNK,
    FORMAT_VERSION,
    STORES,
    ExtractionConfig,
)
from dinocell.paths import write_text_atomic

#: Feature channels per chunk of the patch store: 64 x 64 x 8 x 8 float16 = 512 KiB for ViT-S/16 at 128^3.
PATCH_CHANNEL_CHUNK = 64


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
    """Chunk shapes per array: features ``[C_chunk, 64, 64, 64]``, gt all classes, mask 1.

    The patch store's feature array is 256x smaller, so it gets 4x the channels per chunk (fewer,
    larger reads); spatial chunk sides are clipped to the array by :func:`array_spec`.
    """
    if cfg.chunks is not None:
        c, d, h, w = (int(v) for v in cfg.chunks)
    else:
        c = PATCH_CHANNEL_CHUNK if cfg.store == "patch" else DEFAULT_CHANNEL_CHUNK
        d = h = w = DEFAULT_SPATIAL_CHUNK
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
    """Write JSON to a per-process temp name, fsync, then rename: readers never see a partial file, and
    concurrent writers of one volume's metadata never share a temp file."""
    write_text_atomic(path, json.dumps(data, indent=2), unique=True, fsync=True)


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
    if not problems:
        problems.extend(grid_problems(meta))
    return problems


def write_arrays(paths: dict[str, Path], arrays: dict[str, tuple[np.ndarray, str]],
                 chunks: dict[str, list[int]], cfg: ExtractionConfig) -> None:
    """Create (replacing) and write the zarr arrays of one volume; all writes in flight together."""
    import tensorstore as ts

    futures = []
    for name, (data, dtype) in arrays.items():
        spec = array_spec(paths[name], data.shape, dtype, chunks[name], cfg.compression, cfg.compression_level,
                          cfg.checksum)
        try:
            store = ts.open(spec, create=True, delete_existing=True).result()
        except Exception as e:
            raise DataError(f"cannot create {paths[name]}: {str(e).splitlines()[0]}") from None
        futures.append(store.write(data))
    for f in futures:
        f.result()


# --------------------------------------------------------------------------------------------------
# Feature cells -> voxels
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureGrid:
    """Where the stored features sit relative to the crop's voxels (``metadata["grid"]``).

    Feature cell ``(k, i, j)`` describes the crop voxels ``[k*cz, (k+1)*cz) x [i*cy, (i+1)*cy) x
    [j*cx, (j+1)*cx)`` with ``cell = (cz, cy, cx)`` (``(1, p, p)`` for the patch store of z-slices,
    ``(1, 1, 1)`` for the voxel store).  Crop voxel ``v`` is source voxel ``origin_voxel + v`` of the
    raw array at ``resolution_nm``, whose corner sits at ``origin_nm + v * resolution_nm``.
    """

    store: str
    volume_shape: list[int]  # (D, H, W) of the crop, = gt/mask spatial shape
    feature_shape: list[int]  # spatial (d, h, w) of the stored features
    cell: list[int]  # voxels per feature cell along (z, y, x) = the feature stride in voxels
    origin_voxel: list[int]  # crop origin in output voxels from the raw array's origin
    origin_nm: list[float]
    resolution_nm: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> FeatureGrid:
        """The grid of a volume's metadata (also for voxel caches written before ``grid`` existed)."""
        if "grid" in meta:
            return cls(**meta["grid"])
        shape = [int(s) for s in meta["shapes"]["features"][1:]]
        src = meta.get("source", {})
        return cls("voxel", shape, shape, [1, 1, 1], list(src.get("origin_voxel", [0, 0, 0])),
                   list(src.get("origin_nm", [0.0, 0.0, 0.0])),
                   list(meta.get("configuration", {}).get("resolution_nm", [1.0, 1.0, 1.0])))

    @property
    def stride_nm(self) -> np.ndarray:
        """Physical size (z, y, x) of one feature cell."""
        return np.asarray(self.cell, float) * np.asarray(self.resolution_nm, float)

    def voxel_box(self, cell_index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Crop-voxel box ``[lo, hi)`` described by feature cell ``(k, i, j)``."""
        lo = np.asarray(cell_index, int) * np.asarray(self.cell, int)
        return lo, lo + np.asarray(self.cell, int)

    def cell_centres_nm(self) -> list[np.ndarray]:
        """Physical centre of every feature cell along z, y and x (three 1-D arrays)."""
        return [self.origin_nm[a] + (np.arange(self.feature_shape[a]) + 0.5) * self.stride_nm[a] for a in range(3)]


def grid_problems(meta: dict[str, Any]) -> list[str]:
    """Inconsistencies between a volume's grid and its array shapes (empty list = consistent)."""
    store = meta.get("store", "voxel")
    if store not in STORES:
        return [f"unknown store kind '{store}'"]
    try:
        grid = FeatureGrid.from_metadata(meta)
    except (KeyError, TypeError) as e:
        return [f"grid metadata unreadable ({e})"]
    shapes = meta.get("shapes", {})
    problems = []
    if grid.store != store:
        problems.append(f"grid store '{grid.store}' != metadata store '{store}'")
    if list(shapes.get("features", [None])[1:]) != list(grid.feature_shape):
        problems.append(f"features: spatial shape {shapes.get('features', [])[1:]} != grid {grid.feature_shape}")
    for name in ("gt", "mask"):
        if list(shapes.get(name, [None])[1:]) != list(grid.volume_shape):
            problems.append(f"{name}: spatial shape {shapes.get(name, [])[1:]} != grid volume {grid.volume_shape}")
    if [f * c for f, c in zip(grid.feature_shape, grid.cell, strict=True)] != list(grid.volume_shape):
        problems.append(f"grid: {grid.feature_shape} cells x {grid.cell} voxels != volume {grid.volume_shape}")
    if store == "voxel" and grid.cell != [1, 1, 1]:
        problems.append(f"grid: a voxel store has cell {grid.cell}, not [1, 1, 1]")
    return problems
