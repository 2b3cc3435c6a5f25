"""``DiagnosticsCallback``: attention maps, feature PCA and channel consistency during training.

Scalars (losses, schedules, gradient and collapse statistics) are logged by the LightningModule every
``track.log_interval`` steps.  Figures are slower, so this callback renders them every
``track.attention_log_interval`` (attention) and ``track.pca_log_interval`` (PCA, consistency matrix
and ``eval/*`` scalars) steps, at the start of a fresh run and at the end of training, on rank 0.

Every figure is written to ``<run_dir>/figures/<kind>_step<NNNNNN>.png`` plus ``<kind>_latest.png``
(stable name for quick looks) and sent to the attached logger: ``wandb.Image`` for wandb,
``add_image`` for TensorBoard; CSV runs keep the files only.  Checkpoint upload to wandb
(``track.log_model_checkpoints``) is done by Lightning's ``WandbLogger(log_model=True)``, set up in
:func:`dinocell.track.loggers.build_logger`.

The model used is the teacher backbone (``pl_module.meta.teacher.backbone``): the EMA teacher is the
network that gets exported and evaluated.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from dinocell.config import Config
from dinocell.evaluate import plots
from dinocell.track import diagnostics as dg

log = logging.getLogger(__name__)

MAX_EVAL_FIELDS = 64


def _teacher_backbone(pl_module: Any) -> Any:
    teacher = pl_module.meta.teacher
    try:
        return teacher["backbone"]
    except (TypeError, KeyError):
        return teacher.backbone


def _mean_image(fields: torch.Tensor, fluorescent: list[bool]) -> torch.Tensor:
    idx = [i for i, f in enumerate(fluorescent) if f] or list(range(fields.shape[1]))
    return fields[:, idx].mean(1)


class DiagnosticsCallback(L.Callback):
    """Periodic diagnostic figures (see module doc).  ``eval_fields`` caps the PCA/consistency set."""

    def __init__(self, cfg: Config, run_dir: str | Path, eval_fields: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.fig_dir = self.run_dir / "figures"
        self.attention_interval = int(cfg.track.attention_log_interval)
        self.pca_interval = int(cfg.track.pca_log_interval)
        n = cfg.train.eval_fields if eval_fields is None else eval_fields
        self.n_eval = max(0, min(int(n), MAX_EVAL_FIELDS))
        self._done: dict[str, int] = {}
        self._eval: tuple[torch.Tensor, list[int], list[str]] | None = None
        self.saved: list[Path] = []

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # the untrained (or released) model, for comparison
            self._run(trainer, pl_module, attention=self.attention_interval > 0, pca=self.pca_interval > 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        attention = self.attention_interval > 0 and step % self.attention_interval == 0
        pca = self.pca_interval > 0 and step % self.pca_interval == 0
        if attention or pca:
            self._run(trainer, pl_module, attention=attention, pca=pca)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module, attention=True, pca=True)

    # ------------------------------------------------------------------ work
    def _run(self, trainer: L.Trainer, pl_module: Any, attention: bool, pca: bool) -> None:
        step = int(trainer.global_step)
        attention = attention and self._done.get("attention") != step
        pca = pca and self._done.get("pca") != step
        if not (attention or pca):
            return
        # Under FSDP every rank must take part in a forward pass; otherwise only rank 0 does the work.
        sharded = "fsdp" in type(getattr(trainer, "strategy", None)).__name__.lower()
        if not (trainer.is_global_zero or sharded):
            return
        try:
            if attention:
                self._done["attention"] = step
                self.log_attention(trainer, pl_module, step)
            if pca:
                self._done["pca"] = step
                self.log_embeddings(trainer, pl_module, step)
        except Exception as e:  # diagnostics must never kill a long training run
            log.warning("diagnostics at step %d failed: %s: %s", step, type(e).__name__, e)

    def log_attention(self, trainer: L.Trainer, pl_module: Any, step: int) -> None:
        """Attention of the last block for each example field, for the mean image and each channel."""
        fields = pl_module.example_fields
        if fields is None or len(fields) == 0:
            return
        backbone = _teacher_backbone(pl_module)
        names = list(pl_module.channel_names)
        fluo = list(pl_module.fluorescent)
        fields = self._fit_patch(fields.float().cpu(), int(backbone.patch_size))
        n, c, h, w = fields.shape
        views = torch.cat([_mean_image(fields, fluo)[:, None], fields], dim=1)  # (n, C+1, H, W)
        maps = dg.attention_maps(backbone, views.reshape(-1, 1, h, w)).numpy()  # (n*(C+1), heads, h', w')
        maps = maps.reshape(n, c + 1, *maps.shape[1:])
        imgs = views.numpy()
        labels = list(pl_module.example_labels) + [-1] * n
        rows = [f"field {i}" + (f" (label {labels[i]})" if labels[i] >= 0 else "") for i in range(n)]
        views_fig = plots.overlay_figure(imgs, [[maps[i, k].mean(0) for k in range(c + 1)] for i in range(n)],
                                      rows, ["mean"] + names,
                                      title=f"last-block CLS attention (mean of heads), step {step}")
        heads = maps.shape[2]
        head_maps = [[None, maps[i, 0].mean(0)] + [maps[i, 0, j] for j in range(heads)] for i in range(n)]
        head_imgs = np.repeat(imgs[:, :1], heads + 2, axis=1)
        heads_fig = plots.overlay_figure(head_imgs, head_maps, rows,
                                      ["mean image", "mean of heads"] + [f"head {j}" for j in range(heads)],
                                      title=f"attention per head on the mean image, step {step}")
        if trainer.is_global_zero:
            self._emit(trainer, "attention", views_fig, step)
            self._emit(trainer, "attention_heads", heads_fig, step)

    def log_embeddings(self, trainer: L.Trainer, pl_module: Any, step: int) -> None:
        """Feature PCA, the channel-consistency matrix and ``eval/*`` scalars on the evaluation fields."""
        from dinocell.evaluate.consistency import (
            channel_consistency,
            channel_embeddings,
            cross_channel_retrieval,
        )
        from dinocell.evaluate.transfer import transfer_knn

        fields, labels, plates = self._eval_set(pl_module, trainer)
        if len(fields) < 2:
            return
        backbone = _teacher_backbone(pl_module)
        names = list(pl_module.channel_names)
        emb = channel_embeddings(backbone, fields, list(pl_module.fluorescent), crop_size=None,
                                 batch_size=max(1, self.cfg.data.batch_size)).numpy()  # (F, C+1, D)
        n, v, d = emb.shape
        view_names = names + ["mean"]
        points = plots.pca_2d(emb.reshape(-1, d))
        colourings: dict[str, list[Any]] = {"channel": [view_names[k] for _ in range(n) for k in range(v)]}
        if any(y >= 0 for y in labels):
            colourings["label"] = [labels[i] for i in range(n) for _ in range(v)]
        if len(set(plates)) > 1:
            colourings["plate"] = [plates[i] for i in range(n) for _ in range(v)]
        pca_fig = plots.pca_figure(points, colourings, title=f"PCA of per-channel embeddings ({n} fields), step {step}")

        cons, _ = channel_consistency(emb[:, :-1], centre=True) if len(names) > 1 else (float("nan"), None)
        _, full = channel_consistency(emb, centre=True)
        mat_fig = plots.matrix_figure(full, view_names,
                                   f"channel consistency (centred cosine), step {step}\n"
                                   f"mean off-diagonal over channels: {cons:.3f}")
        metrics: dict[str, float] = {}
        if len(names) > 1:
            real = emb[:, :-1]
            metrics["eval/channel_consistency"] = cons
            metrics["eval/channel_consistency_raw"] = channel_consistency(real, centre=False)[0]
            metrics["eval/cross_channel_retrieval_top1"] = cross_channel_retrieval(real, centre=True)
            y = np.asarray(labels)
            if (y >= 0).all() and np.unique(y).size >= 2 and n >= 4:
                metrics["eval/transfer_knn_accuracy"] = transfer_knn(real, y, k=20, temperature=0.07)[0]
        if trainer.is_global_zero:
            self._emit(trainer, "pca", pca_fig, step)
            self._emit(trainer, "consistency", mat_fig, step)
            if metrics:
                for lg in trainer.loggers:
                    lg.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _fit_patch(x: torch.Tensor, patch: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        th, tw = max(patch, h // patch * patch), max(patch, w // patch * patch)
        if (th, tw) == (h, w):
            return x
        return F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)

    @staticmethod
    def eval_source(trainer: Any, pl_module: Any) -> Any:
        """The fields the ``eval/*`` figures use: the DataModule's held-out wells, which training never
        reads; without a DataModule (a bare LightningModule) the module's own ``source``."""
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "heldout"):
            return dm.heldout
        return getattr(pl_module, "source", None)

    def _eval_set(self, pl_module: Any, trainer: Any = None) -> tuple[torch.Tensor, list[int], list[str]]:
        """Up to ``n_eval`` held-out fields spread evenly (all plates/labels), loaded once."""
        if self._eval is not None:
            return self._eval
        fields: list[torch.Tensor] = []
        labels: list[int] = []
        plates: list[str] = []
        source = self.eval_source(trainer, pl_module)
        size = self.cfg.data.views.global_crop_size
        if source is not None and self.n_eval > 0 and len(source.records) > 0:
            idx = np.unique(np.linspace(0, len(source.records) - 1, self.n_eval).round().astype(int))
            for i in idx:
                rec = source.records[int(i)]
                try:
                    x = torch.from_numpy(np.ascontiguousarray(source.load(rec))).float()
                except Exception as e:  # a bad field: skip it, as training does
                    log.debug("diagnostics: skipping field %s: %s", rec.key, e)
                    continue
                fields.append(F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)[0])
                labels.append(int(rec.metadata.get("label", -1)))
                plates.append(str(rec.plate))
        if len(fields) < 2 and source is None:  # no source at all: the module's fixed examples
            ex = pl_module.example_fields
            fields = [f for f in ex.float().cpu()] if ex is not None else []
            labels = list(pl_module.example_labels)[: len(fields)]
            labels += [-1] * (len(fields) - len(labels))
            plates = ["?"] * len(fields)
        stacked = torch.stack(fields) if fields else torch.zeros(0)
        self._eval = (stacked, labels, plates)
        return self._eval

    def _emit(self, trainer: L.Trainer, kind: str, fig: Any, step: int) -> None:
        """Save ``<kind>_stepNNNNNN.png`` and ``<kind>_latest.png``, then log to every attached logger."""
        path = self.fig_dir / f"{kind}_step{step:06d}.png"
        plots.save_figure(fig, path)
        latest = self.fig_dir / f"{kind}_latest.png"
        tmp = latest.with_name(latest.name + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(latest)
        self.saved.append(path)
        for lg in trainer.loggers:
            try:
                log_figure(lg, f"figures/{kind}", fig, path, step)
            except Exception as e:
                log.warning("could not log figure %s to %s: %s", kind, type(lg).__name__, e)


def log_figure(logger: Any, key: str, fig: Any, path: Path, step: int) -> None:
    """Send one rendered figure to a Lightning logger (wandb image, TensorBoard image, else nothing)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        logger.log_image(key=key, images=[wandb.Image(str(path))], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, plots.figure_to_array(fig), global_step=step, dataformats="HWC")
    elif isinstance(logger, CSVLogger):
        return
    elif hasattr(logger, "log_image"):
        logger.log_image(key=key, images=[str(path)], step=step)


__all__ = ["DiagnosticsCallback", "log_figure"]
