"""Reinhard stain normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinocell.config import StainConfig
from dinocell.errors import ConfigError, DataError
from dinocell.stain import StainNormalizer, fit_reinhard_target, reinhard_normalize, rgb_to_lab


def he_like(seed: int = 0, h: int = 64, w: int = 64) -> np.ndarray:
    """A smooth pink/purple image (in gamut, like an H&E tile) as (3,H,W) float32 in [0,1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    t = 0.5 + 0.25 * np.sin(6 * xx + 2 * rng.random()) * np.cos(5 * yy)
    noise = 0.03 * rng.standard_normal((h, w))
    r = 0.85 - 0.25 * t + noise
    g = 0.55 - 0.35 * t + noise
    b = 0.75 - 0.10 * t + noise
    return np.clip(np.stack([r, g, b]), 0, 1).astype(np.float32)


def lab_stats(img) -> tuple[np.ndarray, np.ndarray]:
    lab = rgb_to_lab(img).reshape(-1, 3).astype(np.float64)
    return lab.mean(0), lab.std(0)


def test_lab_ranges_of_known_colours() -> None:
    white = np.ones((3, 2, 2), np.float32)
    black = np.zeros((3, 2, 2), np.float32)
    assert rgb_to_lab(white)[..., 0] == pytest.approx(100.0, abs=0.1)
    assert rgb_to_lab(black)[..., 0] == pytest.approx(0.0, abs=0.1)
    # uint8 input is scaled by 1/255
    np.testing.assert_allclose(rgb_to_lab(np.full((3, 2, 2), 255, np.uint8)), rgb_to_lab(white), atol=1e-3)


def test_output_matches_target_statistics() -> None:
    src = he_like(0)
    ref = he_like(1)
    ref = np.clip(ref * np.array([0.9, 1.05, 0.95], np.float32)[:, None, None] + 0.03, 0, 1)
    means, stds = fit_reinhard_target(ref)
    out = reinhard_normalize(src, means, stds)
    assert out.shape == src.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    m, s = lab_stats(out)
    np.testing.assert_allclose(m, means, atol=0.5)
    np.testing.assert_allclose(s, stds, rtol=0.05, atol=0.2)
    # and it really moved: the source statistics were different
    m0, _ = lab_stats(src)
    assert np.abs(m0 - np.asarray(means)).max() > 2.0


def test_default_targets_reached_on_he_like_tile() -> None:
    cfg = StainConfig(use_stain_norm=True)
    out = StainNormalizer(cfg)(he_like(2))
    m, s = lab_stats(out)
    np.testing.assert_allclose(m, cfg.target_means, atol=1.5)
    np.testing.assert_allclose(s, cfg.target_stds, rtol=0.1, atol=0.5)


def test_round_trip_identity_with_own_statistics() -> None:
    img = he_like(3)
    means, stds = fit_reinhard_target(img)
    out = StainNormalizer(StainConfig(use_stain_norm=True, target_means=means, target_stds=stds))(img)
    np.testing.assert_allclose(out, img, atol=2e-3)


def test_tensor_in_tensor_out() -> None:
    img = torch.from_numpy(he_like(4))
    out = StainNormalizer(StainConfig(use_stain_norm=True))(img)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == img.shape


def test_uint8_input_accepted() -> None:
    img = (he_like(5) * 255).round().astype(np.uint8)
    out = StainNormalizer(StainConfig(use_stain_norm=True))(img)
    assert out.dtype == np.float32 and out.shape == img.shape


def test_disabled_is_identity() -> None:
    img = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    assert StainNormalizer(StainConfig(use_stain_norm=False))(img) is img


def test_constant_channel_does_not_divide_by_zero() -> None:
    img = np.full((3, 8, 8), 0.5, np.float32)
    out = reinhard_normalize(img, [60.0, 10.0, -5.0], [10.0, 5.0, 5.0])
    assert np.isfinite(out).all()
    m, s = lab_stats(out)
    np.testing.assert_allclose(m, [60.0, 10.0, -5.0], atol=0.5)
    np.testing.assert_allclose(s, 0.0, atol=0.05)


@pytest.mark.parametrize("shape", [(5, 8, 8), (1, 8, 8), (4, 8, 8)])
def test_wrong_channel_count_is_an_error(shape) -> None:
    norm = StainNormalizer(StainConfig(use_stain_norm=True))
    with pytest.raises(DataError, match=rf"stain normalisation needs RGB \(3 channels\), got {shape[0]}"):
        norm(np.zeros(shape, np.float32))


def test_bad_target_length_is_config_error() -> None:
    with pytest.raises(ConfigError, match="3 values"):
        StainNormalizer(StainConfig(use_stain_norm=True, target_means=[1.0, 2.0]))
