"""The one image reader (``decode_image``) and the callers that give its array a meaning: the same bytes
decode the same way for training fields, labelled evaluation images, segmentation masks and TIFF volumes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from dinocell.data.decode import decode_image, read_image
from dinocell.errors import DataError
from dinocell.evaluate.run import read_multichannel
from dinocell.segment.data import read_mask


def _rgb_png(path: Path) -> np.ndarray:
    """Writes a colour PNG (OpenCV stores BGR) and returns its RGB array."""
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 10
    cv2.imwrite(str(path), rgb[..., ::-1])
    return rgb


def test_path_and_bytes_decode_alike_and_colour_is_rgb(tmp_path: Path) -> None:
    rgb = _rgb_png(tmp_path / "c.png")
    from_path = decode_image(tmp_path / "c.png")
    from_bytes = decode_image((tmp_path / "c.png").read_bytes())
    assert np.array_equal(from_path, rgb) and np.array_equal(from_bytes, rgb)
    stack = np.arange(2 * 9 * 10, dtype=np.uint16).reshape(2, 9, 10)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    assert np.array_equal(decode_image(tmp_path / "s.tif"), stack)
    assert np.array_equal(decode_image((tmp_path / "s.tif").read_bytes()), stack)
    (tmp_path / "noext").write_bytes((tmp_path / "s.tif").read_bytes())  # sniffed by its magic bytes
    assert np.array_equal(decode_image(tmp_path / "noext"), stack)


def test_errors_name_what_was_read(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="^mask not found: "):
        decode_image(tmp_path / "m.png", "mask")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    with pytest.raises(DataError, match="^cannot decode mask .*bad.png"):
        decode_image(tmp_path / "bad.png", "mask")
    with pytest.raises(DataError, match="^cannot decode TIFF stack s3://b/v.tif"):
        decode_image(b"II*\x00garbage", "TIFF stack", name="s3://b/v.tif")


def test_every_caller_reads_through_the_one_reader(tmp_path: Path) -> None:
    rgb = _rgb_png(tmp_path / "c.png")
    assert np.array_equal(read_multichannel(tmp_path / "c.png"), np.moveaxis(rgb, -1, 0))
    assert np.array_equal(read_image(tmp_path / "c.png"), rgb.mean(axis=2).astype(np.uint8))  # grey mean
    labels = np.zeros((16, 16), np.uint32)
    labels[2:6, 2:6], labels[9:14, 9:14] = 70000, 3  # beyond uint16: never clipped
    tifffile.imwrite(tmp_path / "m.tif", labels)
    assert np.array_equal(read_mask(str(tmp_path / "m.tif")), labels)
    with pytest.raises(DataError, match="mask not found"):
        read_mask(str(tmp_path / "none.tif"))
    with pytest.raises(DataError, match="image not found"):
        read_multichannel(tmp_path / "none.png")
