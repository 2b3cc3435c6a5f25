"""The one rule that turns a raw (C, H, W) field into float32 [0, 1] model input: a shared leaf.

Stain normalisation (RGB sources, :mod:`dinocell.stain`), then per-channel scaling by
``data.scaling.mode``: the field's own percentiles (``field``), or given raw [low, high] levels per
channel (a plate's statistics for ``plate``, :func:`fixed_ranges` for ``fixed``), then optional CLAHE.
Illumination correction comes before it and belongs to whoever has the plate's functions (a data source).

Why a leaf of its own: the data sources finish every field this way before training
(``FieldSource.finish``), and a loaded model applies exactly the same function to a raw field before
inference (``models.loading``'s ``Preprocess``); ``data`` and ``models`` are independent layers, so
the one implementation sits below both (numpy and OpenCV only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dinocell.errors import DataError
from dinocell.stain import StainNormalizer

#: Above this many pixels, percentiles are estimated from every other row and column: 0.1/99.9
#: percentiles of a 1080x1080 image from 290k samples differ from the exact ones by a grey level or two,
#: and the histogram costs a quarter.
PERCENTILE_SUBSAMPLE_ABOVE = 512 * 512


def scale_range(channel: np.ndarray, low: float, high: float, out: np.ndarray | None = None) -> np.ndarray:
    """Map raw levels [low, high] of one channel to [0, 1] (clipped) as float32.

    The one scaling step every mode shares (per-field percentiles, per-plate and fixed ranges): integer
    images go through one gather from a 256/65536-entry table instead of four passes over the image.
    """
    if out is None:
        out = np.empty(channel.shape, dtype=np.float32)
    if high <= low:
        out[...] = 0.0
        return out
    if channel.dtype in (np.uint8, np.uint16):
        levels = np.arange(256 if channel.dtype == np.uint8 else 65536, dtype=np.float32)
        lut = np.clip((levels - low) * (1.0 / (high - low)), 0.0, 1.0).astype(np.float32)
        np.take(lut, channel, out=out)
        return out
    np.subtract(channel, low, out=out, dtype=np.float32)
    out *= 1.0 / (high - low)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def percentile_scale(channel: np.ndarray, low: float, high: float,
                     out: np.ndarray | None = None) -> np.ndarray:
    """Clip one channel to its [low, high] percentiles and map to [0, 1] as float32.

    Percentiles come from a histogram for integer images (exact, and ~10x faster than
    ``np.percentile`` on a 1080x1080 uint16 image, which sorts).
    """
    sample = channel[::2, ::2] if channel.ndim == 2 and channel.size > PERCENTILE_SUBSAMPLE_ABOVE else channel
    lo, hi = _percentiles(sample, low, high)
    return scale_range(channel, lo, hi, out)


def _percentiles(channel: np.ndarray, low: float, high: float) -> tuple[float, float]:
    if channel.dtype in (np.uint8, np.uint16):
        hist = np.bincount(channel.ravel(), minlength=256 if channel.dtype == np.uint8 else 1)
        cdf = np.cumsum(hist)
        total = cdf[-1]
        lo = int(np.searchsorted(cdf, total * low / 100.0, side="left"))
        hi = int(np.searchsorted(cdf, total * high / 100.0, side="left"))
        return float(lo), float(hi)
    lo, hi = np.percentile(channel, [low, high])
    return float(lo), float(hi)


def clahe(channel01: np.ndarray, clip: float = 3.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0,1] float channel (OpenCV, 16-bit)."""
    import cv2

    u16 = np.round(channel01 * 65535.0).astype(np.uint16)
    eq = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(int(tiles), int(tiles))).apply(u16)
    return eq.astype(np.float32) * (1.0 / 65535.0)


def scale_field(raw: np.ndarray, cfg: Any, ranges: Sequence[tuple[float, float]] | None = None) -> np.ndarray:
    """Per-channel scaling (+ optional CLAHE) of a (C,H,W) field into float32 [0,1].

    ``cfg`` is a :class:`dinocell.config.ScalingConfig`.  ``ranges`` (one raw [low, high] per channel:
    a plate's statistics or fixed levels, :mod:`dinocell.data.intensity`) replaces the field's own
    percentiles.
    """
    if raw.ndim != 3:
        raise DataError(f"expected a (C,H,W) field, got shape {raw.shape}")
    if ranges is not None and len(ranges) != raw.shape[0]:
        raise DataError(f"expected a ({len(ranges)},H,W) field, got shape {raw.shape}")
    out = np.empty(raw.shape, dtype=np.float32)
    for c in range(raw.shape[0]):
        if ranges is None:
            percentile_scale(raw[c], cfg.low_percentile, cfg.high_percentile, out=out[c])
        else:
            scale_range(raw[c], ranges[c][0], ranges[c][1], out=out[c])
        if getattr(cfg, "clahe", False):
            out[c] = clahe(out[c], cfg.clahe_clip, cfg.clahe_tiles)
    return out




def fixed_ranges(fixed: Mapping[str, Sequence[float]], channels: Sequence[str]) -> list[tuple[float, float]]:
    """The configured [low, high] of each channel (names case-insensitive); a missing one is an error."""
    lower = {k.lower(): v for k, v in fixed.items()}
    out = []
    for ch in channels:
        rng = lower.get(ch.lower())
        if rng is None:
            raise DataError(f"data.scaling.mode=fixed but data.scaling.fixed has no range for channel {ch} "
                            f"(have {', '.join(fixed) or 'none'})")
        if len(rng) != 2 or not float(rng[0]) < float(rng[1]):
            raise DataError(f"data.scaling.fixed.{ch} must be [low, high] with low < high, got {list(rng)}")
        out.append((float(rng[0]), float(rng[1])))
    return out


def to_unit(raw: np.ndarray) -> np.ndarray:
    """uint8 / uint16 -> float32 in [0, 1] by the type's range; floats pass through as float32."""
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / 255.0
    if raw.dtype == np.uint16:
        return raw.astype(np.float32) / 65535.0
    return raw.astype(np.float32)


def finish_field(raw: np.ndarray, scaling: Any, stain: Any = None, name: str = "field",
                 ranges: Sequence[tuple[float, float]] | None = None) -> np.ndarray:
    """Stain normalisation (if on), then per-channel scaling, of one decoded (C,H,W) field.

    ``raw`` is already illumination-corrected when the source corrects (:mod:`dinocell.data.illum`);
    ``ranges`` are the plate's or fixed [low, high] levels (None: the field's own percentiles).
    A field with NaN or inf pixels (a float TIFF with holes, a broken illumination function) raises
    :class:`DataError`, so every reader skips and counts it like a corrupt file instead of letting it
    reach the loss.
    """
    if not np.issubdtype(raw.dtype, np.integer) and not np.isfinite(raw).all():
        raise DataError(f"field {name} has NaN or infinite pixels")
    if stain is not None and getattr(stain, "use_stain_norm", False):
        raw = StainNormalizer(stain)(to_unit(raw))
    return to_unit(raw) if scaling is None else scale_field(np.asarray(raw), scaling, ranges)
