"""Dense cross-channel loss on constructed inputs: targets come from the *other* crop at the same
position, at every patch; the cosine form ignores per-crop offsets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinocell.losses.dense_cross import DenseCrossChannelLoss, mix_crops
from dinocell.losses.ibot_cross import cross_channel_pairing
from dinocell.losses.sinkhorn import sinkhorn_knopp


def _loss() -> DenseCrossChannelLoss:
    return DenseCrossChannelLoss(student_temp=0.1, sinkhorn_iterations=3, ce_mode="reference")


def test_mix_crops_swaps_two_crops_and_averages_three() -> None:
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    assert torch.equal(mix_crops(t, cross_channel_pairing(2)), t.flip(0))
    t3 = torch.randn(3, 2, 4, 5)
    mixed = mix_crops(t3, cross_channel_pairing(3))
    assert torch.allclose(mixed[0], (t3[1] + t3[2]) / 2)
    assert torch.allclose(mixed[2], (t3[0] + t3[1]) / 2)
    with pytest.raises(ValueError, match="pairing"):
        mix_crops(t3, cross_channel_pairing(2))


def test_ibot_form_is_the_mean_cross_entropy_against_the_other_crop() -> None:
    g, b, n, k = 2, 3, 4, 6
    torch.manual_seed(0)
    s = torch.randn(g, b, n, k)
    t = torch.softmax(torch.randn(g, b, n, k), dim=-1)
    got = _loss().ibot(s, t, cross_channel_pairing(g))
    ref = -(t.flip(0) * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()
    assert torch.allclose(got, ref, atol=1e-5)


def test_ibot_form_rewards_predicting_the_other_crop_not_the_own() -> None:
    # crop 0 and crop 1 of each place have different teacher assignments (prototype p vs p + 1)
    g, b, n, k = 2, 2, 5, 8
    proto = torch.arange(b * n).view(b, n) % (k - 1)
    t = torch.stack([F.one_hot(proto, k), F.one_hot(proto + 1, k)]).float()
    own = 20.0 * t  # student reproduces its own crop's assignment
    other = 20.0 * t.flip(0)  # student reproduces the other crop's assignment at the same place
    pairing = cross_channel_pairing(g)
    assert _loss().ibot(other, t, pairing) < 1e-3 < _loss().ibot(own, t, pairing)
    # every position counts: corrupting one patch of one sample raises the loss
    bad = other.clone()
    bad[0, 1, 3] = other[0, 1, 3].roll(1)
    assert _loss().ibot(bad, t, pairing) > _loss().ibot(other, t, pairing) + 0.1


def test_three_crops_is_the_mean_of_pairwise_losses() -> None:
    torch.manual_seed(1)
    s = torch.randn(3, 2, 4, 5)
    t = torch.softmax(torch.randn(3, 2, 4, 5), dim=-1)
    got = _loss().ibot(s, t, cross_channel_pairing(3))
    logp = F.log_softmax(s / 0.1, dim=-1)
    pair = [-(t[j] * logp[k]).sum(-1).mean() for k in range(3) for j in range(3) if j != k]
    assert torch.allclose(got, torch.stack(pair).mean(), atol=1e-5)


def test_teacher_probs_are_sinkhorn_rows_over_every_patch() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 8)
    p = _loss().teacher_probs(logits, teacher_temp=0.1)
    assert p.shape == logits.shape
    assert torch.allclose(p.sum(-1), torch.ones(2, 3, 4), atol=1e-5)
    # one equipartition over all 24 patches of both crops (not per crop or per image)
    assert torch.allclose(p.reshape(-1, 8), sinkhorn_knopp(logits.reshape(-1, 8), 0.1, 3))
    per_crop = sinkhorn_knopp(logits[0].reshape(-1, 8), 0.1, 3)
    assert not torch.allclose(p[0].reshape(-1, 8), per_crop)


def test_cosine_form_is_zero_for_matching_places_and_ignores_crop_offsets() -> None:
    torch.manual_seed(3)
    g, b, n, d = 2, 3, 4, 16
    place = torch.randn(b, n, d)  # what a place looks like, whatever the stain
    offset = torch.randn(g, 1, 1, d) * 5  # a per-stain offset of every token
    teacher = place.unsqueeze(0) + offset
    student = place.unsqueeze(0) + torch.randn(g, 1, 1, d) * 5  # other offsets, same places
    pairing = cross_channel_pairing(g)
    assert _loss().cosine(student, teacher, pairing) < 1e-5
    shuffled = student.roll(1, dims=2)  # places no longer match position by position
    assert _loss().cosine(shuffled, teacher, pairing) > 0.3


def test_cosine_targets_come_from_the_other_crop() -> None:
    torch.manual_seed(4)
    g, b, n, d = 2, 2, 3, 8
    teacher = torch.randn(g, b, n, d)
    pairing = cross_channel_pairing(g)
    assert _loss().cosine(teacher.flip(0), teacher, pairing) < 1e-5
    assert _loss().cosine(teacher, teacher, pairing) > 0.3  # the own crop is not the target


def test_gradients_reach_the_student_only() -> None:
    s = torch.randn(2, 2, 3, 8, requires_grad=True)
    t = torch.randn(2, 2, 3, 8, requires_grad=True)
    _loss().cosine(s, t, cross_channel_pairing(2)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    logits = torch.randn(2, 2, 3, 8, requires_grad=True)
    _loss().ibot(logits, torch.softmax(t, -1), cross_channel_pairing(2)).backward()
    assert logits.grad is not None and t.grad is None


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="G, B, N"):
        _loss().ibot(torch.randn(4, 8), torch.randn(4, 8), cross_channel_pairing(2))
    with pytest.raises(ValueError, match="same shape"):
        _loss().cosine(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 4, 8), cross_channel_pairing(2))
