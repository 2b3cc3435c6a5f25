"""Sliding-window inference over fields of any size and aspect, with overlap blending.

Tiles of ``tile`` px (clamped to the field) start every ``tile * (1 - overlap)`` px and the last tile
of each row/column is aligned with the field's edge, so every pixel is covered and no tile reaches
outside the field (fields smaller than a tile are reflect-padded once).  Overlapping predictions are
blended with a separable ramp that is highest in the tile centre, where the decoder has most context;
a small floor keeps field edges (covered by a single tile edge) well defined.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dinocell.segment.model import SegmentationNet, activate
from dinocell.segment.scale import field_px, scaled_post
from dinocell.tiling import tile_starts


def blend_window(h: int, w: int, floor: float = 0.05) -> np.ndarray:
    """(h, w) weights: a triangular ramp per axis, maximal in the centre, never below ``floor``."""
    def ramp(n: int) -> np.ndarray:
        x = (np.arange(n, dtype=np.float32) + 0.5) / n
        return np.maximum(1.0 - np.abs(2.0 * x - 1.0), floor)

    return np.outer(ramp(h), ramp(w)).astype(np.float32)


@torch.no_grad()
def sliding_window(net: SegmentationNet, image: np.ndarray, tile: int = 256, overlap: float = 0.25,
                   batch_size: int = 8, device: Any = None) -> np.ndarray:
    """Activated maps (distance, foreground[, flows]) of images in [0, 1].

    ``image`` is one (H, W) plane -> (K, H, W), or a stack (N, H, W) -> (N, K, H, W); the tiles of
    all planes of a stack share forward batches (one field's channels are segmented together).
    """
    img = np.asarray(image, dtype=np.float32)
    single = img.ndim == 2
    if single:
        img = img[None]
    if img.ndim != 3:
        raise ValueError(f"expected (H, W) or (N, H, W) planes, got shape {img.shape}")
    n, h, w = img.shape
    ph, pw = max(0, tile - h), max(0, tile - w)
    if ph or pw:  # smaller than one tile: pad once, predict, crop back
        mode = "reflect" if ph < h and pw < w else "edge"
        img = np.pad(img, ((0, 0), (0, ph), (0, pw)), mode=mode)
    hh, ww = img.shape[1:]
    th, tw = min(tile, hh), min(tile, ww)
    stride_h, stride_w = max(1, int(th * (1 - overlap))), max(1, int(tw * (1 - overlap)))
    boxes = [(k, y, x) for k in range(n) for y in tile_starts(hh, th, stride_h)
             for x in tile_starts(ww, tw, stride_w)]
    device = device or next(net.parameters()).device
    was_training = net.training
    net.eval()
    acc = np.zeros((n, net.n_outputs, hh, ww), dtype=np.float32)
    weight = np.zeros((hh, ww), dtype=np.float32)
    win = blend_window(th, tw)
    for _, y, x0 in boxes[: len(boxes) // n]:  # the same tiling for every plane
        weight[y:y + th, x0:x0 + tw] += win
    try:
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i:i + batch_size]
            x = torch.from_numpy(np.stack([img[k, y:y + th, x0:x0 + tw] for k, y, x0 in chunk]))[:, None]
            out = activate(net(x.to(device))).float().cpu().numpy()
            for (k, y, x0), o in zip(chunk, out, strict=True):
                acc[k, :, y:y + th, x0:x0 + tw] += o * win
    finally:
        net.train(was_training)
    maps = (acc / weight)[:, :, :h, :w]
    return maps[0] if single else maps


def segment_image(net: SegmentationNet, image: np.ndarray, cfg: Any, device: Any = None) -> np.ndarray:
    """Instance labels of one (H, W) image, or a list of them for a stack (N, H, W): sliding window,
    then peaks + watershed (then, with ``task.drop_border_objects``, no object touching the edge).

    ``cfg`` is a :class:`dinocell.segment.config.SegmentConfig`.  The tile and the post-processing
    distances are in backbone pixels: at the run's ``input_scale`` a field tile is ``tile / scale`` px.
    """
    from dinocell.segment.postprocess import drop_border_objects, instances

    scale = net.input_scale
    tile = field_px(cfg.infer.tile, scale)
    post = scaled_post(cfg.post, scale)
    maps = sliding_window(net, image, tile, cfg.infer.overlap, cfg.infer.batch_size, device)
    drop = bool(cfg.task.drop_border_objects)
    stack = maps[None] if maps.ndim == 3 else maps
    out = [instances(m[0], m[1], post) for m in stack]
    out = [drop_border_objects(lab) if drop else lab for lab in out]
    return out[0] if maps.ndim == 3 else out  # type: ignore[return-value]
