"""iBOT masked-patch loss against the per-image-averaged formula."""

from __future__ import annotations

import math

import pytest
import torch

from dinocell.losses.ibot import iBOTPatchLoss
from dinocell.losses.sinkhorn import sinkhorn_knopp


def test_hand_check_uniform_student() -> None:
    # zero logits: each masked patch's CE is log K = log 2.  Image A has 1 masked patch (weight 1),
    # image B has 2 (weight 1/2 each), image C none; 3 images -> (1*log2 + 2*0.5*log2) / 3
    s = torch.zeros(3, 2)
    t = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])
    w = torch.tensor([1.0, 0.5, 0.5])
    loss = iBOTPatchLoss(student_temp=0.1).forward_masked(s, t, w, n_images=3)
    assert loss.item() == pytest.approx(2 * math.log(2) / 3, rel=1e-6)


def test_matches_direct_formula() -> None:
    s = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.4, 0.1], [-0.5, 0.5, 0.0]])
    t = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])
    w = torch.tensor([0.5, 0.5, 1.0])
    temp = 0.2
    expected = 0.0
    for m in range(3):
        z = [v / temp for v in s[m].tolist()]
        lse = math.log(sum(math.exp(v) for v in z))
        expected -= w[m].item() * sum(p * (v - lse) for p, v in zip(t[m].tolist(), z, strict=True))
    expected /= 4  # 4 images: two with masks, two without
    loss = iBOTPatchLoss(student_temp=temp)(s, t, w, 4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_each_image_weighs_the_same() -> None:
    # image 0: 1 masked patch, image 1: 3 masked patches, all with the same CE -> loss = that CE
    s = torch.tensor([[2.0, 0.0]]).repeat(4, 1)
    t = torch.tensor([[0.0, 1.0]]).repeat(4, 1)
    w = torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3])
    one = iBOTPatchLoss()(s[:1], t[:1], w[:1], 1)
    both = iBOTPatchLoss()(s, t, w, 2)
    assert both.item() == pytest.approx(one.item(), rel=1e-6)


def test_no_masked_patch_gives_zero_with_graph() -> None:
    s = torch.zeros(0, 5, requires_grad=True)
    loss = iBOTPatchLoss()(s, torch.zeros(0, 5), torch.zeros(0), 4)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable: DDP needs every rank to produce a graph


def test_teacher_probs_uses_first_n_masked_rows() -> None:
    logits = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    loss_fn = iBOTPatchLoss(sinkhorn_iterations=3)
    probs = loss_fn.teacher_probs(logits, teacher_temp=0.05, n_masked_patches=5)
    assert probs.shape == (5, 4)
    torch.testing.assert_close(probs, sinkhorn_knopp(logits[:5], 0.05, 3))
    assert loss_fn.teacher_probs(logits, 0.05).shape == (7, 4)
    with pytest.raises(ValueError, match="n_masked_patches=8"):
        loss_fn.teacher_probs(logits, 0.05, n_masked_patches=8)


def test_errors() -> None:
    loss_fn = iBOTPatchLoss()
    with pytest.raises(ValueError, match=r"both be \(M, K\)"):
        loss_fn(torch.zeros(3, 4), torch.zeros(3, 5), torch.ones(3), 1)
    with pytest.raises(ValueError, match="masks_weight"):
        loss_fn(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2), 1)
    with pytest.raises(ValueError, match="n_images"):
        loss_fn(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3), 0)
