"""DINO loss against the direct cross-entropy formula on hand-checkable inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinocell.losses.dino import DINOLoss, multiview_pairs
from dinocell.losses.sinkhorn import sinkhorn_knopp


def ce(p: np.ndarray, s: np.ndarray, temp: float) -> float:
    """Batch-mean of -sum_k p log softmax(s / temp), in float64."""
    z = s.astype(np.float64) / temp
    log_sm = (
        z
        - np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True))
        - z.max(axis=1, keepdims=True)
    )
    return float(-(p * log_sm).sum(axis=1).mean())


def test_multiview_pairs_two_globals_and_locals() -> None:
    pairs = multiview_pairs(2, 3)
    assert pairs == [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1)]
    assert all(i != j for i, j in pairs)  # no same-view pair
    assert multiview_pairs(3, 0) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert multiview_pairs(1, 2) == [(1, 0), (2, 0)]
    with pytest.raises(ValueError, match="n_global"):
        multiview_pairs(0, 2)


def test_uniform_student_gives_log_k() -> None:
    # log softmax of all-zero logits is -log 3 everywhere, so each CE is log 3 whatever the targets
    student = torch.zeros(2, 2, 3)
    teacher = torch.tensor([[[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], [[0.6, 0.2, 0.2], [0.1, 0.1, 0.8]]])
    loss = DINOLoss(student_temp=0.1)(student, teacher)
    assert loss.item() == pytest.approx(math.log(3), rel=1e-6)


def test_hand_example_2x3_matches_formula() -> None:
    # B=2 samples, K=3 prototypes, two global crops; default pairs (0<-1) and (1<-0)
    s = np.array(
        [[[0.1, -0.2, 0.3], [0.0, 0.5, -0.5]], [[-0.3, 0.2, 0.1], [0.4, 0.0, -0.1]]], dtype=np.float32
    )
    t = np.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [[0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]], dtype=np.float32)
    expected = 0.5 * (ce(t[1], s[0], 0.1) + ce(t[0], s[1], 0.1))
    loss = DINOLoss(student_temp=0.1)(torch.from_numpy(s), torch.from_numpy(t))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # same-view pairs would give a different number: the default really is cross-view
    same_view = 0.5 * (ce(t[0], s[0], 0.1) + ce(t[1], s[1], 0.1))
    assert abs(expected - same_view) > 1e-3


def test_locals_and_explicit_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    n_global, n_local, b, k = 2, 3, 4, 5
    students = [torch.randn(b, k, generator=g) for _ in range(n_global + n_local)]
    teacher = torch.softmax(torch.randn(n_global, b, k, generator=g), dim=-1)
    pairs = multiview_pairs(n_global, n_local)
    expected = np.mean([ce(teacher[j].numpy(), students[i].numpy(), 0.2) for i, j in pairs])
    loss_fn = DINOLoss(student_temp=0.2)
    assert loss_fn(students, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn(torch.stack(students), teacher).item() == pytest.approx(expected, rel=1e-5)
    only = [(4, 1)]
    assert loss_fn(students, teacher, pairs=only).item() == pytest.approx(
        ce(teacher[1].numpy(), students[4].numpy(), 0.2), rel=1e-5
    )


def test_gradient_is_softmax_minus_target() -> None:
    s = torch.tensor([[0.3, -0.1, 0.2]], requires_grad=True)
    p = torch.tensor([[[0.5, 0.25, 0.25]]])
    DINOLoss(student_temp=0.5)([s], p, pairs=[(0, 0)]).backward()
    expected = (torch.softmax(s.detach() / 0.5, dim=-1) - p[0]) / 0.5
    torch.testing.assert_close(s.grad, expected)


def test_teacher_probs_runs_sinkhorn_over_all_teacher_crops() -> None:
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    loss_fn = DINOLoss(sinkhorn_iterations=3)
    probs = loss_fn.teacher_probs(logits, teacher_temp=0.07)
    assert probs.shape == logits.shape
    torch.testing.assert_close(probs.reshape(8, 6), sinkhorn_knopp(logits.reshape(8, 6), 0.07, 3))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4), rtol=0, atol=1e-5)
    # the temperature is an argument, not state: a colder teacher gives sharper targets
    sharp = loss_fn.teacher_probs(logits, teacher_temp=0.01)
    assert sharp.max(-1).values.mean() > probs.max(-1).values.mean()


def test_errors() -> None:
    loss_fn = DINOLoss()
    teacher = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="out of range"):
        loss_fn(torch.zeros(2, 3, 4), teacher, pairs=[(2, 0)])
    with pytest.raises(ValueError, match="student crop 1 has shape"):
        loss_fn([torch.zeros(3, 4), torch.zeros(3, 5)], teacher)
    with pytest.raises(ValueError, match="at least one"):
        loss_fn(torch.zeros(1, 3, 4), teacher[:1])
    with pytest.raises(ValueError, match=r"\(T, B, K\)"):
        loss_fn(torch.zeros(2, 3, 4), teacher[0])
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(student_temp=0.0)
