"""Crop sampling: pick a seeded crop of one manifest entry and resample raw, labels and mask onto it.

Why the volume index is the seed (``numpy.random.default_rng([seed, index])``): re-extracting an
index on any worker reproduces the same crop, so a cluster run can be resumed or verified volume by
volume.  Raw is resampled trilinearly and labels by nearest neighbour, honouring each array's scale
and translation (labels may live on another grid or in a sub-box of the raw volume).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinocell.errors import DataError
from dinocell.extract.volumes.config import ExtractionConfig, base_resolution
from dinocell.extract.volumes.manifest import VolumeEntry
from dinocell.extract.volumes.readers import VolumeArray, open_volume_array


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
    target = base_resolution(cfg)
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
