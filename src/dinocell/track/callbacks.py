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
network that gets exported and evaluated.  The ``eval/*`` scalars and the PCA come from
:func:`dinocell.evaluate.heldout.measure` on ``train.eval_fields`` held-out fields, the code and fields
of ``summary.json`` and ``dinocell evaluate RUN``.  :class:`ReferenceCallback` is the forgetting guard
(``track.reference``): it scores a fixed reference set the same way and logs ``reference/*``.

Failures: a diagnostic that fails on data, disk or device memory (:data:`EXPECTED_FAILURES`) is logged
and training goes on; anything else is a bug and propagates.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from dinocell.config import Config
from dinocell.errors import UserError
from dinocell.evaluate import plots
from dinocell.evaluate.heldout import FIGURES as EVAL_FIGURES
from dinocell.evaluate.heldout import HeldoutFields, HeldoutResult, measure, primary, training_preprocess
from dinocell.paths import write_atomic, write_text_atomic
from dinocell.runs import RunDir
from dinocell.track import diagnostics as dg

log = logging.getLogger(__name__)

#: What a diagnostic may fail with without stopping training: bad or unreachable data (UserError,
#: DataError), a full disk or a lost mount (OSError), a figure too large for the device.  Anything else
#: is a bug and propagates.
EXPECTED_FAILURES: tuple[type[BaseException], ...] = (UserError, OSError, torch.OutOfMemoryError)


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
        self.fig_dir = RunDir(self.run_dir).figures
        self.attention_interval = int(cfg.track.attention_log_interval)
        self.pca_interval = int(cfg.track.pca_log_interval)
        n = cfg.train.eval_fields if eval_fields is None else eval_fields
        self.n_eval = max(0, int(n))
        self._done: dict[str, int] = {}
        self._fields: HeldoutFields | None = None
        self.saved: list[Path] = []
        self.last: tuple[int, HeldoutResult] | None = None  # (step, result) of the latest eval/* pass

    def use_fields(self, fields: HeldoutFields | None, known: tuple[int, HeldoutResult] | None = None) -> None:
        """Score these (already selected) held-out fields, e.g. the run summary's, instead of loading them;
        ``known``: (step, result) already measured on them at that step (not measured twice)."""
        self._fields = fields
        self.last = known

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
        if not _runs_here(trainer):  # rank 0 (every rank under FSDP: all take part in a forward pass)
            return
        try:
            if attention:
                self._done["attention"] = step
                self.log_attention(trainer, pl_module, step)
            if pca:
                self._done["pca"] = step
                self.log_embeddings(trainer, pl_module, step)
        except EXPECTED_FAILURES as e:  # bad data, disk, memory: log and keep training
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
        """Feature PCA, the channel-consistency matrix and ``eval/*`` scalars on the held-out fields, all
        from :func:`dinocell.evaluate.heldout.measure` (the run summary's and ``dinocell evaluate``'s code)."""
        from dinocell.evaluate.consistency import channel_consistency

        fields = self.heldout_fields(trainer, pl_module)
        if fields is None:
            return
        if self.last is not None and self.last[0] == step:
            res = self.last[1]
        else:
            res = measure(_teacher_backbone(pl_module), fields)
            self.last = (step, res)
        emb = res.emb.numpy()  # (F, C+1, D)
        names = list(fields.channels)
        n, v, d = emb.shape
        view_names = names + ["mean"]
        points = plots.pca_2d(emb.reshape(-1, d))
        colourings: dict[str, list[Any]] = {"channel": [view_names[k] for _ in range(n) for k in range(v)]}
        if res.labels is not None:
            colourings["label"] = [res.labels[i] for i in range(n) for _ in range(v)]
        plates = [str(getattr(r, "plate", "?")) for r in res.records]
        if len(set(plates)) > 1:
            colourings["plate"] = [plates[i] for i in range(n) for _ in range(v)]
        pca_fig = plots.pca_figure(points, colourings, title=f"PCA of per-channel embeddings ({n} fields), step {step}")
        cons = res.figures["channel_consistency"]
        _, full = channel_consistency(emb, centre=True)
        mat_fig = plots.matrix_figure(full, view_names,
                                      f"channel consistency (centred cosine), step {step}\n"
                                      f"mean off-diagonal over channels: {float('nan') if cons is None else cons:.3f}")
        metrics = {f"eval/{k}": float(res.figures[k]) for k in EVAL_FIGURES if res.figures.get(k) is not None}
        if trainer.is_global_zero:
            self._emit(trainer, "pca", pca_fig, step)
            self._emit(trainer, "consistency", mat_fig, step)
            if metrics:
                for lg in trainer.loggers:
                    lg.log_metrics(metrics, step=step)

    def heldout_fields(self, trainer: Any, pl_module: Any) -> HeldoutFields | None:
        """The ``eval/*`` fields: ``train.eval_fields`` of :meth:`eval_source`, selected and loaded once
        with the training's preprocessing (the run summary scores the same ones)."""
        if self._fields is None:
            source = self.eval_source(trainer, pl_module)
            if source is None or self.n_eval < 2 or len(source.records) < 2:
                log.info("no held-out fields to score: the eval/* figures are off")
                return None
            self._fields = HeldoutFields(source, training_preprocess(self.cfg, list(source.channels)),
                                         limit=self.n_eval)
        return self._fields

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

    def _emit(self, trainer: L.Trainer, kind: str, fig: Any, step: int) -> None:
        """Save ``<kind>_stepNNNNNN.png`` and ``<kind>_latest.png``, then log to every attached logger."""
        path = self.fig_dir / f"{kind}_step{step:06d}.png"
        plots.save_figure(fig, path)
        latest = self.fig_dir / f"{kind}_latest.png"
        write_atomic(latest, lambda tmp: shutil.copyfile(path, tmp))
        self.saved.append(path)
        for lg in trainer.loggers:
            try:
                log_figure(lg, f"figures/{kind}", fig, path, step)
            except (OSError, ValueError, RuntimeError) as e:  # a logger's own I/O or media error
                log.warning("could not log figure %s to %s: %s: %s", kind, type(lg).__name__, type(e).__name__, e)


def _sharded(trainer: Any) -> bool:
    """FSDP (Lightning's FSDPStrategy, or ModelParallelStrategy carrying dinocell's FSDP2 fully_shard)."""
    name = type(getattr(trainer, "strategy", None)).__name__.lower()
    return "fsdp" in name or "modelparallel" in name


def _runs_here(trainer: Any) -> bool:
    """Rank 0 does the work; under FSDP every rank must take part in the forward passes."""
    return bool(trainer.is_global_zero or _sharded(trainer))


def reference_enabled(cfg: Config) -> bool:
    """Whether the forgetting guard is on (``track.reference`` not ``none``/empty; its keys are checked
    by ``TrackConfig.validate`` when the config loads)."""
    t = cfg.track
    return str(t.reference or "none").strip().lower() not in ("none", "", "off", "false") and t.reference_fields >= 2


class ReferenceCallback(L.Callback):
    """Forgetting guard: score the teacher on a fixed reference field set while it trains.

    ``track.reference``: ``heldout`` (the run's held-out wells) or a source URI (a folder, load_data
    file, ``s3://`` prefix, ``synthetic``; opened with the run's data section, so the same channels and
    scaling) such as the domain the weights started from.  Scored with :func:`dinocell.evaluate.heldout.measure`
    (CLS figures only: no dense pass) at step 0, every ``track.reference_every`` steps and at the end;
    logged as ``reference/*``; the score (within-channel kNN when the fields carry labels, else
    cross-channel retrieval top-1) is kept in ``<run>/reference.json`` (so resumed runs keep their
    step-0 value) and summarised in ``summary.json``.  One warning per run when the score falls more
    than ``track.reference_max_drop`` below its step-0 value.
    """

    def __init__(self, cfg: Config, run_dir: str | Path) -> None:
        super().__init__()
        self.cfg = cfg
        self.path = RunDir(run_dir).reference
        self.every = int(cfg.track.reference_every)
        self.max_drop = float(cfg.track.reference_max_drop)
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.history: list[dict[str, Any]] = list(state.get("history", []))
        self.warned = bool(state.get("warned", False))
        self._fields: HeldoutFields | None = None
        self._off = False

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _sharded(trainer):
            # every rank would have to take the same forward passes in lock-step (one rank skipping a
            # score deadlocks the all-gather); score the exported teacher with `dinocell evaluate` instead
            if trainer.is_global_zero:
                log.warning("the forgetting guard (track.reference) is off under FSDP")
            self._off = True
            return
        if trainer.global_step == 0:
            self.score(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every > 0 and trainer.global_step % self.every == 0:
            self.score(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.score(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def fields(self, trainer: Any, pl_module: Any) -> HeldoutFields | None:
        if self._fields is None and not self._off:
            ref = str(self.cfg.track.reference).strip()
            if ref.lower() == "heldout":
                source = DiagnosticsCallback.eval_source(trainer, pl_module)
            else:
                from dinocell.data.sources import open_source

                source = open_source(self.cfg.data, ref)
            if source is None or len(source.records) < 2:
                log.warning("track.reference=%s has fewer than 2 fields: the forgetting guard is off", ref)
                self._off = True
                return None
            self._fields = HeldoutFields(source, training_preprocess(self.cfg, list(source.channels)),
                                         limit=int(self.cfg.track.reference_fields))
        return self._fields

    def score(self, trainer: Any, pl_module: Any) -> dict[str, Any] | None:
        """Score the reference set at the current step (once per step); None when off or failed."""
        step = int(trainer.global_step)
        if self._off or any(h["step"] == step for h in self.history) or not _runs_here(trainer):
            return None
        try:
            fields = self.fields(trainer, pl_module)
            if fields is None:
                return None
            figures = measure(_teacher_backbone(pl_module), fields, dense=False).figures
        except EXPECTED_FAILURES as e:  # an unreachable reference source must not stop training
            log.warning("reference score at step %d failed: %s: %s", step, type(e).__name__, e)
            return None
        best = primary(figures)
        if best is None:
            log.warning("the reference fields give neither kNN (no labels) nor retrieval (one channel): "
                        "the forgetting guard is off")
            self._off = True
            return None
        metric, value = best
        entry = {"step": step, "metric": metric, "score": value,
                 **{k: figures[k] for k in ("knn_accuracy", "transfer_knn_accuracy", "cross_channel_retrieval_top1",
                                            "channel_consistency") if figures.get(k) is not None}}
        if not trainer.is_global_zero:
            return entry
        self.history.append(entry)
        start = self.history[0]["score"]
        if not self.warned and start - value > self.max_drop:
            self.warned = True
            log.warning("reference %s fell from %.4f (step 0) to %.4f at step %d (more than "
                        "track.reference_max_drop=%.3g) on the reference fields (track.reference=%s)", metric, start, value, step,
                        self.max_drop, self.cfg.track.reference)
        write_text_atomic(self.path, json.dumps({"reference": str(self.cfg.track.reference), "metric": metric,
                                                 "warned": self.warned, "history": self.history}, indent=2))
        metrics = {f"reference/{k}": float(v) for k, v in entry.items() if k not in ("step", "metric")}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        return entry


def reference_summary(run_dir: str | Path) -> dict[str, Any]:
    """``reference_start`` / ``_min`` / ``_end`` (+ metric, source, steps) of a run's forgetting guard."""
    path = RunDir(run_dir).reference
    if not path.is_file():
        return {}
    state = json.loads(path.read_text())
    scores = [h["score"] for h in state.get("history", []) if h.get("score") is not None
              and math.isfinite(h["score"])]
    if not scores:
        return {}
    return {"reference": state.get("reference"), "reference_metric": state.get("metric"),
            "reference_start": scores[0], "reference_min": min(scores), "reference_end": scores[-1],
            "reference_steps": [h["step"] for h in state["history"]],
            "reference_warned": bool(state.get("warned"))}


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


__all__ = ["DiagnosticsCallback", "ReferenceCallback", "log_figure", "reference_enabled", "reference_summary"]
