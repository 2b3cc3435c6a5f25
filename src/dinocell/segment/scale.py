"""Input scale from the size of the training objects (Cellpose's ``diameter``, on the patch grid).

A ViT sees an image as a grid of ``patch``-px tokens, and the decoder rebuilds the distance map from
those tokens.  What matters is therefore an object's size *in tokens*: an object well under one token
shares it with its neighbours (seeds merge), while an object many tokens wide fills the training crop
and the decoder sees only its interior, never the valley between two objects (the watershed's cut).
Cellpose resizes every image so objects are ~30 px (its network's sweet spot); here the measured
median equivalent diameter of the training objects is resized to ``model.object_patches`` tokens
(default 2.5: a centre token plus a border token on each side, and a 64-px crop of an 8-px-patch
model still holds ~3 objects across, i.e. their borders and the gaps between them).

Sizes in the config stay in *network* pixels: the training crop, the inference tile and the
post-processing distances are multiplied by ``1 / input_scale`` on the field, so the backbone always
sees ``task.crop_size`` / ``infer.tile`` pixels whatever the scale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

AUTO = "auto"
MIN_SCALE, MAX_SCALE = 0.125, 4.0  # beyond these the resize, not the model, dominates the result


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """Diameters (px) of the circles with each object's area, ``sqrt(4 * area / pi)``."""
    areas = np.bincount(np.asarray(labels).ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return np.sqrt(4.0 * areas / np.pi)


def median_diameter(label_images: Iterable[np.ndarray]) -> float | None:
    """Median equivalent diameter over every object of every image; None without objects."""
    parts = [equivalent_diameters(lab) for lab in label_images]
    d = np.concatenate(parts) if parts else np.zeros(0)
    return float(np.median(d)) if d.size else None


def auto_scale(diameter: float | None, patch_size: int, object_patches: float) -> float:
    """Resize factor that makes ``diameter`` px objects ``object_patches`` tokens wide (clamped)."""
    if not diameter or diameter <= 0:
        return 1.0
    scale = object_patches * patch_size / diameter
    clamped = float(min(MAX_SCALE, max(MIN_SCALE, scale)))
    if clamped != scale:
        log.warning("objects of %.1f px would need input scale %.3f; clamped to %.3f", diameter, scale, clamped)
    return round(clamped, 4)


def resolve_scale(model_cfg: Any, diameter: float | None, patch_size: int) -> float:
    """``model.input_scale``: a number as given, or ``auto`` from the measured ``diameter``."""
    value = model_cfg.input_scale
    if isinstance(value, str):
        return auto_scale(diameter, patch_size, float(model_cfg.object_patches))
    return float(value)


def numeric_scale(value: Any) -> float:
    """The scale a model applies: a number, or 1.0 for an unresolved ``auto`` (no run measured it)."""
    return 1.0 if isinstance(value, str) else float(value)


def field_px(size: int, scale: float, multiple: int = 1) -> int:
    """Field pixels covering ``size`` network pixels at ``scale`` (rounded to ``multiple``)."""
    px = max(1, round(size / scale))
    return max(multiple, round(px / multiple) * multiple)


def scaled_post(post: Any, scale: float) -> Any:
    """Post-processing distances / areas given in network pixels, converted to field pixels."""
    if scale == 1.0:
        return post
    return replace(post, min_distance=max(1, round(post.min_distance / scale)),
                   smooth_sigma=post.smooth_sigma / scale, min_size=max(1, round(post.min_size / scale**2)))


__all__ = ["AUTO", "auto_scale", "equivalent_diameters", "field_px", "median_diameter", "numeric_scale",
           "resolve_scale", "scaled_post"]
