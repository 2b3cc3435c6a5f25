"""Two-stage continued pretraining: a head warm-up with the backbone frozen, then a backbone lr ramp.

``train.head_warmup_steps=3``, ``optim.backbone_warmup_steps=2``: steps 0-2 train only the heads (the
student backbone gets no gradient, no AdamW step and no weight decay; the teacher heads follow by EMA),
step 3 updates the backbone at half its lr, step 4 at its full lr.  Checkpoints taken in either stage
resume to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinocell.config import load_config
from dinocell.engine.checkpoint import load_checkpoint_file

TWO_STAGE = ["train.head_warmup_steps=3", "optim.backbone_warmup_steps=2", "optim.lr=1e-3",
             "optim.freeze_last_layer_epochs=0", "train.checkpoint_every_steps=1", "train.keep_last_n=10",
             "train.eval_fields=0", "loss.gram_weight=0.5"]


def _cfg(extra: list[str] = ()):  # type: ignore[assignment]
    from tests_tiny import TINY

    return load_config(None, [*TINY, *TWO_STAGE, *extra])


def _part(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dinocell.train.run import pretrain

    out = tmp_path_factory.mktemp("two_stage")
    pretrain(_cfg(), out, max_steps=6)
    return out


def _ckpt(run: Path, step: int) -> dict:
    return load_checkpoint_file(run / "checkpoints" / f"step{step:08d}.ckpt")


@pytest.mark.slow
def test_head_warmup_freezes_the_backbone_and_trains_the_heads(uninterrupted: Path) -> None:
    c1, c3, c4 = (_ckpt(uninterrupted, s) for s in (1, 3, 4))
    s1, s3, s4 = (c["state_dict"] for c in (c1, c3, c4))
    # backbone untouched through the head stage (no gradient, no AdamW step, no weight decay drift) ...
    assert _same(_part(s1, "meta.student.backbone."), _part(s3, "meta.student.backbone."))
    assert _same(_part(s3, "meta.student.backbone."), _part(s3, "meta.teacher.backbone."))  # EMA of equal = equal
    # ... while the student heads train and the teacher heads follow them by EMA
    for head in ("dino_head.", "ibot_head."):
        assert not _same(_part(s1, f"meta.student.{head}"), _part(s3, f"meta.student.{head}"))
        assert not _same(_part(s1, f"meta.teacher.{head}"), _part(s3, f"meta.teacher.{head}"))
    # AdamW holds no moments for the backbone before it unfreezes
    n_backbone = len(_part(s3, "meta.student.backbone."))
    n_state_3 = len(c3["optimizer_states"][0]["state"])
    n_state_4 = len(c4["optimizer_states"][0]["state"])
    assert n_state_4 - n_state_3 >= n_backbone - 1  # -1: RoPE periods are a buffer, not a parameter
    # stage two: the backbone moves, with the ramped lr recorded in its groups
    assert not _same(_part(s3, "meta.student.backbone."), _part(s4, "meta.student.backbone."))
    groups = c4["optimizer_states"][0]["param_groups"]
    assert any(g["is_backbone"] for g in groups) and any(not g["is_backbone"] for g in groups)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [2, 4])  # mid head warm-up / mid backbone ramp
def test_resume_mid_stage_matches_uninterrupted(uninterrupted: Path, tmp_path: Path, stop_at: int) -> None:
    """A run killed after step ``stop_at`` (its periodic checkpoint is all that is left) resumes exactly."""
    import shutil

    from dinocell.train.run import pretrain

    (tmp_path / "checkpoints").mkdir()
    shutil.copy(uninterrupted / "checkpoints" / f"step{stop_at:08d}.ckpt", tmp_path / "checkpoints" / "last.ckpt")
    shutil.copy(uninterrupted / "holdout.txt", tmp_path / "holdout.txt")
    assert load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == stop_at
    pretrain(_cfg(), tmp_path, max_steps=6)  # rerun: resumes from last.ckpt
    resumed = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    ref = load_checkpoint_file(uninterrupted / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == ref["global_step"] == 6
    for prefix in ("meta.student.", "meta.teacher.", "meta.gram_teacher."):
        assert _same(_part(resumed["state_dict"], prefix), _part(ref["state_dict"], prefix)), prefix


def test_backbone_frozen_only_by_the_head_warmup() -> None:
    """The freeze marks parameters so param_groups keeps them, and releasing restores requires_grad."""
    from dinocell.train.meta_arch import MultiViewDINO
    from dinocell.train.module import param_groups, set_backbone_frozen

    cfg = _cfg()
    meta = MultiViewDINO(cfg)
    bb = meta.student["backbone"]
    n_all = sum(len(g["params"]) for g in param_groups(meta, cfg))
    set_backbone_frozen(bb, True)
    assert not any(p.requires_grad for p in bb.parameters())
    assert sum(len(g["params"]) for g in param_groups(meta, cfg)) == n_all
    set_backbone_frozen(bb, False)
    assert all(p.requires_grad for p in bb.parameters())


def test_config_rejects_negative_stage_lengths() -> None:
    from dinocell.errors import ConfigError

    with pytest.raises(ConfigError, match="head_warmup_steps"):
        _cfg(["train.head_warmup_steps=-1"])
