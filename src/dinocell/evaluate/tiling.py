"""How a whole field meets a model trained on small crops: the patch-grid / resize policy of ``embed``.

A ViT pretrained on 224-px crops of 1080-px fields has learned cells at the *native* magnification,
224 px wide.  Squashing the whole field into 224 px shows it cells five times smaller than anything it
saw, and squashing a non-square field also distorts them.  So nothing is resized here:

* ``tiles`` (default): tiles of the training crop size, laid over the field so that they cover it
  completely; when the field is not a whole number of tiles, neighbouring tiles overlap by the
  smallest amount that covers it (evenly spread), never pad.  Each view's embedding is the mean over
  its tiles.  A field side shorter than the tile is used whole (rounded down to the patch size).
* ``full``: the whole field at native resolution in one forward pass (DINOv3's RoPE takes any grid),
  centre-cropped by less than one patch to a multiple of the patch size.  Non-square stays
  non-square.  Costs O(tokens²) attention: fine on a GPU for 1080² at patch 16 (4.5k tokens).
"""

from __future__ import annotations

import torch

from dinocell.errors import ConfigError
from dinocell.models.loading import crop_to_patches
from dinocell.tiling import tile_starts

GEOMETRIES = ("tiles", "full")


def field_tiles(views: torch.Tensor, geometry: str, tile: int, patch: int) -> torch.Tensor:
    """(V, c, H, W) views of one field -> (V, T, c, h, w) model inputs (T tiles per view).

    ``full``: T = 1, the field cropped to patch multiples.  ``tiles``: tiles of ``tile`` px (rounded
    down to the patch size; a side shorter than the tile is used whole) per :func:`dinocell.tiling.tile_starts`.
    """
    if geometry not in GEOMETRIES:
        raise ConfigError(f"unknown geometry '{geometry}'; choose one of {', '.join(GEOMETRIES)}")
    x = crop_to_patches(views, patch)
    if geometry == "full":
        return x[:, None]
    t = max(patch, tile // patch * patch)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    th, tw = min(t, h), min(t, w)
    tiles = [x[..., i:i + th, j:j + tw] for i in tile_starts(h, th) for j in tile_starts(w, tw)]
    return torch.stack(tiles, dim=1)


__all__ = ["GEOMETRIES", "field_tiles"]
