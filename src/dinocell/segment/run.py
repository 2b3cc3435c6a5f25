"""``dinocell segment fit``: annotated fields -> targets -> Lightning Trainer -> atomic checkpoints.

The engine is the pretraining one (:mod:`dinocell.engine`): same Trainer settings, atomic checkpoint
I/O read back with ``weights_only=True``, ``DIR/checkpoints/last.ckpt`` resumed by rerunning the
command, the same loggers (``track.logger``; csv by default here).  :func:`load_segmenter` rebuilds a trained model
from its run folder (architecture recorded in the checkpoint, so no backbone file is needed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinocell.config import save_config
from dinocell.engine.checkpoint import AtomicCheckpointIO, load_checkpoint_file
from dinocell.engine.trainer import (
    build_trainer,
    checkpoint_callback,
    parse_devices,
    quiet_fit,
    quiet_lightning,
    resolve_precision,
)
from dinocell.errors import UserError
from dinocell.models.loading import load_model
from dinocell.models.weights import load_state_checked
from dinocell.paths import write_text_atomic
from dinocell.provenance import provenance
from dinocell.runs import RunDir
from dinocell.segment.config import SegmentConfig, segment_config_from_dict
from dinocell.segment.model import SegmentationNet, segmentation_model
from dinocell.segment.module import CKPT_KEY, SegmentModule
from dinocell.segment.scale import field_px, resolve_scale

log = logging.getLogger(__name__)


def training_fields(cfg: SegmentConfig, source: Any = None,
                    ) -> tuple[list[np.ndarray], list[np.ndarray], list[str], float | None]:
    """(input planes, targets, channel names, median object diameter in px) of every annotated training
    field, held in memory."""
    from dinocell.data.sources import open_source
    from dinocell.segment.data import MaskFinder, input_plane, iter_annotated
    from dinocell.segment.scale import equivalent_diameters
    from dinocell.segment.targets import make_targets

    source = source or open_source(cfg.data)
    finder = MaskFinder.for_source(source, cfg.task.objects, str(cfg.data.source))
    inputs, targets, diameters = [], [], []
    for _, planes, labels in iter_annotated(source, finder):
        inputs.append(input_plane(planes, source.channels, source.fluorescent, cfg.task.channel))
        targets.append(make_targets(labels, flows=cfg.model.flow_head))
        diameters.append(equivalent_diameters(labels))
    d = np.concatenate(diameters) if diameters else np.zeros(0)
    return inputs, targets, list(source.channels), (float(np.median(d)) if d.size else None)


def split_training_source(cfg: SegmentConfig, run_dir: Path, resuming: bool) -> tuple[Any, list[str], int]:
    """(training source, held-out wells, held-out field count): ``data.holdout`` wells are never trained
    on; the list is decided once per run folder (``holdout.txt``) and kept for resumes, as pretrain's."""
    from dinocell.data.holdout import read_holdout_file, resolve_wells, split_source, write_holdout_file
    from dinocell.data.sources import open_source

    source = open_source(cfg.data)
    wells = read_holdout_file(run_dir) if resuming else None
    if wells is None:
        wells = resolve_wells(source.records, cfg.data.holdout)
    train, held = split_source(source, wells)
    write_holdout_file(run_dir, wells)  # the counts go to summary.json, never into the input config
    return train, list(wells), len(held.records)


def fit(cfg: SegmentConfig, output_dir: str | os.PathLike[str], backbone: str | None = None,
        resume: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """Train the segmenter into ``output_dir`` (resuming ``checkpoints/last.ckpt``); returns the summary.

    ``max_steps`` stops this invocation early without changing the schedule (``train.steps``): a later
    rerun resumes the very same run.  The sample stream and the lr schedule are functions of the
    step, so a resumed run is bit-identical to an uninterrupted one."""
    import lightning as L

    from dinocell.segment.data import CropDataset

    quiet_lightning()
    run_dir = Path(output_dir)
    run = RunDir(run_dir)
    if backbone is not None:
        cfg.model.backbone = str(backbone)
    if not cfg.track.name:
        cfg.track.name = f"segment-{cfg.task.objects}-{cfg.task.channel}-{run_dir.name}"
    cfg.output_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last = run.last_checkpoint
    ckpt_path = str(last) if resume and last.is_file() else None
    if not resume:
        for old in run.checkpoints.glob("*.ckpt"):
            old.unlink()
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {max_steps}")
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    bb = segmentation_model(cfg).backbone  # first: it sets cfg.data's scaling as the backbone was trained
    train_source, held_wells, held_fields = split_training_source(cfg, run_dir, ckpt_path is not None)
    inputs, targets, channels, diameter = training_fields(cfg, train_source)
    requested = cfg.model.input_scale
    cfg.model.input_scale = resolve_scale(cfg.model, diameter, bb.patch_size)  # resolved input: predict reuses it
    net = SegmentationNet(bb, cfg.model)
    record = provenance()  # the code that made the run: config.yaml's header comments and summary.json, as pretrain's
    save_config(cfg, run_dir, record=record)  # type: ignore[arg-type]
    crop = field_px(cfg.task.crop_size, float(cfg.model.input_scale))
    dataset = CropDataset(inputs, targets, crop, cfg.train.steps * cfg.train.batch_size, seed=cfg.train.seed)
    module = SegmentModule(cfg, net, dataset, channels)
    logger = None
    if cfg.track.logger != "none":
        from dinocell.track.loggers import build_logger

        logger = build_logger(cfg, run_dir, resume=ckpt_path is not None)  # type: ignore[arg-type]
    trainer = build_trainer(
        accelerator=cfg.train.accelerator, devices=parse_devices(cfg.train.devices),
        # the loader holds the whole run and restarts at global_step * batch on resume; max_epochs=-1 so
        # a rerun with a longer train.steps continues after a finished run
        precision=resolve_precision(cfg.train.precision), max_steps=min(cfg.train.steps, max_steps or cfg.train.steps),
        max_epochs=-1,
        logger=logger if logger is not None else False, plugins=[AtomicCheckpointIO(cfg.train.keep_last_n)],
        callbacks=[checkpoint_callback(run_dir, cfg.train.checkpoint_every_steps)],
        enable_progress_bar=cfg.train.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, log_every_n_steps=1, default_root_dir=str(run_dir),
    )
    with quiet_fit():
        trainer.fit(module, ckpt_path=ckpt_path)
    if trainer.global_step > 0:
        trainer.save_checkpoint(last, weights_only=False)
    losses = module.loss_history
    k = max(1, min(20, len(losses) // 10))
    summary = {"steps": trainer.global_step, "objects": cfg.task.objects, "channel": cfg.task.channel,
               "fields": len(inputs), "heldout_wells": len(held_wells), "heldout_fields": held_fields,
               "object_diameter_px": round(diameter, 3) if diameter is not None else None,
               "input_scale": cfg.model.input_scale,
               "input_scale_from": "auto" if isinstance(requested, str) else "config",
               "crop_field_px": crop, "backbone": cfg.model.backbone, "mode": cfg.model.mode,
               "loss_first_mean": float(np.mean(losses[:k])) if losses else None,
               "loss_last_mean": float(np.mean(losses[-k:])) if losses else None, **record}
    write_text_atomic(run.summary, json.dumps(summary, indent=2))
    if logger is not None:
        from dinocell.track.loggers import finalize

        finalize(logger, run_dir)
    return summary


def load_segmenter(run_dir: str | os.PathLike[str]) -> tuple[SegmentationNet, SegmentConfig, list[str]]:
    """(model in eval mode, its config, training channel names) from a ``segment fit`` run folder."""
    p = Path(run_dir)
    path = RunDir(p).last_checkpoint if p.is_dir() else p
    if p.is_dir() and not path.is_file():
        raise UserError(f"no segmentation checkpoint in {p} (expected {path}); run 'dinocell segment fit' first")
    ckpt = load_checkpoint_file(path)
    meta = ckpt.get(CKPT_KEY)
    if not meta:
        raise UserError(f"{path} is not a 'dinocell segment' checkpoint")
    cfg = segment_config_from_dict(meta["config"])
    net = SegmentationNet(load_model(None, arch=meta["backbone_arch"]).backbone, cfg.model)
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    load_state_checked(net, state, str(path), "the segmentation model its config describes")
    periods = meta.get("rope_periods")
    if periods is not None and net.backbone.model.rope is not None:
        with torch.no_grad():
            net.backbone.model.rope.periods.copy_(periods.to(net.backbone.model.rope.periods.dtype))
    return net.eval(), cfg, list(meta.get("channel_names", []))


def apply_overrides(net: SegmentationNet, cfg: SegmentConfig, overrides: list[str]) -> SegmentConfig:
    """A loaded run's config with ``key=value`` overrides; a numeric ``model.input_scale`` among them
    also rescales the model (e.g. ``model.input_scale=1`` to compare with the recorded auto scale)."""
    if not overrides:
        return cfg
    from dinocell.config import to_dict

    cfg = segment_config_from_dict(to_dict(cfg), overrides)
    if not isinstance(cfg.model.input_scale, str):
        net.input_scale = float(cfg.model.input_scale)
    return cfg
