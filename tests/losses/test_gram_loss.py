"""Gram anchoring loss: formula on tiny inputs, and token subsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinocell.losses.gram import GramLoss


def gram_mse(s: np.ndarray, t: np.ndarray) -> float:
    s = s / np.linalg.norm(s, axis=-1, keepdims=True)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    gs = np.einsum("bnd,bmd->bnm", s, s)
    gt = np.einsum("bnd,bmd->bnm", t, t)
    return float(((gs - gt) ** 2).mean())


def test_hand_example() -> None:
    # one image, two patches: student patches orthogonal (cos 0), teacher patches parallel (cos 1);
    # the Gram matrices differ only off the diagonal by 1 -> MSE = 2 / 4
    student = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    teacher = torch.tensor([[[2.0, 0.0], [5.0, 0.0]]])
    assert GramLoss()(student, teacher).item() == pytest.approx(0.5)
    assert GramLoss()(student, student * 7).item() == pytest.approx(0.0, abs=1e-7)


def test_matches_formula_random() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 5, 4)).astype(np.float32)
    t = rng.normal(size=(2, 5, 6)).astype(np.float32)  # the teacher's width may differ
    loss = GramLoss(max_tokens=None)(torch.from_numpy(s), torch.from_numpy(t))
    assert loss.item() == pytest.approx(gram_mse(s, t), rel=1e-5)


def test_remove_neg_clamps_both() -> None:
    rng = np.random.default_rng(1)
    s = rng.normal(size=(1, 6, 3)).astype(np.float32)
    t = rng.normal(size=(1, 6, 3)).astype(np.float32)
    sn = s / np.linalg.norm(s, axis=-1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=-1, keepdims=True)
    gs = np.clip(sn @ sn.transpose(0, 2, 1), 0, None)
    gt = np.clip(tn @ tn.transpose(0, 2, 1), 0, None)
    got = GramLoss(remove_neg=True)(torch.from_numpy(s), torch.from_numpy(t)).item()
    assert got == pytest.approx(float(((gs - gt) ** 2).mean()), rel=1e-5)


def test_subsampling_same_tokens_for_both_and_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 40, 8, generator=g)
    teacher = torch.randn(2, 40, 8, generator=g)
    loss_fn = GramLoss(max_tokens=10)
    idx = loss_fn.select_tokens(40, torch.Generator().manual_seed(5))
    assert idx is not None and idx.shape == (10,) and len(set(idx.tolist())) == 10
    assert int(idx.max()) < 40
    expected = gram_mse(student[:, idx].numpy(), teacher[:, idx].numpy())
    got = loss_fn(student, teacher, generator=torch.Generator().manual_seed(5))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    again = loss_fn(student, teacher, generator=torch.Generator().manual_seed(5))
    assert again.item() == got.item()
    # same subset for student and teacher: identical features give exactly zero
    assert loss_fn(student, student.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert loss_fn.select_tokens(10) is None  # no subsampling when N <= max_tokens


def test_teacher_gets_no_gradient() -> None:
    student = torch.randn(1, 4, 3, requires_grad=True)
    teacher = torch.randn(1, 4, 3, requires_grad=True)
    GramLoss()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_errors() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        GramLoss(max_tokens=0)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        GramLoss()(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="same \\(B, N\\)"):
        GramLoss()(torch.zeros(1, 4, 3), torch.zeros(1, 5, 3))


# Reference: dinov3 GramLoss(apply_norm=True, remove_only_teacher_neg=False)(s, t, img_level=True) on seeded
# inputs, run with facebookresearch/dinov3 @ 6876159a11b4df116f30f667f8c9888617df0751.
@pytest.mark.parametrize(("remove_neg", "official"), [(False, 0.20598916709423065), (True, 0.07159682363271713)])
def test_matches_official_dinov3_image_level(remove_neg: bool, official: float) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    assert GramLoss(max_tokens=None, remove_neg=remove_neg)(s, t).item() == pytest.approx(official, rel=1e-6)


def test_resize_patch_tokens_to_the_student_grid() -> None:
    """The Gram teacher's larger crops give a finer grid; dinov3 resizes it back (bicubic, no antialias)."""
    from dinocell.losses.gram import resize_patch_tokens

    t = torch.randn(3, 16, 5)
    assert resize_patch_tokens(t, 16) is t
    const = torch.ones(2, 64, 4) * torch.arange(4.0)  # a constant map stays constant under interpolation
    out = resize_patch_tokens(const, 16)
    assert out.shape == (2, 16, 4) and torch.allclose(out, torch.ones(2, 16, 4) * torch.arange(4.0), atol=1e-5)
    grid = torch.arange(64.0).reshape(1, 8, 8, 1).expand(1, 8, 8, 2).reshape(1, 64, 2)
    ref = torch.nn.functional.interpolate(grid.transpose(1, 2).reshape(1, 2, 8, 8), size=(4, 4), mode="bicubic",
                                          align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(resize_patch_tokens(grid, 16), ref)
    with pytest.raises(ValueError, match="square"):
        resize_patch_tokens(torch.randn(1, 12, 2), 16)
