from __future__ import annotations

import torch

from dinocell.config import load_config
from dinocell.train.meta_arch import MultiViewDINO


def _meta(tiny_overrides: list[str]) -> MultiViewDINO:
    torch.manual_seed(0)
    return MultiViewDINO(load_config(None, tiny_overrides))


def _batch(b: int = 4, n_local: int = 2, g: int = 32, loc: int = 16) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    n = (g // 8) ** 2
    masks = torch.zeros(2 * b, n, dtype=torch.bool)
    masks[0, :3] = True
    masks[5, 4:6] = True
    idx = masks.flatten().nonzero().flatten()
    weights = torch.cat([torch.full((3,), 1 / 3), torch.full((2,), 1 / 2)])
    return {"global_crops": torch.rand(2 * b, 1, g, g), "local_crops": torch.rand(n_local * b, 1, loc, loc),
            "masks": masks, "mask_indices": idx, "masks_weight": weights, "n_masked_patches": int(idx.numel())}


def test_teacher_is_frozen_and_always_eval(tiny_overrides: list[str]) -> None:
    meta = _meta(tiny_overrides)
    meta.train()
    assert meta.student.training and not meta.teacher.training
    assert all(not m.training for m in meta.teacher.modules())
    assert all(not p.requires_grad for p in meta.teacher.parameters())
    out = meta(_batch(), teacher_temp=0.04)
    out["total"].backward()
    assert all(p.grad is None for p in meta.teacher.parameters())
    grads = [p.grad for n, p in meta.student.named_parameters() if p.requires_grad and "original0" not in n]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > 0.9 * len(grads)


def test_losses_present_and_finite(tiny_overrides: list[str]) -> None:
    meta = _meta(tiny_overrides + ["loss.gram_weight=0.5"])
    out = meta(_batch(), teacher_temp=0.04)
    for k in ("dino", "ibot", "koleo", "gram", "total"):
        assert torch.isfinite(out[k]), k
    lc = meta.cfg.loss
    expected = lc.dino_weight * out["dino"] + lc.ibot_weight * out["ibot"] + lc.koleo_weight * out["koleo"] \
        + lc.gram_weight * out["gram"]
    torch.testing.assert_close(out["total"], expected)
    assert out["ibot"] > 0 and out["dino"] > 0


def test_ema_update_formula(tiny_overrides: list[str]) -> None:
    meta = _meta(tiny_overrides)
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(1.0)
    before_t = [p.clone() for p in meta.teacher.parameters()]
    student = [p.clone() for p in meta.student.parameters()]
    meta.update_teacher(0.9)
    for t0, s, t1 in zip(before_t, student, meta.teacher.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)
    meta.update_teacher(1.0)  # momentum 1: the teacher does not move
    after = [p.clone() for p in meta.teacher.parameters()]
    meta.update_teacher(1.0)
    for a, b in zip(after, meta.teacher.parameters(), strict=True):
        assert torch.equal(a, b)


def test_multiview_pairing_uses_cross_view_teachers(tiny_overrides: list[str], monkeypatch) -> None:
    """Teacher mean view (0) teaches the student's single-channel view (1) and vice versa; both teach
    every local crop; the student logits are ordered [global 0, global 1, locals...]."""
    meta = _meta(tiny_overrides)
    seen = {}
    original = meta.dino_loss.forward

    def spy(student_logits, teacher_probs, pairs=None):
        seen["pairs"] = list(pairs)
        seen["shapes"] = (tuple(student_logits.shape), tuple(teacher_probs.shape))
        return original(student_logits, teacher_probs, pairs)

    monkeypatch.setattr(meta.dino_loss, "forward", spy)
    meta(_batch(b=4, n_local=2), 0.04)
    assert seen["pairs"] == [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert seen["shapes"] == ((4, 4, 64), (2, 4, 64))


def test_gram_teacher_is_a_frozen_snapshot_of_the_ema_teacher(tiny_overrides: list[str]) -> None:
    meta = _meta(tiny_overrides + ["loss.gram_weight=1.0", "loss.gram_max_tokens=1000"])
    gt = meta.gram_teacher
    assert gt is not None and not gt.training
    assert all(not p.requires_grad for p in gt.parameters())
    assert not any(p is q for p in gt.parameters() for q in meta.student.parameters())
    assert any(k.startswith("gram_teacher.") for k in meta.state_dict())
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(0.05)
    meta.update_teacher(0.5)  # the EMA teacher moves, the snapshot does not
    t_bb = meta.teacher["backbone"]
    assert not all(torch.equal(a, b) for a, b in zip(gt.parameters(), t_bb.parameters(), strict=True))
    meta.refresh_gram_teacher()
    assert all(torch.equal(a, b) for a, b in zip(gt.parameters(), t_bb.parameters(), strict=True))
    with torch.no_grad():  # the loss anchors the student to the snapshot, not to the live teacher
        for p in t_bb.parameters():
            p.add_(0.3)
    batch = _batch()
    out = meta(batch, teacher_temp=0.04)
    s_patches = meta.student["backbone"].forward_features(batch["global_crops"], masks=batch["masks"])
    g_patches = gt.forward_features(batch["global_crops"])["x_norm_patchtokens"]
    expected = meta.gram_loss(s_patches["x_norm_patchtokens"], g_patches)
    torch.testing.assert_close(out["gram"], expected)
    out["total"].backward()
    assert all(p.grad is None for p in gt.parameters())
    meta.gram_active = False  # before loss.gram_teacher_start
    assert float(meta(batch, teacher_temp=0.04)["gram"].detach()) == 0.0


def test_gram_target_ema_uses_the_live_teacher(tiny_overrides: list[str]) -> None:
    meta = _meta(tiny_overrides + ["loss.gram_weight=1.0", "loss.gram_target=ema", "loss.gram_max_tokens=1000"])
    assert meta.gram_teacher is None and not any(k.startswith("gram_teacher.") for k in meta.state_dict())
    batch = _batch()
    out = meta(batch, teacher_temp=0.04)
    s_patches = meta.student["backbone"].forward_features(batch["global_crops"], masks=batch["masks"])
    t_patches = meta.teacher["backbone"].forward_features(batch["global_crops"])["x_norm_patchtokens"]
    torch.testing.assert_close(out["gram"], meta.gram_loss(s_patches["x_norm_patchtokens"], t_patches))


def test_koleo_is_summed_over_the_global_crops(tiny_overrides: list[str]) -> None:
    meta = _meta(tiny_overrides)
    batch = _batch(b=4)
    out = meta(batch, teacher_temp=0.04)
    cls = out["_student_cls"].view(2, 4, -1)
    expected = meta.koleo_loss(cls[0]) + meta.koleo_loss(cls[1])
    torch.testing.assert_close(out["koleo"], expected)
    assert out["_teacher_logits"].shape == (2, 4, 64) and not out["_teacher_logits"].requires_grad
