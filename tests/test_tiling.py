"""The one tiling rule: the embedder's fewest evenly overlapping tiles and the sliding window's strided tiles."""

from __future__ import annotations

import pytest

from dinocell.tiling import tile_starts


def test_fewest_tiles_cover_exactly_or_with_even_overlap() -> None:
    assert tile_starts(96, 32) == [0, 32, 64]  # exact tiling
    assert tile_starts(100, 32) == [0, 23, 45, 68]  # 4 tiles, last one flush with the edge
    assert tile_starts(20, 32) == [0]


def test_strided_tiles_start_every_stride_and_end_flush() -> None:
    assert tile_starts(100, 32, 32) == [0, 32, 64, 68]
    assert tile_starts(96, 32, 32) == [0, 32, 64]  # no duplicate when the stride lands on the edge
    assert tile_starts(20, 64, 48) == [0]


@pytest.mark.parametrize("length,tile,stride", [(1224, 256, 192), (904, 256, 192), (64, 64, 48), (100, 30, 7),
                                                (1080, 224, None), (37, 8, None)])
def test_every_pixel_is_covered_and_no_tile_passes_the_edge(length: int, tile: int, stride: int | None) -> None:
    starts = tile_starts(length, tile, stride)
    assert starts[0] == 0 and starts[-1] == length - tile and starts == sorted(set(starts))
    assert all(b - a <= tile for a, b in zip(starts, starts[1:], strict=False))
