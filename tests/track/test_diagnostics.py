"""Scalar diagnostics against direct formulas; attention maps are distributions over patches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dinocell.track import diagnostics as dg


def _named_with_grads() -> list[tuple[str, nn.Parameter]]:
    a = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5
    b = nn.Parameter(torch.zeros(1))
    b.grad = torch.tensor([12.0])  # norm 12
    h = nn.Parameter(torch.zeros(2))
    h.grad = torch.tensor([0.0, 2.0])  # norm 2
    no_grad = nn.Parameter(torch.zeros(3))
    return [
        ("meta.student.backbone.model.blocks.0.attn.qkv.weight", a),
        ("meta.student.backbone.mask_token", b),
        ("meta.student.dino_head.mlp.0.weight", h),
        ("meta.student.ibot_head.last_layer.weight", no_grad),
    ]


def test_grad_stats_matches_hand_computed_norms() -> None:
    s = dg.grad_stats(_named_with_grads())
    assert s["gradients/backbone_mean"] == pytest.approx(8.5)
    assert s["gradients/backbone_std"] == pytest.approx(3.5)  # population std of (5, 12)
    assert s["gradients/backbone_max"] == pytest.approx(12.0)
    assert s["gradients/head_mean"] == pytest.approx(2.0)
    assert s["gradients/head_std"] == pytest.approx(0.0)
    assert s["gradients/head_max"] == pytest.approx(2.0)
    assert s["gradients/global_norm"] == pytest.approx(math.sqrt(25 + 144 + 4))


def test_grad_stats_empty_and_head_only() -> None:
    assert dg.grad_stats([("w", nn.Parameter(torch.zeros(2)))]) == {}
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([-2.0])
    s = dg.grad_stats([("dino_head.w", p)])
    assert set(s) == {"gradients/head_mean", "gradients/head_std", "gradients/head_max", "gradients/global_norm"}
    assert s["gradients/global_norm"] == pytest.approx(2.0)


def test_collapse_stats_formulas() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    student = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # per-dim var: 1, 1 -> mean 1
    cls = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5, 1
    patches = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 3.0], [0.0, 0.0]]])  # 1,2,3,0
    s = dg.collapse_stats(probs, student, cls, patches)
    assert s["diag/teacher_entropy"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert s["diag/student_var"] == pytest.approx(1.0)
    assert s["diag/cls_norm"] == pytest.approx(3.0)
    assert s["diag/patch_norm"] == pytest.approx(1.5)


def test_collapse_stats_detects_collapse_and_skips_missing() -> None:
    same = torch.ones(8, 4)
    s = dg.collapse_stats(teacher_probs=torch.eye(4)[[0] * 8], student_cls=same)
    assert s == {"diag/teacher_entropy": pytest.approx(0.0, abs=1e-6), "diag/student_var": 0.0}
    assert dg.collapse_stats() == {}


def test_system_stats_reports_process_memory() -> None:
    s = dg.system_stats()
    assert 0.001 < s["system/cpu_rss_gb"] < 1024
    if not torch.cuda.is_available():
        assert "system/gpu_memory_gb" not in s


def test_attention_maps_are_distributions_over_patches() -> None:
    from dinocell.config import ModelConfig
    from dinocell.models.backbone import build_backbone

    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8), img_size=32)
    bb.train()
    maps = dg.attention_maps(bb, torch.rand(3, 1, 32, 40))
    assert maps.shape == (3, 2, 4, 5)
    assert torch.allclose(maps.sum((-1, -2)), torch.ones(3, 2), atol=1e-5)
    assert bb.training  # mode restored


def test_uniform_teacher_message_flags_uniform_targets_only() -> None:
    k = 16
    uniform = torch.full((8, k), 1.0 / k)
    msg = dg.uniform_teacher_message(uniform, step=40, teacher_temp=0.04)
    assert msg is not None
    assert "step 40" in msg and "loss.teacher_temp" in msg and f"{math.log(k):.2f}" in msg
    peaked = torch.eye(k)[:8] * 0.9 + 0.1 / k  # rows sum to 1, entropy well below log K
    assert dg.uniform_teacher_message(peaked, step=40, teacher_temp=0.04) is None
    assert dg.uniform_teacher_message(torch.ones(4, 1), step=1, teacher_temp=0.04) is None


def test_collapsed_teacher_is_flagged_and_healthy_one_is_not() -> None:
    """Every logit pointing at one prototype is collapse, even though Sinkhorn targets would look balanced."""
    from dinocell.track.diagnostics import collapsed_teacher_message, prototype_usage_stats

    k, b, temp = 64, 16, 0.04
    collapsed = torch.randn(2, b, k) * 0.01
    collapsed[..., 7] += 5.0
    healthy = torch.randn(2, b, k) * 0.01
    healthy[0, torch.arange(b), torch.arange(b)] += 5.0  # each image prefers its own prototype
    healthy[1, torch.arange(b), torch.arange(b) + b] += 5.0
    bad = prototype_usage_stats(collapsed, temp)
    good = prototype_usage_stats(healthy, temp)
    assert bad["diag/teacher_collapsed"] == 1.0 and bad["diag/teacher_max_share"] > 0.99
    assert bad["diag/teacher_usage_entropy"] < 0.05
    assert good["diag/teacher_collapsed"] == 0.0 and good["diag/teacher_max_share"] < 0.1
    assert good["diag/teacher_usage_entropy"] == pytest.approx(math.log(2 * b), abs=0.05)
    msg = collapsed_teacher_message(bad, step=12)
    assert msg is not None and "step 12" in msg
    assert collapsed_teacher_message(good, step=12) is None


def test_collapse_is_never_reported_at_step_0_only_on_a_trend_after_warmup() -> None:
    """`make demo` used to print "teacher collapse at step 0" before any update: a random head at a low
    temperature looks collapsed.  The monitor waits for the warm-up and a persistent flag."""
    from dinocell.track.diagnostics import CollapseMonitor

    def stats(share: float) -> dict[str, float]:
        return {"diag/teacher_collapsed": float(share > 0.5), "diag/teacher_max_share": share,
                "diag/teacher_usage_entropy": 0.1}

    mon = CollapseMonitor(warmup_steps=60, patience=3)
    assert mon.update(stats(0.99), 0) is None  # step 0: ignored however collapsed it looks
    assert mon.update(stats(0.99), 40) is None  # still warming up
    assert mon.update(stats(0.9), 60) is None and mon.update(stats(0.95), 80) is None
    msg = mon.update(stats(0.97), 100)  # third flagged check in a row, share not shrinking
    assert msg is not None and "teacher collapse at step 100" in msg
    assert mon.update(stats(0.99), 120) is None  # reported once

    recovering = CollapseMonitor(warmup_steps=10, patience=3)
    for step, share in ((10, 0.9), (20, 0.7), (30, 0.55)):  # flagged but falling: left alone
        assert recovering.update(stats(share), step) is None
    broken_streak = CollapseMonitor(warmup_steps=10, patience=2)
    assert broken_streak.update(stats(0.9), 10) is None
    assert broken_streak.update(stats(0.1), 20) is None  # healthy check resets the streak
    assert broken_streak.update(stats(0.9), 30) is None
    assert broken_streak.update(stats(0.9), 40) is not None
