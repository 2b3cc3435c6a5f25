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
from dinocell.track import loggers as lg
from dinocell.track.callbacks import DiagnosticsCallback

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
                "eval/transfer_knn_accuracy"):
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


def test_callback_failure_does_not_stop_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, TINY + ["track.logger=csv"])
    cb = DiagnosticsCallback(cfg, tmp_path)

    class Broken(StandIn):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.example_fields = torch.rand(2, 3, 32, 32)  # 3 channels but 5 names/flags

    trainer = L.Trainer(max_steps=2, logger=False, callbacks=[cb], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(Broken(cfg))
    assert trainer.global_step == 2
    assert "diagnostics at step" in caplog.text
