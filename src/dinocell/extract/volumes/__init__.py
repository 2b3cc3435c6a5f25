"""3-D volumes -> per-slice DINOv3 features -> TensorStore zarr arrays + metadata.

One call of :func:`extract_volume` produces, for volume index ``i`` in ``output_dir``::

    volume_{i:06d}_features.zarr   (C, D, H/p, W/p) float16  patch store (default), or
                                   (C, D, H, W)     float16  voxel store (--store voxel)
    volume_{i:06d}_gt.zarr         (K, D, H, W) uint32   instance ids per class (0 = background)
    volume_{i:06d}_mask.zarr       (1, D, H, W) uint8    1 where the ground truth is defined
    volume_{i:06d}_metadata.json   written last, atomically: its presence marks the volume complete

The package is split along the pipeline: :mod:`.config` (options), :mod:`.readers` (zarr / OME-Zarr /
N5 / TIFF, local or s3://), :mod:`.manifest`, :mod:`.sampling` (seeded crops), :mod:`.features` (the
backbone and its features), :mod:`.store` (zarr layout, grid, completion) and :mod:`.pipeline`
(one volume end to end).  None of them imports tensorstore or dask at module level: they belong to
the optional ``volumes`` extra.
"""

from __future__ import annotations

from dinocell.extract.volumes.config import (
    ARRAYS,
    AXES_CHOICES,
    COMPRESSIONS,
    FEATURE_DTYPES,
    FORMAT_VERSION,
    STORES,
    TINY_MODEL,
    ExtractionConfig,
    ModelSpec,
    RandomInitWarning,
    S3Options,
    require_volumes,
)
from dinocell.extract.volumes.features import (
    bilinear_matrix,
    compute_patch_features,
    compute_volume_features,
    extraction_model,
    resolve_device,
)
from dinocell.extract.volumes.manifest import VolumeEntry, load_manifest
from dinocell.extract.volumes.pipeline import compute_features, extract_volume
from dinocell.extract.volumes.readers import VolumeArray, choose_level, kvstore_spec, open_volume_array
from dinocell.extract.volumes.sampling import SampledCrop, sample_crop, sample_nearest, sample_raw
from dinocell.extract.volumes.store import (
    FeatureGrid,
    array_spec,
    codecs_for,
    count_chunk_files,
    default_chunks,
    dir_size_bytes,
    expected_chunks,
    grid_problems,
    quick_verify,
    read_metadata,
    volume_name,
    volume_paths,
    write_arrays,
    write_json_atomic,
)

__all__ = [
    "ARRAYS", "AXES_CHOICES", "COMPRESSIONS", "FEATURE_DTYPES", "FORMAT_VERSION", "STORES", "TINY_MODEL",
    "ExtractionConfig", "FeatureGrid", "ModelSpec", "RandomInitWarning", "S3Options", "SampledCrop",
    "VolumeArray", "VolumeEntry", "array_spec", "bilinear_matrix", "choose_level", "codecs_for",
    "compute_features", "compute_patch_features", "compute_volume_features", "count_chunk_files",
    "default_chunks", "dir_size_bytes", "expected_chunks", "extract_volume", "grid_problems", "kvstore_spec",
    "extraction_model", "load_manifest", "open_volume_array", "quick_verify", "read_metadata", "require_volumes",
    "resolve_device", "sample_crop", "sample_nearest", "sample_raw", "volume_name", "volume_paths",
    "write_arrays", "write_json_atomic",
]
