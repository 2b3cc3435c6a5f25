"""``dinocell pretrain``: build the Lightning Trainer (devices, DDP/FSDP, precision, checkpoints,
loggers), resume automatically, and summarise what the run learned.

Resuming: rerunning the same command finds ``DIR/checkpoints/last.ckpt`` and continues from it
(``resume=False`` starts over).  Checkpoints are written to a temporary name and renamed, and they
are read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from dinocell.config import Config, save_config
from dinocell.errors import UserError

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LAST = "last.ckpt"


# ----------------------------------------------------------------------------------- checkpoint I/O


def load_checkpoint_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; anything that would run code is refused."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing to load {p}: it is not a plain weights file ({first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from None


def _checkpoint_io() -> Any:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Write to ``<name>.tmp`` then rename (a killed run never leaves a half-written checkpoint);
        read with ``weights_only=True``."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp")
            torch.save(checkpoint, tmp)
            os.replace(tmp, p)

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
            return load_checkpoint_file(path, map_location or "cpu")

    return AtomicCheckpointIO()


def check_compatible(module_state: dict[str, torch.Tensor], ckpt_state: dict[str, torch.Tensor], source: str) -> None:
    """Fail with the mismatched keys listed when a checkpoint belongs to another architecture."""
    missing = [k for k in module_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in module_state]
    shape = [f"{k} {tuple(ckpt_state[k].shape)} vs {tuple(v.shape)}" for k, v in module_state.items()
             if k in ckpt_state and tuple(ckpt_state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        raise UserError(f"checkpoint {source} does not match this model's architecture ({'; '.join(parts)}); "
                        "use --no-resume or another --output-dir")


# ----------------------------------------------------------------------------------- trainer


def resolve_precision(precision: str) -> str:
    """``auto``: bf16-mixed where supported, else 16-mixed on GPU, 32 on CPU."""
    if precision != "auto":
        return "32-true" if precision == "32" else precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


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
        return "ddp_find_unused_parameters_true" if cfg.loss.ibot_weight == 0 else "ddp"
    return "auto"


def _devices(value: str) -> Any:
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        return value


def _callbacks(cfg: Config, run_dir: Path) -> list[Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    cbs: list[Any] = [
        ModelCheckpoint(
            dirpath=run_dir / CKPT_DIR, filename="step{step:08d}", auto_insert_metric_name=False,
            every_n_train_steps=max(1, cfg.train.checkpoint_every_steps), save_last=True,
            save_top_k=max(1, cfg.train.keep_last_n), monitor="ckpt_step", mode="max",
        )
    ]
    try:
        from dinocell.track.callbacks import DiagnosticsCallback
    except ImportError:
        DiagnosticsCallback = None  # noqa: N806
    if DiagnosticsCallback is not None and cfg.track.logger != "none":
        cbs.append(DiagnosticsCallback(cfg, run_dir))
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

    from dinocell.data.sources import open_source
    from dinocell.train.data import steps_per_epoch, stream_steps_per_epoch, use_stream
    from dinocell.train.module import DinoCellModule

    if not log.isEnabledFor(logging.DEBUG):  # Lightning's banners drown the progress bar
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
    run_dir = Path(output_dir)
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    cfg.output_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / CKPT_DIR / LAST
    ckpt_path = str(last) if resume and last.is_file() else None
    if not resume and (run_dir / CKPT_DIR).is_dir():
        for old in (run_dir / CKPT_DIR).glob("*.ckpt"):
            old.unlink()
    save_config(cfg, run_dir)

    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    source = open_source(cfg.data)
    trainer_kwargs = dict(
        accelerator=cfg.train.accelerator, devices=_devices(cfg.train.devices), num_nodes=cfg.train.num_nodes,
        strategy=_strategy(cfg), precision=resolve_precision(cfg.train.precision),
    )
    # A throw-away Trainer tells the world size (devices x nodes) before the schedules are built.
    world_size = _world_size(trainer_kwargs)
    if use_stream(cfg, source):
        spe = stream_steps_per_epoch(cfg, source, world_size)
    else:
        spe = steps_per_epoch(cfg, len(source), world_size)
    total = spe * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    module = DinoCellModule(cfg, source, spe, total, cfg.data.batch_size * world_size)
    if cfg.train.compile:
        module.meta.compile_blocks()  # in place: parameter names (lr decay, checkpoints) unchanged

    evaluator = _Evaluator(cfg, run_dir)
    before = evaluator.before(module)

    logger = _logger(cfg, run_dir, resume=ckpt_path is not None)
    trainer = L.Trainer(
        **{**trainer_kwargs, "strategy": _strategy(cfg)},  # a strategy object serves one Trainer only
        max_steps=total, max_epochs=1, logger=logger if logger is not None else False,
        callbacks=_callbacks(cfg, run_dir), plugins=[_checkpoint_io()],
        enable_progress_bar=cfg.train.progress_bar,  # clipping: per module, in the LightningModule
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=1, use_distributed_sampler=False, default_root_dir=str(run_dir),
        deterministic=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
        warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        trainer.fit(module, ckpt_path=ckpt_path)
    if trainer.global_step > 0:  # collective under DDP/FSDP: every rank calls it, rank 0 writes
        trainer.save_checkpoint(last, weights_only=False)
    summary = evaluator.after(module, before, trainer.global_step) if trainer.global_rank == 0 else {}
    if logger is not None:
        from dinocell.track.loggers import finalize

        finalize(logger, run_dir)
    return summary


def _world_size(kwargs: dict[str, Any]) -> int:
    import lightning as L

    try:
        t = L.Trainer(**kwargs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)
        return int(t.world_size)
    except Exception as e:  # misconfigured devices/strategy: one clear line
        raise UserError(f"cannot set up the trainer: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------- summary


class _Evaluator:
    """Before/after figures on held-out fields: the demo's proof that features became channel-invariant."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self._held: tuple[torch.Tensor, list[int]] | tuple[()] | None = None

    def _held_out(self) -> tuple[torch.Tensor, list[int]] | None:
        """Held-out fields, loaded once per run (``before`` and ``after`` measure the same tensor)."""
        if self._held is None:
            self._held = self._load_held_out()
        return self._held or None

    def _load_held_out(self) -> tuple[torch.Tensor, list[int]] | tuple[()]:
        from dataclasses import replace

        from dinocell.data.sources import load_resized_fields, open_source

        data = self.cfg.data
        n = max(0, self.cfg.train.eval_fields)
        if n == 0:
            return ()
        if data.source == "synthetic":  # unseen fields: another seed of the generator
            per_well = data.synthetic.sites_per_well * data.synthetic.n_plates
            syn = replace(data.synthetic, seed=data.synthetic.seed + 10_007, n_fields=n * per_well)
            src = open_source(replace(data, synthetic=syn))
        else:
            src = open_source(data)
        fields, labels = load_resized_fields(src, n, data.views.global_crop_size)
        if len(fields) < 2:
            return ()
        return torch.stack(fields), labels

    def _measure(self, module: Any, held: tuple[torch.Tensor, list[int]]) -> dict[str, Any]:
        from dinocell.evaluate.consistency import summarize_multiview

        fields, labels = held
        backbone = module.meta.teacher["backbone"]
        return summarize_multiview(backbone, fields, labels, module.fluorescent, module.channel_names,
                                   crop_size=None)

    def before(self, module: Any) -> dict[str, Any] | None:
        """Figures of the model before training (cached in the run folder for resumed runs)."""
        cache = self.run_dir / "eval_before.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        held = self._held_out()
        if held is None:
            return None
        res = self._measure(module, held)
        _write_json(cache, res)
        return res

    def after(self, module: Any, before: dict[str, Any] | None, step: int) -> dict[str, Any]:
        losses = module.loss_history
        summary: dict[str, Any] = {"steps": step, "loss_first": losses[0] if losses else None,
                                   "loss_last": losses[-1] if losses else None}
        if losses:
            k = max(1, min(20, len(losses) // 10))
            summary["loss_first_mean"] = sum(losses[:k]) / k
            summary["loss_last_mean"] = sum(losses[-k:]) / k
        held = self._held_out()
        if held is not None and before is not None:
            after = self._measure(module, held)
            for key in ("channel_consistency", "channel_consistency_raw", "cross_channel_retrieval_top1",
                        "transfer_knn_accuracy"):
                if key in after:
                    summary[f"{key}_before"] = before.get(key)
                    summary[f"{key}_after"] = after.get(key)
            summary["cross_channel_retrieval_top1"] = after.get("cross_channel_retrieval_top1")
            summary["transfer_knn_accuracy"] = after.get("transfer_knn_accuracy")
            summary["consistency_matrix_after"] = after.get("consistency_matrix")
            summary["channels"] = after.get("channels")
        summary["policy"] = self.cfg.data.views.policy
        _write_json(self.run_dir / "summary.json", summary)
        print(format_summary(summary))
        return summary


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def format_summary(s: dict[str, Any]) -> str:
    """The run summary as a small table (before -> after)."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [("loss (first -> last step)", s.get("loss_first"), s.get("loss_last"))]
    for key, label in (("channel_consistency", "channel consistency (centred)"),
                       ("channel_consistency_raw", "channel consistency (raw)"),
                       ("cross_channel_retrieval_top1", "cross-channel retrieval top-1"),
                       ("transfer_knn_accuracy", "cross-channel kNN transfer")):
        if f"{key}_after" in s:
            rows.append((label, s.get(f"{key}_before"), s.get(f"{key}_after")))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  {'before':>8}  {'after':>8}", "-" * (width + 20)]
    lines += [f"{name:<{width}}  {f(a):>8}  {f(b):>8}" for name, a, b in rows]
    lines.append(f"steps: {s.get('steps')}   policy: {s.get('policy')}")
    return "\n".join(lines)
