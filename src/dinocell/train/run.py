"""``dinocell pretrain``: build the Lightning Trainer (devices, DDP/FSDP, precision, checkpoints,
loggers), resume automatically, and summarise what the run learned.

Resuming: rerunning the same command finds ``DIR/checkpoints/last.ckpt`` and continues from it
(``resume=False`` starts over); checkpoint I/O and the Trainer plumbing live in :mod:`dinocell.engine`, the data,
held-out split and run length in :mod:`dinocell.train.datamodule`.  ``--max-steps`` stops the Trainer
early; the schedules always follow ``epochs x steps_per_epoch``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from dinocell.config import Config, save_config
from dinocell.engine.checkpoint import AtomicCheckpointIO, prune_checkpoints
from dinocell.engine.trainer import (
    build_trainer,
    checkpoint_callback,
    parse_devices,
    quiet_fit,
    quiet_lightning,
    resolve_precision,
)
from dinocell.errors import UserError
from dinocell.paths import check_output_dir, write_text_atomic
from dinocell.runs import RunDir

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- trainer


def _strategy(cfg: Config) -> Any:
    s = cfg.train.strategy
    if s == "fsdp":
        # FSDP2 (fully_shard, as dinov3): the module shards itself over all ranks in configure_model (the
        # strategy's own nodes x processes mesh is unused); checkpoints are gathered into one full file on
        # rank 0, the same format as single-process and DDP runs.
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(save_distributed_checkpoint=False)
    if s == "ddp":
        # iBOT head parameters get no gradient when iBOT is off
        unused = cfg.loss.ibot_weight == 0 or cfg.train.head_warmup_steps > 0  # head warm-up: frozen backbone
        return "ddp_find_unused_parameters_true" if unused else "ddp"
    return "auto"


def _callbacks(cfg: Config, run_dir: Path) -> list[Any]:
    cbs: list[Any] = [checkpoint_callback(run_dir, cfg.train.checkpoint_every_steps)]
    from dinocell.track.callbacks import DiagnosticsCallback, ReferenceCallback, reference_enabled

    if cfg.track.logger != "none":
        cbs.append(DiagnosticsCallback(cfg, run_dir))
    if reference_enabled(cfg):  # the forgetting guard runs without a logger too: it feeds summary.json
        cbs.append(ReferenceCallback(cfg, run_dir))
    return cbs


def _logger(cfg: Config, run_dir: Path, resume: bool) -> Any:
    if cfg.track.logger == "none":
        return None
    from dinocell.track.loggers import build_logger

    return build_logger(cfg, run_dir, resume)


def pretrain(cfg: Config, output_dir: str | os.PathLike[str], max_steps: int | None = None,
             resume: bool = True) -> dict[str, Any]:
    """Train, checkpoint, resume, and return (and write) the run summary."""
    import lightning as L

    from dinocell.data.holdout import read_holdout_file, write_holdout_file
    from dinocell.data.sources import open_source
    from dinocell.train.datamodule import DinoCellDataModule
    from dinocell.train.module import DinoCellModule

    quiet_lightning()
    run_dir = check_output_dir(output_dir)
    run = RunDir(run_dir)
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {cfg.train.max_steps}")
    cfg.output_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir, last = run.checkpoints, run.last_checkpoint
    ckpt_path = str(last) if resume and last.is_file() else None
    if not resume and ckpt_dir.is_dir():
        for old in [*ckpt_dir.glob("*.ckpt"), *ckpt_dir.glob("*.tmp")]:
            old.unlink()
    if ckpt_path is None:  # a fresh start: figures cached by an earlier run in this folder are stale
        for stale in (run.eval_before, run.reference):
            stale.unlink(missing_ok=True)
    prune_checkpoints(ckpt_dir, cfg.train.keep_last_n)  # orphans of an interrupted run

    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    if str(cfg.data.source).startswith("s3://"):  # preflight: fail in seconds, before any GPU work
        from dinocell.data.s3.check import check_s3

        for line in check_s3(str(cfg.data.source), cfg.data):
            log.info("data check: %s", line)
    source = open_source(cfg.data)
    source.verify()  # like `dinocell data ls`: unreadable files are counted; all unreadable -> one line
    logger = _logger(cfg, run_dir, resume=ckpt_path is not None)
    callbacks = _callbacks(cfg, run_dir)
    trainer = build_trainer(
        accelerator=cfg.train.accelerator, devices=parse_devices(cfg.train.devices), num_nodes=cfg.train.num_nodes,
        strategy=_strategy(cfg), precision=resolve_precision(cfg.train.precision),
        # the loader holds the whole run from the restored step (its length: to the stop step); max_epochs=-1
        # because a run stopped by --max-steps ends its Lightning epoch, and with max_epochs=1 a rerun with a
        # later --max-steps would find the fit finished and train nothing. max_steps is set from the
        # DataModule's stop step below (the horizon needs the world size, which needs the Trainer)
        max_steps=-1, max_epochs=-1, logger=logger if logger is not None else False,
        callbacks=callbacks, plugins=[AtomicCheckpointIO(cfg.train.keep_last_n)],
        enable_progress_bar=cfg.train.progress_bar,  # clipping: per module, in the LightningModule
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=1, use_distributed_sampler=False, default_root_dir=str(run_dir),
        deterministic=False,
    )
    # The held-out wells are decided once per run folder and kept (holdout.txt) for resumes; their counts
    # go to summary.json, never into the input config.
    record = run_record(source)
    data = DinoCellDataModule(cfg, source, trainer.world_size, read_holdout_file(run_dir) if ckpt_path else None)
    del source  # from here on only the DataModule's two subsets: one copy of the index per rank
    trainer.fit_loop.epoch_loop.max_steps = data.stop_step  # Lightning reads it when fitting starts
    if trainer.is_global_zero:
        write_holdout_file(run_dir, data.heldout_wells)
        save_config(cfg, run_dir, record=record)
    module = DinoCellModule(cfg, data.train_source, data.steps_per_epoch, data.total_steps, data.global_batch)
    if cfg.train.compile:
        module.meta.compile_blocks()  # in place: parameter names (lr decay, checkpoints) unchanged

    evaluator = _Evaluator(cfg, run_dir, data.heldout, record, heldout_wells=len(data.heldout_wells))
    before = evaluator.before(module) if trainer.is_global_zero else None
    diagnostics = next((cb for cb in callbacks if hasattr(cb, "use_fields")), None)
    if diagnostics is not None and evaluator.fields() is not None:  # eval/* scores the summary's fields
        diagnostics.use_fields(evaluator.fields(), evaluator.measured)  # step 0: not measured twice

    with quiet_fit():
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        except UserError as e:  # raised in a DataLoader worker: keep its last line, not the traceback
            lines = str(e).strip().splitlines()
            if len(lines) > 1:
                raise type(e)(lines[-1].split(": ", 1)[-1]) from None
            raise
    if trainer.global_step > 0:  # collective under DDP/FSDP: every rank calls it, rank 0 writes
        trainer.save_checkpoint(last, weights_only=False)
    skipped = data.skipped_fields()
    if skipped:
        log.warning("%d field(s) were skipped (unreadable or failed to load); see `dinocell data ls`", skipped)
    if diagnostics is not None and diagnostics.last is not None:  # the end-of-training eval/* pass
        evaluator.measured = diagnostics.last
    summary = evaluator.after(module, before, trainer.global_step, skipped) if trainer.is_global_zero else {}
    if logger is not None:
        from dinocell.track.loggers import finalize

        finalize(logger, run_dir)
    return summary


def run_record(source: Any) -> dict[str, Any]:
    """What every run writes down besides its config: the code that made it and the channel map it used."""
    from dinocell.data.channels import channel_map_record
    from dinocell.provenance import provenance

    return {**provenance(), **channel_map_record(source)}


# ----------------------------------------------------------------------------------- summary


class _Evaluator:
    """Before/after figures on held-out fields: the demo's proof that features became channel-invariant.

    ``heldout`` is the DataModule's held-out source: wells that training never reads.  The figures
    come from :mod:`dinocell.evaluate.heldout`, as the ``eval/*`` callback's and ``dinocell evaluate``'s
    do, on ``train.eval_fields`` fields with the training's preprocessing."""

    def __init__(self, cfg: Config, run_dir: Path, heldout: Any, record: dict[str, Any] | None = None,
                 heldout_wells: int = 0) -> None:
        self.record = dict(record or {})
        self.heldout_wells = int(heldout_wells)
        self.cfg, self.run_dir, self.heldout = cfg, run_dir, heldout
        self._fields: Any = None
        self.measured: tuple[int, Any] | None = None  # (step, HeldoutResult) of the latest pass, shared with eval/*

    def fields(self) -> Any:
        """The evaluated held-out fields (selected once; inputs cached after the first pass), or None."""
        from dinocell.evaluate.heldout import HeldoutFields, training_preprocess

        n = max(0, self.cfg.train.eval_fields)
        if self._fields is None and n >= 2 and self.heldout is not None and len(self.heldout) >= 2:
            pre = training_preprocess(self.cfg, list(self.heldout.channels))
            self._fields = HeldoutFields(self.heldout, pre, limit=n)
        return self._fields

    def _measure(self, module: Any, step: int) -> dict[str, Any] | None:
        from dinocell.errors import DataError
        from dinocell.evaluate.heldout import measure

        fields = self.fields()
        if fields is None:
            return None
        if self.measured is not None and self.measured[0] == step:  # the eval/* callback's pass at this step
            res = self.measured[1]
        else:
            try:
                res = measure(module.meta.teacher["backbone"], fields)
            except DataError as e:  # fewer than two readable held-out fields: no figures, say why
                log.warning("held-out evaluation skipped: %s", e)
                return None
            self.measured = (step, res)
        return {**res.figures, "eval_fields": len(res.records)}

    def before(self, module: Any) -> dict[str, Any] | None:
        """Figures of the model before training (cached in the run folder for resumed runs)."""
        cache = RunDir(self.run_dir).eval_before
        if cache.is_file():
            return json.loads(cache.read_text())
        res = self._measure(module, 0)
        if res is not None:
            write_text_atomic(cache, json.dumps(res, indent=2))
        return res

    def after(self, module: Any, before: dict[str, Any] | None, step: int, skipped: int = 0) -> dict[str, Any]:
        from dinocell.evaluate.heldout import FIGURES
        from dinocell.track.callbacks import reference_summary

        losses = module.loss_history
        summary: dict[str, Any] = {"steps": step, "loss_first": losses.first, "loss_last": losses.last}
        if len(losses):
            k = max(1, min(20, len(losses) // 10))
            summary["loss_first_mean"] = losses.first_mean(k)
            summary["loss_last_mean"] = losses.last_mean(k)
            summary["loss_mean"] = losses.mean
        summary["heldout_wells"] = self.heldout_wells
        summary["heldout_fields"] = len(self.heldout) if self.heldout is not None else 0
        summary["skipped_fields"] = int(skipped)
        after = self._measure(module, step) if before is not None else None
        if after is not None and before is not None:
            for key in FIGURES:
                summary[f"{key}_before"] = before.get(key)
                summary[f"{key}_after"] = after.get(key)
            summary["cross_channel_retrieval_top1"] = after.get("cross_channel_retrieval_top1")
            summary["transfer_knn_accuracy"] = after.get("transfer_knn_accuracy")
            summary["patch_chance"] = after.get("patch_chance")
            summary["consistency_matrix_after"] = after.get("consistency_matrix")
            summary["channels"] = after.get("channels")
            summary["eval_fields"] = after.get("eval_fields")
        summary.update(reference_summary(self.run_dir))
        v = self.cfg.data.views
        summary["policy"] = v.policy
        summary["aligned_globals"] = bool(v.aligned_globals or v.policy == "all_channels")
        summary["mean_global"] = bool(v.mean_global)
        summary["ibot_cross_channel"] = bool(self.cfg.loss.ibot_cross_channel)
        summary.update({k: v for k, v in self.record.items() if k not in summary})
        write_text_atomic(RunDir(self.run_dir).summary, json.dumps(summary, indent=2))
        print(format_summary(summary))
        return summary


def format_summary(s: dict[str, Any]) -> str:
    """The run summary as a small table (before -> after)."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [("loss (first -> last step)", s.get("loss_first"), s.get("loss_last"))]
    for key, label in (("channel_consistency", "channel consistency (centred)"),
                       ("channel_consistency_raw", "channel consistency (raw)"),
                       ("cross_channel_retrieval_top1", "cross-channel retrieval top-1"),
                       ("transfer_knn_accuracy", "cross-channel kNN transfer"),
                       ("patch_consistency", "patch consistency (centred)"),
                       ("patch_retrieval_top1", "patch retrieval top-1")):
        if f"{key}_after" in s:
            rows.append((label, s.get(f"{key}_before"), s.get(f"{key}_after")))
    if "reference_start" in s:
        rows.append((f"reference {s.get('reference_metric')} (start -> end)", s.get("reference_start"),
                     s.get("reference_end")))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  {'before':>8}  {'after':>8}", "-" * (width + 20)]
    lines += [f"{name:<{width}}  {f(a):>8}  {f(b):>8}" for name, a, b in rows]
    lines.append(f"steps: {s.get('steps')}   policy: {s.get('policy')}   held-out fields: "
                 f"{s.get('heldout_fields')}   skipped fields: {s.get('skipped_fields', 0)}")
    return "\n".join(lines)
