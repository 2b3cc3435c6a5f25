"""Tests for the DINO / iBOT projection head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dinocell.models.heads import DINOHead


def make_head(**kw) -> DINOHead:
    torch.manual_seed(0)
    args = dict(in_dim=16, out_dim=10, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    args.update(kw)
    return DINOHead(**args)


def test_shapes_and_layers():
    head = make_head()
    x = torch.randn(5, 16)
    assert head(x).shape == (5, 10)
    assert head(torch.randn(2, 7, 16)).shape == (2, 7, 10)  # patch tokens (iBOT)
    assert head(x, no_last_layer=True).shape == (5, 8)
    linears = [m for m in head.mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp.modules()) == 2
    assert head.last_layer.bias is None
    one = make_head(nlayers=1)
    assert isinstance(one.mlp, torch.nn.Linear) and (one.mlp.in_features, one.mlp.out_features) == (16, 8)
    with pytest.raises(ValueError, match="must be >= 1"):
        DINOHead(16, 0)


def test_init_trunc_normal_std_002():
    head = make_head(in_dim=256, hidden_dim=512, bottleneck_dim=64)
    w = head.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.001  # (trunc_normal_ cuts at +-2 absolute, as in dinov2/3)
    assert torch.all(head.mlp[0].bias == 0)


def test_prototypes_have_unit_norm_and_logits_are_cosines():
    head = make_head()
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(10))
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    x = torch.randn(5, 16)
    logits = head(x)
    # logits = cos(bottleneck, prototype): the direct formula
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(logits, z @ F.normalize(w, dim=1).T)
    assert logits.abs().max() <= 1 + 1e-6
    # rescaling the direction parameter changes nothing: only the direction matters
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original1.mul_(7.5)
    torch.testing.assert_close(head(x), logits)
    # only_last_layer on a normalised bottleneck equals the full forward
    torch.testing.assert_close(head(head(x, no_last_layer=True), only_last_layer=True), logits)


def test_gradients_flow_except_frozen_norm():
    head = make_head()
    loss = head(torch.randn(4, 16)).logsumexp(-1).mean()
    loss.backward()
    for name, p in head.named_parameters():
        if name.endswith("original0"):
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    names = {n for n, p in head.named_parameters() if p.requires_grad}
    assert "last_layer.parametrizations.weight.original1" in names
    assert "last_layer.parametrizations.weight.original0" not in names


def test_deepcopy_and_state_dict_for_teacher():
    student = make_head()
    teacher = copy.deepcopy(student)  # the trainer's teacher is a deep copy of the student
    x = torch.randn(3, 16)
    torch.testing.assert_close(teacher(x), student(x))
    fresh = make_head()
    with torch.no_grad():
        fresh.last_layer.parametrizations.weight.original1.add_(1.0)
    fresh.load_state_dict(student.state_dict())
    torch.testing.assert_close(fresh(x), student(x))
    assert not fresh.last_layer.parametrizations.weight.original0.requires_grad


def test_plain_linear_last_layer_option() -> None:
    """DINOv3 dropped weight norm: with norm_last_layer=False the prototypes are a plain linear layer
    whose logits are not bounded by 1 (they can sharpen), and every parameter trains."""
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, nlayers=3, norm_last_layer=False)
    assert isinstance(head.last_layer, torch.nn.Linear) and head.last_layer.bias is None
    assert all(p.requires_grad for p in head.parameters())
    with torch.no_grad():
        head.last_layer.weight.mul_(100.0)
    assert head(torch.randn(4, 16)).abs().max() > 1.0
