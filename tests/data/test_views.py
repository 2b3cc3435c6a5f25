"""Multi-view augmentation: shapes, channel semantics, determinism, policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinocell.config import ViewsConfig
from dinocell.data.views import MEAN_VIEW, MultiViewAugmentation, gaussian_blur, random_resized_crop_box
from dinocell.errors import ConfigError, DataError


def small_cfg(**kw) -> ViewsConfig:
    base = dict(global_crop_size=32, local_crop_size=16, n_local_crops=4)
    base.update(kw)
    return ViewsConfig(**base)


def plain_cfg(**kw) -> ViewsConfig:
    """No intensity or geometric augmentation, whole-field crops: output is a pure function of input."""
    base = dict(global_scale=[1.0, 1.0], local_scale=[1.0, 1.0], hflip_prob=0.0, vflip_prob=0.0,
                jitter_prob=0.0, blur_prob_global1=0.0, blur_prob_global2=0.0, blur_prob_local=0.0,
                solarize_prob_global2=0.0)
    base.update(kw)
    return small_cfg(**base)


def field(c: int, h: int = 48, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, h, w, generator=g)


@pytest.mark.parametrize("c", [1, 3, 5])
def test_output_shapes_and_dtypes(c: int) -> None:
    aug = MultiViewAugmentation(small_cfg(), [True] * c)
    out = aug(field(c), torch.Generator().manual_seed(1))
    assert set(out) == {"global_crops", "local_crops", "global_channels", "local_channels", "aligned"}
    assert out["aligned"] is False
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 4
    for t in out["global_crops"]:
        assert t.shape == (1, 32, 32) and t.dtype == torch.float32 and t.is_contiguous()
    for t in out["local_crops"]:
        assert t.shape == (1, 16, 16) and t.dtype == torch.float32
    assert out["global_channels"][0] == MEAN_VIEW
    assert 0 <= out["global_channels"][1] < c
    assert len(out["local_channels"]) == 4
    assert all(ch == MEAN_VIEW or 0 <= ch < c for ch in out["local_channels"])
    for t in out["global_crops"] + out["local_crops"]:
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1


def test_global1_is_mean_of_fluorescent_channels() -> None:
    x = field(5, 32, 32)
    out = MultiViewAugmentation(plain_cfg(), [True] * 5)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["global_crops"][0][0], x.mean(0), rtol=0, atol=1e-6)


def test_global1_mean_is_resized_after_averaging() -> None:
    x = field(3, 64, 64)
    out = MultiViewAugmentation(plain_cfg(), [True] * 3)(x, torch.Generator().manual_seed(0))
    expected = F.interpolate(x.mean(0)[None, None], size=(32, 32), mode="bilinear", align_corners=False,
                             antialias=True)[0, 0]
    torch.testing.assert_close(out["global_crops"][0][0], expected, rtol=0, atol=1e-5)


def test_global1_mean_inside_a_sub_crop_matches_direct_computation() -> None:
    # Reproduce the crop box with an identically seeded generator (it is the first draw).
    cfg = plain_cfg(global_scale=[0.3, 0.5])
    x = field(4, 80, 96)
    out = MultiViewAugmentation(cfg, [True] * 4, ratio=(1.0, 1.0))(x, torch.Generator().manual_seed(7))
    top, left, h, w = random_resized_crop_box(80, 96, cfg.global_scale, (1.0, 1.0),
                                              torch.Generator().manual_seed(7))
    assert h < 80 and w < 96
    box = x[:, top:top + h, left:left + w].mean(0)
    expected = F.interpolate(box[None, None], size=(32, 32), mode="bilinear", align_corners=False,
                             antialias=True)[0, 0]
    torch.testing.assert_close(out["global_crops"][0][0], expected, rtol=0, atol=1e-5)


def test_global2_equals_one_channel() -> None:
    x = field(5, 32, 32)
    aug = MultiViewAugmentation(plain_cfg(), [True] * 5)
    seen = set()
    for seed in range(30):
        out = aug(x, torch.Generator().manual_seed(seed))
        ch = out["global_channels"][1]
        torch.testing.assert_close(out["global_crops"][1][0], x[ch], rtol=0, atol=0)
        seen.add(ch)
    assert seen == set(range(5))  # uniform choice reaches every channel in 30 draws


def test_brightfield_excluded_from_mean_and_single_views() -> None:
    x = field(4, 32, 32)
    x[1] = 1.0  # brightfield channels with a value no fluorescent channel has
    x[3] = 0.0
    flags = [True, False, True, False]
    aug = MultiViewAugmentation(plain_cfg(n_local_crops=6), flags)
    for seed in range(20):
        out = aug(x, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out["global_crops"][0][0], (x[0] + x[2]) / 2, rtol=0, atol=1e-6)
        assert out["global_channels"][1] in (0, 2)
        assert all(ch in (MEAN_VIEW, 0, 2) for ch in out["local_channels"])


def test_all_channel_pool_can_pick_brightfield() -> None:
    aug = MultiViewAugmentation(plain_cfg(), [True, False], single_channel_from="all")
    chosen = {aug(field(2, 32, 32), torch.Generator().manual_seed(s))["global_channels"][1] for s in range(20)}
    assert chosen == {0, 1}


def test_local_mean_fraction() -> None:
    cfg = small_cfg(global_crop_size=8, local_crop_size=8, n_local_crops=50, local_mean_prob=0.3)
    aug = MultiViewAugmentation(cfg, [True] * 3)
    g = torch.Generator().manual_seed(3)
    chans = [c for _ in range(40) for c in aug(field(3, 16, 16), g)["local_channels"]]
    frac = np.mean([c == MEAN_VIEW for c in chans])
    assert abs(frac - 0.3) < 0.05, frac
    # the single-channel locals spread over all channels
    assert {c for c in chans if c != MEAN_VIEW} == {0, 1, 2}


def test_local_mean_crop_is_the_mean() -> None:
    x = field(3, 16, 16)
    cfg = plain_cfg(local_crop_size=16, n_local_crops=10)
    out = MultiViewAugmentation(cfg, [True] * 3)(x, torch.Generator().manual_seed(0))
    for crop, ch in zip(out["local_crops"], out["local_channels"], strict=True):
        expected = x.mean(0) if ch == MEAN_VIEW else x[ch]
        torch.testing.assert_close(crop[0], expected, rtol=0, atol=1e-6)


def test_determinism_with_seeded_generator() -> None:
    aug = MultiViewAugmentation(small_cfg(), [True] * 5)
    x = field(5)
    a = aug(x, torch.Generator().manual_seed(123))
    b = aug(x, torch.Generator().manual_seed(123))
    c = aug(x, torch.Generator().manual_seed(124))
    assert a["global_channels"] == b["global_channels"] and a["local_channels"] == b["local_channels"]
    for ta, tb in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"], strict=True):
        assert torch.equal(ta, tb)
    assert not all(torch.equal(ta, tc) for ta, tc in zip(a["local_crops"], c["local_crops"], strict=True))


def test_generator_is_the_only_randomness() -> None:
    aug = MultiViewAugmentation(small_cfg(), [True] * 3)
    x = field(3)
    torch.manual_seed(0)
    a = aug(x, torch.Generator().manual_seed(5))
    torch.manual_seed(99)  # the global RNG must not matter when a generator is given
    b = aug(x, torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a["local_crops"], b["local_crops"], strict=True))


def test_single_view_policy_uses_mean_everywhere() -> None:
    x = field(5, 32, 32)
    out = MultiViewAugmentation(plain_cfg(policy="single_view"), [True] * 5)(x, torch.Generator().manual_seed(0))
    assert out["global_channels"] == [MEAN_VIEW, MEAN_VIEW]
    assert out["local_channels"] == [MEAN_VIEW] * 4
    torch.testing.assert_close(out["global_crops"][1][0], x.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["global_crops"][0], out["global_crops"][1])


def test_solarize_and_flip_are_applied() -> None:
    x = field(1, 32, 32)
    aug = MultiViewAugmentation(plain_cfg(solarize_prob_global2=1.0, hflip_prob=1.0), [True])
    out = aug(x, torch.Generator().manual_seed(0))
    flipped = x[0].flip(-1)
    torch.testing.assert_close(out["global_crops"][0][0], flipped)
    torch.testing.assert_close(out["global_crops"][1][0], torch.where(flipped >= 0.5, 1 - flipped, flipped))


def test_jitter_changes_intensity_and_stays_in_range() -> None:
    x = field(2, 32, 32)
    aug = MultiViewAugmentation(plain_cfg(jitter_prob=1.0), [True, True])
    out = aug(x, torch.Generator().manual_seed(0))
    g1 = out["global_crops"][0][0]
    assert not torch.allclose(g1, x.mean(0), atol=1e-3)
    assert g1.min() >= 0 and g1.max() <= 1


def test_gaussian_blur_preserves_constant_and_smooths() -> None:
    const = torch.full((16, 16), 0.25)
    torch.testing.assert_close(gaussian_blur(const, 1.5), const)
    noise = field(1, 32, 32)[0]
    blurred = gaussian_blur(noise, 2.0)
    assert blurred.shape == noise.shape
    assert blurred.std() < 0.5 * noise.std()
    torch.testing.assert_close(blurred.mean(), noise.mean(), rtol=0, atol=0.02)


def test_crop_box_within_bounds_and_scale() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(100, 120, (0.05, 0.32), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 120
        assert 0.04 <= h * w / 12000 <= 0.34
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


def test_numpy_field_accepted() -> None:
    x = field(2, 32, 32).numpy()
    out = MultiViewAugmentation(plain_cfg(), [True, True])(x, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(out["global_crops"][0][0].numpy(), x.mean(0), atol=1e-6)


def test_no_fluorescent_channel_is_an_error() -> None:
    with pytest.raises(DataError, match="at least one fluorescent channel"):
        MultiViewAugmentation(small_cfg(), [False, False])


def test_channel_count_mismatch_is_an_error() -> None:
    aug = MultiViewAugmentation(small_cfg(), [True] * 3)
    with pytest.raises(DataError, match="field has 5 channels but 3"):
        aug(field(5))
    with pytest.raises(DataError, match="C×H×W"):
        aug(torch.rand(32, 32))


# ------------------------------------------------------------------------------ policies of issue #12


def _striped(c: int, h: int = 48, w: int = 48) -> torch.Tensor:
    """Channel k is a ramp scaled by (k + 1): a crop's box and flips can be read back from any channel."""
    ramp = torch.arange(h * w, dtype=torch.float32).view(h, w) / (h * w)
    return torch.stack([ramp * (k + 1) / c for k in range(c)])


def _plain(**kw: object) -> MultiViewAugmentation:
    """No photometric jitter, so aligned crops must be exact rescalings of each other."""
    return MultiViewAugmentation(small_cfg(jitter_prob=0.0, blur_prob_global1=0.0, blur_prob_global2=0.0,
                                     solarize_prob_global2=0.0, **kw), [True] * 5)


def test_channel_pairs_draws_two_different_fluorescent_channels() -> None:
    aug = MultiViewAugmentation(small_cfg(policy="channel_pairs"), [True, True, False, True])
    seen = set()
    for seed in range(40):
        out = aug(field(4), torch.Generator().manual_seed(seed))
        a, b = out["global_channels"]
        assert a != b and MEAN_VIEW not in (a, b) and 2 not in (a, b)
        seen.add((a, b))
    assert len(seen) == 6  # every ordered pair of the 3 fluorescent channels


def test_channel_pairs_mean_global_adds_a_third_crop() -> None:
    aug = MultiViewAugmentation(small_cfg(policy="channel_pairs", mean_global=True), [True] * 5)
    out = aug(field(5), torch.Generator().manual_seed(0))
    assert aug.n_global_crops == 3 and len(out["global_crops"]) == 3
    assert out["global_channels"][2] == MEAN_VIEW and MEAN_VIEW not in out["global_channels"][:2]


def test_all_channels_has_every_fluorescent_channel_and_the_mean_aligned() -> None:
    aug = MultiViewAugmentation(small_cfg(policy="all_channels"), [True, False, True, True])
    out = aug(field(4), torch.Generator().manual_seed(0))
    assert out["global_channels"] == [0, 2, 3, MEAN_VIEW]
    assert aug.n_global_crops == 4 and out["aligned"] is True


@pytest.mark.parametrize("policy", ["multiview", "channel_pairs", "all_channels"])
def test_aligned_globals_share_box_and_flips(policy: str) -> None:
    """Channel k of the striped field is (k+1)/C × the same ramp: aligned crops of channels a and b
    are exact multiples of each other (same box, same flips), the mean view likewise."""
    aug = _plain(policy=policy, aligned_globals=True, hflip_prob=0.5, vflip_prob=0.5)
    f = _striped(5)
    for seed in range(8):
        out = aug(f, torch.Generator().manual_seed(seed))
        crops, chans = out["global_crops"], out["global_channels"]
        ref = crops[0] / (chans[0] + 1 if chans[0] != MEAN_VIEW else 3.0)
        for crop, ch in zip(crops, chans, strict=True):
            scale = ch + 1 if ch != MEAN_VIEW else 3.0  # mean of (1..5)/5 = 3/5; ramps are /5
            torch.testing.assert_close(crop / scale, ref, rtol=1e-5, atol=1e-6)


def test_unaligned_globals_use_different_boxes() -> None:
    aug = _plain(policy="channel_pairs", global_scale=[0.3, 0.5])
    f = _striped(5)
    differ = 0
    for seed in range(8):
        out = aug(f, torch.Generator().manual_seed(seed))
        (a, b), (ca, cb) = out["global_crops"], out["global_channels"]
        differ += not torch.allclose(a / (ca + 1), b / (cb + 1), atol=1e-4)
    assert differ >= 6


def test_pair_policies_need_two_fluorescent_channels() -> None:
    with pytest.raises(ConfigError, match="at least two fluorescent"):
        MultiViewAugmentation(small_cfg(policy="channel_pairs"), [True, False])


def test_seed_policy_draws_are_unchanged_by_the_new_options() -> None:
    """aligned_globals=False keeps the seed's exact draw order (demo results stay reproducible)."""
    base = MultiViewAugmentation(small_cfg(), [True] * 5)
    again = MultiViewAugmentation(small_cfg(mean_global=True), [True] * 5)  # ignored outside channel_pairs
    a = base(field(5), torch.Generator().manual_seed(3))
    b = again(field(5), torch.Generator().manual_seed(3))
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"], strict=True):
        assert torch.equal(x, y)
