"""Predicted maps -> instance labels: seeds at distance-map peaks, watershed inside the foreground.

The same recipe as DINOCell / SAMCell: threshold the foreground, smooth the distance map, take its
local maxima as seeds and flood ``-distance`` from them (scikit-image), then drop tiny objects.  A
foreground component without any peak above the threshold still becomes one object (seeded at its
maximum), so faint or small objects are not silently lost.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi


def label_dtype(n: int) -> type:
    """uint16 when the labels fit, else uint32 (what label TIFF readers expect)."""
    return np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32


def instances(distance: np.ndarray, foreground: np.ndarray, cfg: Any) -> np.ndarray:
    """Instance labels (H, W), 0 = background, from a distance map and foreground probabilities.

    ``cfg`` is a :class:`dinocell.segment.config.PostprocessConfig`.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import relabel_sequential, watershed

    fg = np.asarray(foreground) > cfg.foreground_threshold
    if not fg.any():
        return np.zeros(fg.shape, dtype=np.uint16)
    d = np.asarray(distance, dtype=np.float32)
    if cfg.smooth_sigma > 0:
        d = ndi.gaussian_filter(d, cfg.smooth_sigma)
    comps, n_comp = ndi.label(fg)
    peaks = peak_local_max(d, min_distance=max(1, int(cfg.min_distance)), threshold_abs=cfg.peak_threshold,
                           labels=comps, exclude_border=False)
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    seeded = np.unique(comps[markers > 0])
    unseeded = np.setdiff1d(np.arange(1, n_comp + 1), seeded)
    if unseeded.size:
        where = ndi.maximum_position(d, comps, unseeded)
        for k, pos in enumerate(where, start=len(peaks) + 1):
            markers[pos] = k
    lab = watershed(-d, markers, mask=fg)
    if cfg.min_size > 1:  # by hand: skimage 0.26 renamed min_size (the semantics changed with it)
        small = np.bincount(lab.ravel()) < int(cfg.min_size)
        small[0] = False
        lab[small[lab]] = 0
    lab, _, _ = relabel_sequential(lab)
    return lab.astype(label_dtype(int(lab.max())))


def drop_border_objects(labels: np.ndarray) -> np.ndarray:
    """Labels without the objects touching the image edge, renumbered 1..N (CellProfiler's
    "discard objects touching the border"): their measured shape and intensity are truncated."""
    from skimage.segmentation import clear_border, relabel_sequential

    lab = np.asarray(labels)
    if not lab.size or not lab.any():
        return lab
    out, _, _ = relabel_sequential(clear_border(lab))
    return out.astype(label_dtype(int(out.max())) if np.issubdtype(lab.dtype, np.unsignedinteger) else lab.dtype)
