"""KoLeo loss against a brute-force nearest-neighbour computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinocell.losses.koleo import KoLeoLoss


def brute_force(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = [min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i) for i in range(len(x))]
    return float(-np.mean(np.log(np.asarray(d) + eps)))


@pytest.mark.parametrize(("b", "d"), [(2, 3), (5, 4), (16, 8)])
def test_matches_brute_force(b: int, d: int) -> None:
    x = np.random.default_rng(b).normal(size=(b, d)).astype(np.float32)
    assert KoLeoLoss()(torch.from_numpy(x)).item() == pytest.approx(brute_force(x), rel=1e-4)


def test_hand_example_square() -> None:
    # four unit vectors at 90 degrees: every nearest neighbour is sqrt(2) away (scale must not matter)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, -0.5]])
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)


def test_gradient_pushes_neighbours_apart() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], requires_grad=True)
    loss_fn = KoLeoLoss()
    before = loss_fn(x)
    before.backward()
    with torch.no_grad():
        after = loss_fn(x - 0.1 * x.grad)
    assert after < before


def test_single_sample_returns_zero_with_graph() -> None:
    x = torch.randn(1, 8, requires_grad=True)
    loss = KoLeoLoss()(x)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)


def test_duplicates_stay_finite() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_wrong_rank_raises() -> None:
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        KoLeoLoss()(torch.zeros(2, 3, 4, 5))


# Reference: dinov3 SSLMetaArch.compute_losses, koleo_scale * sum(KoLeoLoss()(x) for x in cls_pre_head) / n_global,
# run on seeded inputs with facebookresearch/dinov3 @ 6876159a11b4df116f30f667f8c9888617df0751.
OFFICIAL_KOLEO_MEAN_OVER_CROPS = -0.19839099049568176
OFFICIAL_KOLEO_TERM_PER_WEIGHT = -0.3967819809913635  # koleo_scale (= 2 global crops) x the mean


def test_global_crops_are_summed_like_official_dinov3() -> None:
    torch.manual_seed(0)
    cls = torch.randn(2, 8, 32)  # (n_global_crops, B, D)
    loss = KoLeoLoss()
    assert loss(cls).item() == pytest.approx(OFFICIAL_KOLEO_TERM_PER_WEIGHT, rel=1e-6)
    assert (loss(cls[0]) + loss(cls[1])).item() / 2 == pytest.approx(OFFICIAL_KOLEO_MEAN_OVER_CROPS, rel=1e-6)
