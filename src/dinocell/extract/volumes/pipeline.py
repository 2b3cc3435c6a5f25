"""One volume index -> its crop -> features -> the store, with the metadata marker written last.

Why this shape: extraction is the slow, GPU-bound step and training on the cached features must be
I/O bound, so every volume is an independent, idempotent unit (resumable on a cluster) whose
completion marker is written only after every array write has been committed.
"""

from __future__ import annotations

import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.errors import DataError
from dinocell.extract.volumes.config import ARRAYS, FORMAT_VERSION, ExtractionConfig, require_volumes
from dinocell.extract.volumes.features import (
    compute_patch_features,
    compute_volume_features,
    extraction_model,
    resolve_device,
)
from dinocell.extract.volumes.manifest import load_manifest
from dinocell.extract.volumes.sampling import SampledCrop, sample_crop
from dinocell.extract.volumes.store import (
    FeatureGrid,
    default_chunks,
    dir_size_bytes,
    volume_name,
    volume_paths,
    write_arrays,
    write_json_atomic,
)
from dinocell.provenance import provenance


def _manifest_for(cfg: ExtractionConfig) -> Path:
    if cfg.manifest:
        return Path(cfg.manifest)
    from dinocell.extract.synthetic_volumes import ensure_default_synthetic

    return ensure_default_synthetic(cfg.output_dir, cfg.output_image_dim)


def compute_features(crop: SampledCrop, model: Any, cfg: ExtractionConfig) -> tuple[np.ndarray, FeatureGrid]:
    """The stored features of a crop (patch or voxel store, per ``cfg.store``) and their voxel grid.

    ``model`` is a :class:`~dinocell.models.loading.LoadedModel`: the crop is finished by its
    preprocessing (the rule its weights were trained with) before any slice reaches the backbone."""
    vol = model.preprocess.scale_volume(crop.raw)
    if cfg.store == "patch":
        feats = compute_patch_features(vol, model.backbone, cfg.batch_size, cfg.feature_dtype)
    else:
        feats = compute_volume_features(vol, model.backbone, cfg.axes, cfg.batch_size, cfg.feature_dtype)
    volume_shape = [int(s) for s in crop.raw.shape]
    feature_shape = [int(s) for s in feats.shape[1:]]
    grid = FeatureGrid(store=cfg.store, volume_shape=volume_shape, feature_shape=feature_shape,
                       cell=[v // f for v, f in zip(volume_shape, feature_shape, strict=True)],
                       origin_voxel=[int(v) for v in crop.raw_info["origin_voxel"]],
                       origin_nm=[float(v) for v in crop.origin_nm], resolution_nm=[float(v) for v in crop.resolution])
    return feats, grid


def extract_volume(cfg: ExtractionConfig, index: int, model: Any = None,
                   model_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract volume ``index`` into ``cfg.output_dir`` and return its metadata (written last).

    ``model``: a :class:`~dinocell.models.loading.LoadedModel` (default: :func:`extraction_model` of
    ``cfg.model``), never a bare backbone -- its preprocessing comes with it.

    Any stale metadata is removed first, so an interrupted re-extraction can never leave a marker
    pointing at half-written arrays.
    """
    import torch

    cfg.validate()
    require_volumes(("tensorstore",), "extract-volumes")
    t_start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = volume_paths(out_dir, index)
    paths["metadata"].unlink(missing_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))

    if model is None:
        model, model_info = extraction_model(cfg.model, cfg.output_image_dim, resolve_device(cfg))
    t_model = time.perf_counter()
    manifest = _manifest_for(cfg)
    entries = load_manifest(manifest)
    crop = sample_crop(entries, index, cfg)
    t_sampled = time.perf_counter()
    feats, grid = compute_features(crop, model, cfg)
    t_features = time.perf_counter()
    if not np.isfinite(feats).all():
        raise DataError(f"volume {index}: the model produced NaN/Inf features")

    chunks = default_chunks(feats.shape[0], cfg)
    arrays = {"features": (feats, cfg.feature_dtype), "gt": (crop.gt, "uint32"), "mask": (crop.mask, "uint8")}
    write_arrays(paths, arrays, chunks, cfg)
    t_written = time.perf_counter()

    storage = {f"{name}_gb": dir_size_bytes(paths[name]) / 1e9 for name in ARRAYS}
    storage["total_gb"] = sum(storage.values())
    f32 = feats.astype(np.float32, copy=False)
    meta = {
        "format_version": FORMAT_VERSION,
        "volume_index": int(index),
        "volume_name": volume_name(index),
        "status": "complete",
        "store": cfg.store,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        **provenance(),  # the code that made these features (dinocell version, git commit)
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
        "grid": grid.to_dict(),
        "shapes": {name: list(arrays[name][0].shape) for name in ARRAYS},
        "dtypes": {name: arrays[name][1] for name in ARRAYS},
        "chunks": {name: [max(1, min(c, s)) for c, s in zip(chunks[name], arrays[name][0].shape, strict=True)]
                   for name in ARRAYS},
        "configuration": {
            "model": dict(model_info or {}),
            "resolution_nm": crop.resolution.tolist(),
            "output_image_dim": cfg.output_image_dim,
            "axes": cfg.axes,
            "store": cfg.store,
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
