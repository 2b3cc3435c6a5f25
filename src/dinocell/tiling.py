"""Where tiles start along one side of an image: a shared leaf.

Why a leaf of its own: ``evaluate`` (the field embedder's tiles) and ``segment`` (sliding-window
inference) lay tiles over a side the same way — every pixel covered, no tile past the edge, the last
tile flush with it — and differ only in how far apart tiles start, so the one rule sits below both.
"""

from __future__ import annotations

import math


def tile_starts(length: int, tile: int, stride: int | None = None) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``, the last one ending at ``length``.

    ``stride=None`` (embedding): the fewest tiles, ``ceil(length / tile)``, exact when ``tile`` divides
    ``length``, otherwise with the overlap spread evenly.  ``stride`` (sliding-window inference): a tile every
    ``stride`` px, plus one flush with the end.  ``tile >= length`` gives one tile at 0.
    """
    if tile >= length:
        return [0]
    if stride is None:
        n = math.ceil(length / tile)
        return [round(i * (length - tile) / (n - 1)) for i in range(n)]
    return [*range(0, length - tile, max(1, stride)), length - tile]


__all__ = ["tile_starts"]
