"""The engine layer: trainer plumbing train and segment share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinocell.engine.checkpoint import AtomicCheckpointIO
from dinocell.engine.param_groups import param_groups
from dinocell.engine.schedules import cosine
from dinocell.engine.trainer import parse_devices
from dinocell.paths import DiskFullError
from dinocell.runs import RunDir


def test_parse_devices() -> None:
    assert parse_devices("auto") == "auto" and parse_devices("2") == 2 and parse_devices("0,1") == "0,1"


def test_cosine_warms_up_then_decays() -> None:
    assert cosine(0, 10, 1.0, 0.0, warmup_steps=2) == 0.0 and cosine(2, 10, 1.0, 0.0, warmup_steps=2) == 1.0
    assert cosine(10, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_checkpoint_io_writes_through_the_atomic_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path)
    io = AtomicCheckpointIO(keep_last_n=1)
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, run.last_checkpoint)
    assert torch.equal(io.load_checkpoint(run.last_checkpoint)["state_dict"]["w"], torch.ones(3))

    def full(obj, f):  # noqa: ANN001, ANN202
        Path(f).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match="last.ckpt"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, run.last_checkpoint)
    assert not list(run.checkpoints.glob("*.tmp"))  # the temp file went, the last complete file stayed
    assert torch.equal(io.load_checkpoint(run.last_checkpoint)["state_dict"]["w"], torch.ones(3))


class _Backbone(torch.nn.Module):
    """Two blocks and a patch embedding, with DinoBackbone's layer ids."""

    n_blocks = 2

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = torch.nn.Linear(2, 2)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])

    def layer_id(self, name: str) -> int:
        return 0 if name.startswith("patch_embed") else int(name.split(".")[1]) + 1


def test_param_groups_layerwise_decay_and_decay_rule() -> None:
    bb = _Backbone()
    head = torch.nn.Linear(2, 2)
    named = [(f"backbone.{n}", p) for n, p in bb.named_parameters()] + [(f"head.{n}", p) for n, p in head.named_parameters()]
    groups = param_groups(named, bb, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    mult = {id(p): (g["lr_multiplier"], g["wd_multiplier"], g["is_backbone"]) for g in groups for p in g["params"]}
    assert mult[id(bb.patch_embed.weight)] == (pytest.approx(0.5 ** 3 * 0.2), 1.0, True)
    assert mult[id(bb.blocks[1].bias)] == (pytest.approx(0.5), 0.0, True)  # no decay on biases
    assert mult[id(head.weight)] == (1.0, 1.0, False)
    assert all(g["lr"] == 0.0 and g["weight_decay"] == 0.0 for g in groups)


def test_progress_bar_names_the_run_not_a_negative_epoch() -> None:
    """A fit runs with max_epochs=-1 (a later --max-steps continues a stopped run); the stock rich bar
    would print "Epoch 0/-2"."""
    from lightning.pytorch.callbacks import RichProgressBar

    from dinocell.engine.trainer import build_trainer

    trainer = build_trainer(max_epochs=-1, max_steps=3, enable_progress_bar=True, logger=False,
                            enable_checkpointing=False, accelerator="cpu")
    bar = trainer.progress_bar_callback
    assert isinstance(bar, RichProgressBar) and bar._get_train_description(0) == "train"
    assert build_trainer(enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         accelerator="cpu").progress_bar_callback is None
