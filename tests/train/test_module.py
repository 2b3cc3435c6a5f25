from __future__ import annotations

import pytest
import torch

from dinocell.config import load_config
from dinocell.train.meta_arch import MultiViewDINO
from dinocell.train.module import param_groups


@pytest.fixture(scope="module")
def groups() -> tuple[MultiViewDINO, list[dict]]:
    from tests_tiny import TINY

    cfg = load_config(None, TINY)
    meta = MultiViewDINO(cfg)
    return meta, param_groups(meta, cfg)


def _group_of(groups: list[dict], param) -> dict:
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_weight_decay_follows_dinov3_tokens_decay(groups) -> None:
    """dinov3 (train/param_groups.py @ 6876159a) exempts only names ending in ``bias`` or containing
    ``norm``, ``gamma``, ``fourier_w``: CLS, register (storage) and mask tokens *are* decayed."""
    meta, gs = groups
    named = dict(meta.student.named_parameters())
    for name, p in named.items():
        if not p.requires_grad:
            continue
        g = _group_of(gs, p)
        nodecay = name.endswith("bias") or "norm" in name or "gamma" in name
        assert g["wd_multiplier"] == (0.0 if nodecay else 1.0), name
    for token in ("backbone.model.cls_token", "backbone.model.reg_token", "backbone.mask_token"):
        assert _group_of(gs, named[token])["wd_multiplier"] == 1.0, token
    assert _group_of(gs, named["backbone.model.blocks.0.gamma_1"])["wd_multiplier"] == 0.0
    assert _group_of(gs, named["backbone.model.norm.weight"])["wd_multiplier"] == 0.0


def test_backbone_groups_are_flagged_and_never_mixed_with_heads(groups) -> None:
    meta, gs = groups
    backbone = {id(p) for p in meta.student["backbone"].parameters()}
    for g in gs:
        inside = {id(p) in backbone for p in g["params"]}
        assert inside == {g["is_backbone"]}


def test_layerwise_decay_and_patch_embed(groups) -> None:
    meta, gs = groups
    named = dict(meta.student.named_parameters())
    depth = meta.student["backbone"].n_blocks  # 2 in the tiny config
    d = 0.9
    assert _group_of(gs, named["backbone.model.blocks.1.attn.qkv.weight"])["lr_multiplier"] == pytest.approx(d ** 1)
    assert _group_of(gs, named["backbone.model.blocks.0.attn.qkv.weight"])["lr_multiplier"] == pytest.approx(d ** 2)
    pe = _group_of(gs, named["backbone.model.patch_embed.proj.weight"])["lr_multiplier"]
    assert pe == pytest.approx(d ** (depth + 1) * 0.2)
    assert _group_of(gs, named["dino_head.mlp.0.weight"])["lr_multiplier"] == 1.0


def test_last_layer_flagged_and_frozen_norm_excluded(groups) -> None:
    meta, gs = groups
    flagged = [p for g in gs if g["is_last_layer"] for p in g["params"]]
    names = {id(p): n for n, p in meta.student.named_parameters()}
    assert flagged and all("last_layer" in names[id(p)] for p in flagged)
    all_params = {id(p) for g in gs for p in g["params"]}
    frozen = [n for n, p in meta.student.named_parameters() if not p.requires_grad]
    assert frozen and all(id(dict(meta.student.named_parameters())[n]) not in all_params for n in frozen)


def test_nonfinite_loss_is_caught_at_the_next_check_with_its_step(tmp_path, monkeypatch) -> None:
    """The finiteness check runs every ``train.finite_check_every`` steps (no per-step host sync), yet
    reports the first bad step, and always runs before a checkpoint is written."""
    from dinocell.errors import UserError
    from dinocell.train.run import pretrain
    from tests_tiny import TINY

    original = MultiViewDINO.forward
    steps: list[int] = []

    def poisoned(self, batch, teacher_temp, gram_generator=None):
        out = original(self, batch, teacher_temp, gram_generator)
        steps.append(len(steps))
        if len(steps) == 4:  # step 3
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(MultiViewDINO, "forward", poisoned)
    cfg = load_config(None, TINY + ["train.finite_check_every=5", "train.checkpoint_every_steps=100",
                                    "train.eval_fields=0"])
    with pytest.raises(UserError, match="loss is nan at step 3"):
        pretrain(cfg, tmp_path, max_steps=9)
    assert steps[-1] == 5  # detected at the check of step 5, not at step 3 and not at the end
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))  # none due before the failure


@pytest.mark.slow
def test_gram_teacher_snapshot_is_checkpointed_and_refreshed_on_schedule(tmp_path) -> None:
    """Snapshots before steps 1 and 4 (start 1, then absolute multiples of 4): the final checkpoint's Gram
    teacher is the EMA teacher as it was after step 3, i.e. the teacher stored in the step-4 checkpoint, and
    it loads back."""
    from dinocell.engine.checkpoint import load_checkpoint_file
    from dinocell.train.run import pretrain
    from tests_tiny import TINY

    cfg = load_config(None, TINY + ["loss.gram_weight=0.5", "loss.gram_teacher_start=1", "loss.gram_teacher_every=4",
                                    "train.checkpoint_every_steps=1", "train.keep_last_n=2", "train.eval_fields=0"])
    pretrain(cfg, tmp_path, max_steps=5)
    last = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    at4 = load_checkpoint_file(tmp_path / "checkpoints" / "step00000004.ckpt")
    assert last["global_step"] == 5 and at4["global_step"] == 4
    gram = {k[len("meta.gram_teacher."):]: v for k, v in last["state_dict"].items() if k.startswith("meta.gram_teacher.")}
    teacher4 = {k[len("meta.teacher.backbone."):]: v for k, v in at4["state_dict"].items()
                if k.startswith("meta.teacher.backbone.")}
    teacher5 = {k[len("meta.teacher.backbone."):]: v for k, v in last["state_dict"].items()
                if k.startswith("meta.teacher.backbone.")}
    assert gram and gram.keys() == teacher4.keys()
    assert all(torch.equal(gram[k], teacher4[k]) for k in gram)
    assert not all(torch.equal(gram[k], teacher5[k]) for k in gram)  # the teacher moved on, the snapshot did not
    meta = MultiViewDINO(cfg)
    meta.load_state_dict({k[len("meta."):]: v for k, v in last["state_dict"].items()}, strict=True)


_RANKS_SCRIPT = """
import os, pathlib, types, torch, torch.distributed as dist
from dinocell.errors import UserError
from dinocell.train.module import DinoCellModule
dist.init_process_group("gloo")
rank = dist.get_rank()
state = types.SimpleNamespace(_bad_step=torch.tensor(3 if rank == 1 else -1),
                              _bad_loss=torch.tensor(float("nan") if rank == 1 else 0.0))
out = pathlib.Path(os.environ["RANKS_OUT"]) / f"rank{rank}.txt"  # one file per rank: stdout interleaves
try:
    DinoCellModule._raise_if_not_finite(state, 5)
    out.write_text("NO_RAISE")
except UserError as e:
    out.write_text(f"RAISED {e}")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"),
               RANKS_OUT=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29643", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert all(line.startswith("RAISED") for line in lines), lines
    assert "loss is nan at step 3" in lines[1] and "another rank by step 5" in lines[0]


def test_gram_teacher_reads_its_own_larger_crops_and_scheduled_weight() -> None:
    """With ``gram_teacher_crops`` in the batch the Gram teacher runs on them (2x larger here) and its patch
    grid is resized to the student's; the module-set ``gram_weight`` scales the term in the total."""
    from dinocell.config import MaskConfig
    from dinocell.data.masking import collate_multiview
    from tests_tiny import TINY

    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["loss.gram_weight=1.0", "data.views.n_local_crops=0"])
    meta = MultiViewDINO(cfg)
    samples = [{"global_crops": [torch.rand(1, 32, 32) for _ in range(2)], "local_crops": [],
                "global_channels": [-1, 0], "local_channels": [],
                "gram_teacher_crops": [torch.rand(1, 64, 64) for _ in range(2)]} for _ in range(2)]
    batch = collate_multiview(samples, MaskConfig(), patch_size=8, rng=0)
    with_own = meta(batch, 0.04)
    plain = meta({k: v for k, v in batch.items() if k != "gram_teacher_crops"}, 0.04)
    assert torch.isfinite(with_own["gram"]) and not torch.allclose(with_own["gram"], plain["gram"])
    meta.gram_weight = 0.0
    zero = meta(batch, 0.04)
    assert torch.allclose(zero["total"], zero["dino"] + zero["ibot"] + 0.1 * zero["koleo"])
