"""Training targets from instance labels: a normalised distance map, foreground, optional flows.

The distance map is each object's Euclidean distance transform divided by its own maximum, so every
object -- large cell or small nucleus -- peaks at 1 in its centre and falls to 0 at its border
(DINOCell, SAMCell).  Touching objects stay apart because each transform is computed on its own
object only: the valley between two nuclei is what the watershed later cuts along.  Flows are the
unit gradient of that map (a Cellpose-like direction field, Stringer et al. 2021).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def distance_map(labels: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: per-object distance to the object's border, normalised per object."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    out = np.zeros(labels.shape, dtype=np.float32)
    for idx, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        # pad by one pixel so an object touching the crop edge still gets a border there
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        obj = labels[sl] == idx
        d = ndi.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
        peak = d.max()
        if peak > 0:
            out[sl][obj] = (d[obj] / peak).astype(np.float32)
    return out


def flow_field(distance: np.ndarray) -> np.ndarray:
    """(2, H, W) float32: unit gradient (dy, dx) of the distance map inside objects, 0 outside."""
    gy, gx = np.gradient(ndi.gaussian_filter(distance.astype(np.float32), 1.0))
    norm = np.sqrt(gy * gy + gx * gx) + 1e-6
    inside = distance > 0
    return np.stack([np.where(inside, gy / norm, 0.0), np.where(inside, gx / norm, 0.0)]).astype(np.float32)


def make_targets(labels: np.ndarray, flows: bool = False) -> np.ndarray:
    """Stacked targets (distance, foreground[, flow_y, flow_x]) as float32 (2 or 4, H, W)."""
    dist = distance_map(labels)
    parts = [dist[None], (np.asarray(labels) > 0).astype(np.float32)[None]]
    if flows:
        parts.append(flow_field(dist))
    return np.concatenate(parts)
