"""Reinhard stain normalisation for RGB histology (H&E) images.

Slides stained in different labs or on different days differ mostly in overall colour.  Reinhard et
al. (2001, "Color transfer between images") remove that by matching the per-channel mean and standard
deviation of the image to a reference in the decorrelated Lab colour space.  It is cheap (a colour
conversion and an affine map), needs no stain-vector estimation, and keeps the tissue structure.

Applied to RGB sources only, before multi-crop and before intensity normalisation; fluorescence
images (any channel count) are not stained and never go through it.  A leaf below ``data`` and
``models``: the data sources and a loaded model's ``Preprocess`` apply it through the one rule,
:func:`dinocell.scaling.finish_field`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from dinocell.config import StainConfig
from dinocell.errors import ConfigError, DataError

_EPS = 1e-6


def _to_hwc_float(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(3,H,W) float [0,1] or uint8 array/tensor -> contiguous (H,W,3) float32 in [0,1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[0] != 3:
        got = arr.shape[0] if arr.ndim == 3 else f"an array of shape {arr.shape}"
        raise DataError(f"stain normalisation needs RGB (3 channels), got {got}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    else:
        arr = np.clip(arr.astype(np.float32, copy=False), 0.0, 1.0)
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def rgb_to_lab(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(3,H,W) RGB -> (H,W,3) float32 Lab (L in [0,100]; a, b roughly in [-128,127])."""
    return cv2.cvtColor(_to_hwc_float(image), cv2.COLOR_RGB2Lab)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(H,W,3) float32 Lab -> (3,H,W) float32 RGB clipped to [0,1]."""
    rgb = cv2.cvtColor(np.ascontiguousarray(lab, dtype=np.float32), cv2.COLOR_Lab2RGB)
    return np.ascontiguousarray(np.clip(rgb, 0.0, 1.0).transpose(2, 0, 1))


def fit_reinhard_target(image: np.ndarray | torch.Tensor) -> tuple[list[float], list[float]]:
    """Lab per-channel means and stds of a reference image, to use as ``target_means/target_stds``."""
    lab = rgb_to_lab(image).reshape(-1, 3).astype(np.float64)
    return lab.mean(0).tolist(), lab.std(0).tolist()


def reinhard_normalize(
    image: np.ndarray | torch.Tensor,
    target_means: Sequence[float],
    target_stds: Sequence[float],
) -> np.ndarray:
    """Match the Lab mean/std of ``image`` (3,H,W) to the targets; returns (3,H,W) float32 in [0,1].

    A channel with (near) zero spread is only shifted to the target mean: scaling it would divide by
    zero and invent contrast that is not in the image.
    """
    lab = rgb_to_lab(image)
    flat = lab.reshape(-1, 3).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    tm = np.asarray(target_means, dtype=np.float64)
    ts = np.asarray(target_stds, dtype=np.float64)
    gain = np.where(std > _EPS, ts / np.maximum(std, _EPS), 1.0)
    out = ((flat - mean) * gain + tm).astype(np.float32).reshape(lab.shape)
    return lab_to_rgb(out)


class StainNormalizer:
    """Callable Reinhard normaliser built from ``StainConfig``; identity when ``use_stain_norm`` is off.

    Returns the same kind of object it was given (numpy array or torch tensor), float32 (3,H,W) in
    [0,1].  When disabled, the input is returned unchanged.
    """

    def __init__(self, cfg: StainConfig) -> None:
        if len(cfg.target_means) != 3 or len(cfg.target_stds) != 3:
            raise ConfigError("config keys 'data.stain.target_means' and 'data.stain.target_stds' need "
                              "3 values (L, a, b)")
        if any(s < 0 for s in cfg.target_stds):
            raise ConfigError("config key 'data.stain.target_stds' must be non-negative")
        self.cfg = cfg
        self.enabled = bool(cfg.use_stain_norm)
        self.target_means = [float(v) for v in cfg.target_means]
        self.target_stds = [float(v) for v in cfg.target_stds]

    def __repr__(self) -> str:
        return (f"StainNormalizer(enabled={self.enabled}, means={self.target_means}, "
                f"stds={self.target_stds})")

    def __call__(self, image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        if not self.enabled:
            return image
        out = reinhard_normalize(image, self.target_means, self.target_stds)
        if isinstance(image, torch.Tensor):
            return torch.from_numpy(out).to(image.device)
        return out
