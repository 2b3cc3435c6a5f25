from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinocell.config import load_config, to_dict
from dinocell.engine.checkpoint import (
    AtomicCheckpointIO,
    check_compatible,
    check_config_matches_tensors,
    check_resume,
    config_diff,
    load_checkpoint_file,
    prune_checkpoints,
    tensor_facts,
)
from dinocell.errors import UserError
from dinocell.train.history import LossHistory
from tests_tiny import TINY


def _touch(d: Path, *names: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"x")


def test_prune_keeps_newest_n_by_step_and_removes_orphans(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    # step numbers out of lexical order, a killed write, Lightning's versioned copies
    _touch(d, "step00000002.ckpt", "step00000010.ckpt", "step00000004.ckpt", "step00000100.ckpt",
           "step00000008.ckpt.tmp", "step00000010-v1.ckpt", "last-v1.ckpt", "last.ckpt", "notes.txt")
    removed = {p.name for p in prune_checkpoints(d, keep=2)}
    left = sorted(p.name for p in d.iterdir())
    assert left == ["last.ckpt", "notes.txt", "step00000010.ckpt", "step00000100.ckpt"]
    assert removed == {"step00000002.ckpt", "step00000004.ckpt", "step00000008.ckpt.tmp",
                       "step00000010-v1.ckpt", "last-v1.ckpt"}
    assert prune_checkpoints(tmp_path / "missing", keep=2) == []


def test_atomic_save_prunes_after_each_save(tmp_path: Path) -> None:
    io = AtomicCheckpointIO(keep_last_n=2)
    d = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        io.save_checkpoint({"global_step": step, "w": torch.ones(2)}, d / f"step{step:08d}.ckpt")
    assert sorted(p.name for p in d.iterdir()) == ["step00000003.ckpt", "step00000004.ckpt"]
    assert io.load_checkpoint(d / "step00000004.ckpt")["global_step"] == 4
    assert load_checkpoint_file(d / "step00000003.ckpt")["global_step"] == 3


def _backbone_state(width: int, depth: int, prefix: str = "meta.teacher.backbone.") -> dict[str, torch.Tensor]:
    state = {f"{prefix}model.patch_embed.proj.weight": torch.zeros(width, 1, 8, 8),
             f"{prefix}model.cls_token": torch.zeros(1, 1, width)}
    for i in range(depth):
        state[f"{prefix}model.blocks.{i}.norm1.weight"] = torch.zeros(width)
    state["meta.teacher.dino_head.last_layer.weight"] = torch.zeros(64, 32)
    return state


def test_tensor_facts_read_the_architecture() -> None:
    facts = tensor_facts(_backbone_state(384, 3))
    assert facts == {"model.embed_dim": 384, "model.in_chans": 1, "model.patch_size": 8, "model.depth": 3,
                     "head.prototypes": 64}
    assert tensor_facts(_backbone_state(48, 2, prefix=""))["model.embed_dim"] == 48  # an export


def test_stored_config_disagreeing_with_tensors_is_one_line() -> None:
    cfg = to_dict(load_config(None, TINY + ["model.embed_dim=192"]))
    with pytest.raises(UserError) as e:
        check_config_matches_tensors(cfg, _backbone_state(384, 2), "x.ckpt")
    msg = str(e.value)
    assert "model.embed_dim=192" in msg and "384" in msg and "\n" not in msg
    check_config_matches_tensors(to_dict(load_config(None, TINY)), _backbone_state(32, 2), "x.ckpt")  # agrees


def test_resume_with_another_config_names_the_keys() -> None:
    stored = to_dict(load_config(None, TINY))
    run = to_dict(load_config(None, TINY + ["model.depth=3", "optim.lr=0.5"]))
    assert config_diff(stored, run) == ["model.depth=2 -> 3"]
    ckpt = {"state_dict": _backbone_state(32, 2), "dinocell": {"config": stored}}
    with pytest.raises(UserError) as e:
        check_resume(_backbone_state(32, 3), ckpt, run)
    msg = str(e.value)
    assert "model.depth=2 -> 3" in msg and "blocks.2" in msg and "\n" not in msg
    check_resume(_backbone_state(32, 2), ckpt, to_dict(load_config(None, TINY + ["optim.lr=0.5"])))
    with pytest.raises(UserError, match="1 unexpected"):
        check_compatible(_backbone_state(32, 1), _backbone_state(32, 2), "last.ckpt")


def test_resume_of_an_old_checkpoint_ignores_its_recorded_run_outputs(caplog: pytest.LogCaptureFixture) -> None:
    """Older checkpoints hold data.holdout.n_wells / n_fields (run outputs, now in summary.json)."""
    stored = to_dict(load_config(None, TINY))
    stored["data"]["holdout"].update({"n_wells": 2, "n_fields": 8})
    ckpt = {"state_dict": _backbone_state(32, 2), "dinocell": {"config": stored}}
    with caplog.at_level("WARNING"):
        check_resume(_backbone_state(32, 2), ckpt, to_dict(load_config(None, TINY)))
    assert "different config" not in caplog.text
    with caplog.at_level("WARNING"):
        check_resume(_backbone_state(32, 2), ckpt, to_dict(load_config(None, TINY + ["optim.lr=0.5"])))
    assert "optim.lr" in caplog.text and "n_wells" not in caplog.text


def test_loss_history_is_bounded_and_survives_a_checkpoint() -> None:
    h = LossHistory(head=3, tail=4)
    for i in range(100):
        h.append(float(i))
    assert len(h) == 100 and h.first == 0.0 and h.last == 99.0 and h.mean == pytest.approx(49.5)
    assert h.first_mean(2) == 0.5 and h.last_mean(2) == 98.5
    state = h.state()
    assert len(state["head"]) == 3 and len(state["tail"]) == 4
    back = torch.load(_save(state), weights_only=True)
    r = LossHistory.from_state(back)
    assert (r.first, r.last, len(r), r.mean) == (h.first, h.last, len(h), h.mean)
    old = LossHistory.from_state([1.0, 2.0, 3.0])  # checkpoints that stored the full list
    assert (old.first, old.last, len(old)) == (1.0, 3.0, 3)


def _save(obj: object) -> object:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
