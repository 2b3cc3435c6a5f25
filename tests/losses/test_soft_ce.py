"""Fused, chunked soft-target cross-entropy vs the plain autograd form (values and gradients, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from dinocell.losses.chunking import row_chunks
from dinocell.losses.dino import DINOLoss
from dinocell.losses.ibot import iBOTPatchLoss
from dinocell.losses.sinkhorn import sinkhorn_knopp
from dinocell.losses.soft_ce import soft_cross_entropy


def _pair(n: int, k: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g) * scale
    t = sinkhorn_knopp(torch.randn(n, k, generator=g), 0.1) if n else torch.zeros(0, k)
    return s, t


@pytest.mark.parametrize(("n", "k"), [(1, 3), (7, 5), (37, 4096), (3, 70000), (0, 6)])
def test_values_and_gradients_equal_unfused(n: int, k: int) -> None:
    # (37, 4096) and (3, 70000) span several row chunks and a partial last chunk
    s, t = _pair(n, k, seed=n + k, scale=2.0)
    w = torch.rand(n, generator=torch.Generator().manual_seed(1))
    out = {}
    for fused in ("fused", "reference"):
        x = s.clone().requires_grad_()
        rows = soft_cross_entropy(x, t, 0.1, mode=fused)
        (rows * w).sum().backward()
        out[fused] = (rows.detach(), x.grad)
    torch.testing.assert_close(out["fused"][0], out["reference"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["fused"][1], out["reference"][1], rtol=1e-5, atol=1e-5)


def test_matches_float64_formula_and_targets_get_no_gradient() -> None:
    s, t = _pair(5, 11, seed=3)
    t = t.clone().requires_grad_()
    x = s.clone().requires_grad_()
    rows = soft_cross_entropy(x, t, 0.07)
    ref = -(t.detach().double() * torch.log_softmax(s.double() / 0.07, dim=-1)).sum(-1)
    torch.testing.assert_close(rows.double(), ref, rtol=1e-5, atol=1e-5)
    rows.sum().backward()
    assert t.grad is None
    expected = (torch.softmax(s.double() / 0.07, -1) - t.detach().double()) / 0.07
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_targets_need_not_sum_to_one() -> None:
    # the DINO loss sums the targets of several teachers for one student
    s, t = _pair(4, 9, seed=5)
    t2 = t + t.flip(0)
    for fused in ("fused", "reference"):
        x = s.clone().requires_grad_()
        soft_cross_entropy(x, t2, 0.2, mode=fused).sum().backward()
        if fused == "fused":
            got = x.grad
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_keep_their_dtype_in_the_gradient() -> None:
    s, t = _pair(4, 8, seed=6)
    x = s.bfloat16().requires_grad_()
    soft_cross_entropy(x, t, 0.1).sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_losses_fused_equal_unfused() -> None:
    g = torch.Generator().manual_seed(7)
    s_dino = torch.randn(4, 3, 2000, generator=g)
    p_dino = DINOLoss().teacher_probs(torch.randn(2, 3, 2000, generator=g), 0.04)
    s_ibot, p_ibot = _pair(40, 3000, seed=8)
    w = torch.rand(40, generator=g)
    res = {}
    for fused in ("fused", "reference"):
        a = s_dino.clone().requires_grad_()
        b = s_ibot.clone().requires_grad_()
        loss = DINOLoss(0.1, 3, ce_mode=fused)(a, p_dino) + iBOTPatchLoss(0.1, 3, ce_mode=fused)(b, p_ibot, w, 6)
        loss.backward()
        res[fused] = (loss.detach(), a.grad, b.grad)
    for x, y in zip(res["fused"], res["reference"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_row_chunks_cover_every_row_once() -> None:
    chunks = row_chunks(10, 4, chunk_elements=12)
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_chunks(0, 4) == []
    assert row_chunks(2, 10**6, chunk_elements=8) == [slice(0, 1), slice(1, 2)]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="both be"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="temp"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


@pytest.mark.slow  # torch.compile builds a C++ kernel: minutes on a loaded 2-core machine
def test_compiled_equals_reference() -> None:
    s, t = _pair(13, 300, seed=9)
    out = {}
    for mode in ("compiled", "reference"):
        x = s.clone().requires_grad_()
        rows = soft_cross_entropy(x, t, 0.1, mode=mode)
        rows.sum().backward()
        out[mode] = (rows.detach(), x.grad)
    for a, b in zip(out["compiled"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
