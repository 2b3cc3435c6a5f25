from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from dinocell.config import ScalingConfig
from dinocell.data.decode import percentile_scale, read_image, scale_field
from dinocell.errors import DataError


def test_real_lzw_fixture(cpg0000_site: Path) -> None:
    files = sorted(cpg0000_site.glob("*.tiff"))
    assert len(files) == 3
    with tifffile.TiffFile(files[0]) as tf:
        assert tf.pages[0].compression == tifffile.COMPRESSION.LZW
    arr = read_image(files[0])
    assert arr.shape == (1080, 1080) and arr.dtype == np.uint16
    raw = np.stack([read_image(f) for f in files])
    out = scale_field(raw, ScalingConfig())
    assert out.dtype == np.float32 and out.shape == (3, 1080, 1080)
    assert out.min() == 0.0 and out.max() == 1.0
    # 0.1 / 99.9 percentile clipping: about 0.1% of pixels saturate at each end
    for c in range(3):
        assert (out[c] >= 1.0).mean() < 0.01
        assert 0.01 < out[c].mean() < 0.9


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4000, size=(64, 64)).astype(np.uint16)
    out = percentile_scale(img, 1.0, 99.0)
    lo, hi = np.percentile(img, [1.0, 99.0], method="inverted_cdf")
    expected = np.clip((img.astype(np.float32) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_8bit_and_float_and_clahe(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img8 = rng.integers(0, 255, size=(40, 50)).astype(np.uint8)
    p = tmp_path / "a.tif"
    tifffile.imwrite(p, img8, compression="lzw")
    assert read_image(p).dtype == np.uint8
    field = np.stack([img8, img8])
    out = scale_field(field, ScalingConfig(clahe=True))
    assert out.shape == (2, 40, 50) and 0 <= out.min() and out.max() <= 1
    const = np.full((2, 8, 8), 7, dtype=np.uint16)
    assert scale_field(const, ScalingConfig()).max() == 0.0


def test_corrupt_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tiff"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match="cannot decode image"):
        read_image(bad)
    with pytest.raises(DataError, match="image not found"):
        read_image(tmp_path / "nope.tiff")
    with pytest.raises(DataError, match="cannot decode"):
        read_image(b"not a tiff")


def test_subsampled_percentiles_close_to_exact(cpg0000_site: Path) -> None:
    """Large images estimate percentiles from every other row/column; on real JUMP data the scaled
    image stays within one percent of the exact scaling."""
    img = read_image(sorted(cpg0000_site.glob("*.tiff"))[0])
    fast = percentile_scale(img, 0.1, 99.9)
    lo, hi = np.percentile(img, [0.1, 99.9], method="inverted_cdf")
    exact = np.clip((img.astype(np.float32) - lo) / (hi - lo), 0, 1)
    assert np.abs(fast - exact).max() < 0.01
