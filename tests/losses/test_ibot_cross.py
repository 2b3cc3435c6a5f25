"""Cross-channel iBOT: the pairing matrix and the loss against explicit pairwise cross-entropies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinocell.losses.ibot import iBOTPatchLoss
from dinocell.losses.ibot_cross import CrossChannelIBOTLoss, cross_channel_pairing


def test_pairing_matrix() -> None:
    p = cross_channel_pairing(3)
    expected = torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(cross_channel_pairing(4, include_self=True), torch.full((4, 4), 0.25))
    with pytest.raises(ValueError, match="at least 2"):
        cross_channel_pairing(1)


def _explicit(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, g: int, n_images: int, temp: float) -> torch.Tensor:
    """Mean over teacher crops j != k of the per-image-weighted CE, summed over student crops k."""
    m = s.shape[0] // g
    s, t, w = s.view(g, m, -1), t.view(g, m, -1), w.view(g, m)
    total = torch.zeros(())
    for k in range(g):
        log_p = F.log_softmax(s[k] / temp, dim=-1)
        others = [j for j in range(g) if j != k]
        for j in others:
            total = total - ((t[j] * log_p).sum(-1) * w[k]).sum() / len(others)
    return total / n_images


def test_loss_equals_mean_of_pairwise_cross_entropies() -> None:
    g, m, k = 3, 5, 16
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(g * m, k, generator=gen, requires_grad=True)
    t = torch.softmax(torch.randn(g * m, k, generator=gen), dim=-1)
    w = torch.rand(g * m, generator=gen)
    ibot = iBOTPatchLoss(student_temp=0.1)
    loss = CrossChannelIBOTLoss(ibot)(s, t, w, n_images=6, pairing=cross_channel_pairing(g))
    ref = _explicit(s, t, w, g, n_images=6, temp=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (ga,) = torch.autograd.grad(loss, s)
    (gb,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_identity_pairing_is_plain_ibot() -> None:
    g, m, k = 2, 4, 8
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(g * m, k, generator=gen)
    t = torch.softmax(torch.randn(g * m, k, generator=gen), dim=-1)
    w = torch.full((g * m,), 0.25)
    ibot = iBOTPatchLoss(student_temp=0.1)
    cross = CrossChannelIBOTLoss(ibot)(s, t, w, n_images=4, pairing=torch.eye(g))
    torch.testing.assert_close(cross, ibot(s, t, w, n_images=4))


def test_rows_must_split_into_aligned_crops() -> None:
    ibot = iBOTPatchLoss(student_temp=0.1)
    with pytest.raises(ValueError, match="shared across aligned crops"):
        CrossChannelIBOTLoss(ibot)(torch.zeros(5, 4), torch.zeros(5, 4), torch.zeros(5), 2,
                                   cross_channel_pairing(2))
