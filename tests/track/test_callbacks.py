"""DiagnosticsCallback inside a real Lightning Trainer with a stand-in module (tiny ViT, synthetic data)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dinocell.config import load_config
from dinocell.errors import ConfigError
from dinocell.track import loggers as lg
from dinocell.track.callbacks import (
    DiagnosticsCallback,
    ReferenceCallback,
    reference_enabled,
    reference_summary,
)

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
        "data.views.global_crop_size=32", "data.synthetic.n_fields=32", "data.synthetic.size=48",
        "data.synthetic.n_classes=4", "data.synthetic.wells_per_plate=8", "data.synthetic.sites_per_well=2",
        "train.eval_fields=16", "track.attention_log_interval=2", "track.pca_log_interval=3"]


class StandIn(L.LightningModule):
    """Exposes what the real DinoCellModule exposes to the callback; trains a dummy scalar."""

    def __init__(self, cfg) -> None:
        super().__init__()
        from dinocell.data.sources import open_source
        from dinocell.models.backbone import build_backbone

        torch.manual_seed(0)
        self.cfg = cfg
        self.source = open_source(cfg.data)
        self.meta = nn.Module()
        self.meta.teacher = nn.ModuleDict({"backbone": build_backbone(cfg.model, img_size=32).eval()})
        self.w = nn.Parameter(torch.ones(1))
        self.channel_names = list(self.source.channels)
        self.fluorescent = list(self.source.fluorescent)
        recs = self.source.records[::9][:4]
        x = torch.stack([torch.from_numpy(self.source.load(r)) for r in recs])
        self.example_fields = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        self.example_labels = [int(r.metadata["label"]) for r in recs]

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch).pow(2).mean()
        self.log("loss/total", loss, on_step=True, on_epoch=False)
        return loss

    def train_dataloader(self):
        return DataLoader(torch.randn(12, 1), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(cfg, run_dir: Path, logger) -> DiagnosticsCallback:
    cb = DiagnosticsCallback(cfg, run_dir)
    trainer = L.Trainer(max_steps=6, logger=logger if logger is not None else False, callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        log_every_n_steps=1, accelerator="cpu", devices=1)
    trainer.fit(StandIn(cfg))
    return cb


def _png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_callback_writes_figures_and_tensorboard_images(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, TINY + ["track.logger=tensorboard"])
    logger = lg.build_logger(cfg, tmp_path, resume=False)
    cb = _fit(cfg, tmp_path, logger)
    figs = tmp_path / "figures"
    names = sorted(p.name for p in figs.glob("*.png"))
    # step 0 (start), 2, 4, 6 (attention, 6 = end) and 0, 3, 6 (pca/consistency)
    for kind, steps in (("attention", (0, 2, 4, 6)), ("attention_heads", (0, 2, 4, 6)),
                        ("pca", (0, 3, 6)), ("consistency", (0, 3, 6))):
        for s in steps:
            assert f"{kind}_step{s:06d}.png" in names
        assert f"{kind}_latest.png" in names
    assert not [n for n in names if n.startswith("pca_step000002")]
    assert (figs / "attention_latest.png").read_bytes() == (figs / "attention_step000006.png").read_bytes()
    att = _png(figs / "attention_latest.png")
    # 4 example fields x 6 views (mean + 5 channels) at 1.5 inch per cell, 100 dpi
    assert att.shape[:2] == (round(100 * (1.5 * 4 + 0.5)), round(100 * (1.5 * 6 + 0.4)))
    assert att[..., :3].std() > 0.05
    heads = _png(figs / "attention_heads_latest.png")
    assert heads.shape[1] == round(100 * (1.5 * 4 + 0.4))  # input, mean of heads, 2 heads
    for kind in ("pca", "consistency"):
        assert _png(figs / f"{kind}_latest.png")[..., :3].std() > 0.05
    assert len(cb.saved) == 4 * 2 + 3 * 2

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"figures/attention", "figures/pca", "figures/consistency"} <= set(tags["images"])
    ev = acc.Images("figures/attention")
    assert [e.step for e in ev] == [0, 2, 4, 6]
    assert (ev[-1].height, ev[-1].width) == att.shape[:2]
    for key in ("eval/channel_consistency", "eval/channel_consistency_raw", "eval/cross_channel_retrieval_top1",
                "eval/transfer_knn_accuracy", "eval/knn_accuracy", "eval/patch_consistency",
                "eval/patch_retrieval_top1"):
        vals = acc.Scalars(key)
        assert [e.step for e in vals] == [0, 3, 6]
        assert all(-1.0 <= e.value <= 1.0 for e in vals)


def test_callback_logs_wandb_images_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, TINY + ["track.logger=wandb", "track.pca_log_interval=0",
                                    "track.attention_log_interval=0"])
    logger = lg.build_logger(cfg, tmp_path, resume=False)
    _fit(cfg, tmp_path, logger)
    sync_dir = lg.wandb_sync_dir(logger)
    lg.finalize(logger, tmp_path)
    media = sorted((sync_dir / "files" / "media" / "images" / "figures").glob("*.png"))
    assert {p.name.split("_")[0] for p in media} >= {"attention", "pca", "consistency"}
    # intervals 0: only the end-of-training figures
    assert sorted(p.name for p in (tmp_path / "figures").glob("*_step*.png")) == [
        "attention_heads_step000006.png", "attention_step000006.png", "consistency_step000006.png",
        "pca_step000006.png"]
    data = next(sync_dir.glob("run-*.wandb")).read_bytes()
    assert b"figures/attention" in data and b"eval/channel_consistency" in data


class _Unreadable:
    """A source whose every field fails to decode (a broken mount, corrupt files)."""

    def __init__(self, source) -> None:
        self.records, self.channels, self.fluorescent = source.records, source.channels, source.fluorescent

    def load(self, rec):
        from dinocell.errors import DataError

        raise DataError(f"cannot decode {rec.key}")


def test_data_failure_is_logged_and_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, TINY + ["track.logger=csv", "track.attention_log_interval=0"])
    cb = DiagnosticsCallback(cfg, tmp_path)

    class BadData(StandIn):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.source = _Unreadable(self.source)

    trainer = L.Trainer(max_steps=2, logger=False, callbacks=[cb], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    with caplog.at_level("WARNING", logger="dinocell"):
        trainer.fit(BadData(cfg))
    assert trainer.global_step == 2
    assert "diagnostics at step 0 failed: DataError: need at least 2 readable held-out fields" in caplog.text
    assert "skipping field" in caplog.text  # each unreadable field is named once


def test_a_bug_in_diagnostics_is_not_swallowed(tmp_path: Path) -> None:
    cfg = load_config(None, TINY + ["track.logger=csv"])
    cb = DiagnosticsCallback(cfg, tmp_path)

    class Broken(StandIn):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.example_fields = torch.rand(2, 3, 32, 32)  # 3 channels but 5 names/flags: a programming error

    trainer = L.Trainer(max_steps=2, logger=False, callbacks=[cb], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    with pytest.raises(IndexError):
        trainer.fit(Broken(cfg))


def _fit_reference(cfg, run_dir: Path, module: StandIn, steps: int = 4) -> ReferenceCallback:
    cb = ReferenceCallback(cfg, run_dir)
    trainer = L.Trainer(max_steps=steps, logger=False, callbacks=[cb], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1)
    trainer.fit(module)
    return cb


def test_reference_guard_scores_logs_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from dinocell.track import callbacks as C

    scripted = iter([0.90, 0.80, 0.85, 0.70])  # drops by 0.10 at step 2, again at the end: one warning
    monkeypatch.setattr(C, "measure", lambda backbone, fields, dense=True: SimpleNamespace(
        figures={"knn_accuracy": next(scripted), "cross_channel_retrieval_top1": 0.5}))
    cfg = load_config(None, TINY + ["track.reference=heldout", "track.reference_every=2", "track.reference_fields=16"])
    with caplog.at_level("WARNING", logger="dinocell.track.callbacks"):
        cb = _fit_reference(cfg, tmp_path, StandIn(cfg), steps=5)
    assert [(h["step"], h["score"]) for h in cb.history] == [(0, 0.9), (2, 0.8), (4, 0.85), (5, 0.7)]
    assert all(h["metric"] == "knn_accuracy" for h in cb.history)
    summary = reference_summary(tmp_path)
    assert (summary["reference_start"], summary["reference_min"], summary["reference_end"]) == (0.9, 0.7, 0.7)
    drops = [r.getMessage() for r in caplog.records if "reference knn_accuracy fell" in r.getMessage()]
    assert len(drops) == 1 and "at step 2" in drops[0] and summary["reference_warned"]
    # a resumed run keeps its step-0 value and its warning, and does not score a step twice
    again = ReferenceCallback(cfg, tmp_path)
    assert again.history == cb.history and again.warned


def test_reference_on_a_second_source_and_off(tmp_path: Path) -> None:
    cfg = load_config(None, TINY + ["track.reference=synthetic", "track.reference_every=0",
                                    "track.reference_fields=8"])
    cb = _fit_reference(cfg, tmp_path, StandIn(cfg), steps=2)
    assert [h["step"] for h in cb.history] == [0, 2]
    assert cb.history[0]["score"] == cb.history[1]["score"]  # StandIn's teacher does not move
    assert reference_enabled(cfg)
    assert not reference_enabled(load_config(None, TINY + ["track.reference=none"]))
    with pytest.raises(ConfigError, match="reference_every"):
        reference_enabled(load_config(None, TINY + ["track.reference_every=-1"]))
