"""LightningModule: optimiser groups (layer-wise lr decay, no-decay set), schedules, EMA, metrics.

Lightning owns the engine (devices, DDP/FSDP, precision, checkpoint I/O); this module owns what
DINOv3 adds on top: per-step lr / weight decay / teacher temperature / momentum from pure schedules,
the frozen last layer during the first epoch, gradient clipping per module (backbone, DINO head, iBOT
head), FSDP2 sharding, the Gram teacher snapshots and the EMA teacher update after each step.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch

from dinocell.config import Config, to_dict
from dinocell.data.sources import FieldSource, load_resized_fields
from dinocell.engine import param_groups as groups_
from dinocell.engine.checkpoint import check_resume
from dinocell.engine.trainer import NonFiniteLossError
from dinocell.track import diagnostics
from dinocell.train import schedules as sched
from dinocell.train.history import LossHistory
from dinocell.train.meta_arch import MultiViewDINO
from dinocell.train.sharding import clip_grad_norm_per_module, shard_meta

log = logging.getLogger(__name__)

__all__ = ["DinoCellModule", "NonFiniteLossError", "build_optimizer", "param_groups", "set_backbone_frozen"]

_HEAD_WARMUP_FROZEN = "_dinocell_head_warmup_frozen"  # marks a parameter frozen by the head warm-up


def param_groups(meta: MultiViewDINO, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups for the student (:func:`dinocell.engine.param_groups.param_groups`): layer-wise lr
    decay (DINOv2/3), patch-embed lr x0.2, dinov3's weight decay rule, a flag on the prototype layers (frozen
    early) and one on the backbone (its lr ramps separately in two-stage continued pretraining).  Backbone
    parameters frozen by the head warm-up are kept: they join the optimiser now and receive updates once
    unfrozen."""
    oc = cfg.optim
    named = [(n, p) for n, p in meta.student.named_parameters()
             if p.requires_grad or getattr(p, _HEAD_WARMUP_FROZEN, False)]
    return groups_.param_groups(named, meta.student["backbone"], oc.layerwise_decay, oc.patch_embed_lr_mult)


def set_backbone_frozen(backbone: torch.nn.Module, frozen: bool) -> None:
    """Freeze (or release) the student backbone for the head warm-up of two-stage continued pretraining.

    ``requires_grad=False`` means autograd computes no backbone gradient, so AdamW (which skips parameters
    whose ``grad`` is None) neither steps nor weight-decays it; the mark keeps it in :func:`param_groups`.
    """
    for p in backbone.parameters():
        if frozen and p.requires_grad:
            p.requires_grad_(False)
            setattr(p, _HEAD_WARMUP_FROZEN, True)
        elif not frozen and getattr(p, _HEAD_WARMUP_FROZEN, False):
            p.requires_grad_(True)
            delattr(p, _HEAD_WARMUP_FROZEN)


def build_optimizer(meta: MultiViewDINO, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; the fused kernel (CPU and CUDA) when this torch has it."""
    b1, b2 = cfg.optim.betas
    groups = param_groups(meta, cfg)
    try:
        return torch.optim.AdamW(groups, betas=(b1, b2), fused=True)
    except (RuntimeError, TypeError, ValueError):  # e.g. a device/dtype without a fused kernel
        return torch.optim.AdamW(groups, betas=(b1, b2), foreach=True)


class DinoCellModule(L.LightningModule):
    """Continued multi-view DINOv3 pretraining."""

    def __init__(self, cfg: Config, source: FieldSource, steps_per_epoch: int, total_steps: int,
                 global_batch: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.source = source
        self.meta = MultiViewDINO(cfg)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.schedules = sched.from_config(cfg.optim, cfg.loss, steps_per_epoch, cfg.train.epochs,
                                           global_batch, max_steps=total_steps)
        self.channel_names = list(source.channels)
        self.fluorescent = list(source.fluorescent)
        self.example_fields, self.example_labels = self._examples(4)
        self._t_last: float | None = None
        self._t_data: float = 0.0
        self._last_values: dict[str, float] = {}
        self.loss_history = LossHistory()
        # Step at which a still-uniform teacher is reported (once): past the first tenth of the run.
        self._uniform_check_step = max(20, total_steps // 10)
        # Collapse is judged on a trend after the lr warm-up / first tenth of the run, never at step 0.
        self._collapse = diagnostics.CollapseMonitor(max(self._uniform_check_step, self.schedules.warmup_steps))
        # First non-finite loss since the last check, kept on the device (no host sync per step).
        self._bad_step: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ data
    def _examples(self, n: int) -> tuple[torch.Tensor, list[int]]:
        """A few fixed fields for diagnostics (attention maps, PCA), at the global crop size."""
        size = self.cfg.data.views.global_crop_size
        fields, labels = load_resized_fields(self.source, n, size)
        if not fields:
            return torch.zeros(0, len(self.channel_names), size, size), []
        return torch.stack(fields), labels

    # ------------------------------------------------------------------ engine
    def configure_model(self) -> None:
        """Under ``train.strategy=fsdp`` (Lightning's ModelParallelStrategy): FSDP2 over all ranks."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        if any(hasattr(p, "device_mesh") for p in self.meta.parameters()):
            return  # already sharded (configure_model may run again)
        from torch.distributed.device_mesh import init_device_mesh

        # the strategy's device, not self.device: the module may still sit on the CPU here
        mesh = init_device_mesh(self.trainer.strategy.root_device.type, (self.trainer.world_size,))
        shard_meta(self.meta, mesh)

    def on_fit_end(self) -> None:
        """Under FSDP, replace the EMA teacher backbone by a gathered, unsharded copy on every rank.

        What runs after ``fit`` -- the final checkpoint, rank 0's before/after evaluation and export --
        then needs no collective: a sharded backbone called on rank 0 alone would wait for its peers.
        """
        bb = self.meta.teacher["backbone"]
        if not any(hasattr(p, "device_mesh") for p in bb.parameters()):
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from dinocell.models.backbone import build_backbone

        full = get_model_state_dict(bb, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        plain = build_backbone(self.cfg.model, img_size=self.cfg.data.views.global_crop_size).to(self.device)
        plain.load_state_dict(full, strict=True)
        plain.requires_grad_(False)
        self.meta.teacher["backbone"] = plain.eval()

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.meta, self.cfg)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        """Clip backbone, DINO head and iBOT head to ``optim.clip_grad`` each, as DINOv3 does.

        Lightning's own clipping (one global norm, refused by its FSDP plugins) stays off; this hook runs
        after AMP unscaling, on every rank.
        """
        if self.cfg.optim.clip_grad <= 0:
            return
        norms = clip_grad_norm_per_module(self.meta.student, self.cfg.optim.clip_grad)
        if self._should_log(self.global_step):
            self.log_dict({f"gradients/{k}_norm": v.detach() for k, v in norms.items()}, on_step=True,
                          on_epoch=False)

    def _apply_schedules(self, step: int) -> dict[str, float]:
        values = self.schedules.at(min(step, self.total_steps - 1))
        frozen = sched.freeze_last_layer(step, self.steps_per_epoch, self.cfg.optim.freeze_last_layer_epochs)
        head_warmup = self.cfg.train.head_warmup_steps
        bb_factor = sched.backbone_lr_factor(step, head_warmup, self.cfg.optim.backbone_warmup_steps)
        if head_warmup > 0:  # a pure function of the step: a resumed run re-applies the right stage
            set_backbone_frozen(self.meta.student["backbone"], step < head_warmup)
        opt = self.optimizers(use_pl_optimizer=False)
        for g in opt.param_groups:
            lr = values["lr"] * g["lr_multiplier"] * (bb_factor if g.get("is_backbone") else 1.0)
            g["lr"] = 0.0 if (frozen and g["is_last_layer"]) else lr
            g["weight_decay"] = values["weight_decay"] * g["wd_multiplier"]
        lc = self.cfg.loss
        values["gram_weight"] = sched.gram_weight(step, self.total_steps, lc.gram_weight, lc.gram_weight_start,
                                                  lc.gram_weight_end, lc.gram_weight_warmup_steps)
        values["backbone_lr_factor"] = bb_factor
        return values

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self._t_data = now - self._t_last if self._t_last is not None else 0.0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        values = self._apply_schedules(step)
        lc = self.cfg.loss
        if sched.gram_refresh_due(step, lc.gram_teacher_start, lc.gram_teacher_every, lc.gram_teacher_first_update,
                                  lc.gram_teacher_max_updates):
            self.meta.refresh_gram_teacher()
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.train.seed * 1_000_003 + step)
        self.meta.gram_active = step >= lc.gram_teacher_start
        self.meta.gram_weight = values["gram_weight"]
        # CPU random draws inside the forward (RoPE coordinate rescaling, drop path on CPU) come from a
        # per-step seed, so a resumed run repeats them exactly whatever the data pipeline drew meanwhile.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.cfg.train.seed * 1_000_003 + step + 500_009)
            out = self.meta(batch, values["teacher_temp"], gram_generator=gen)
        total = out["total"]
        self._track_finite(total.detach(), step)
        if self._finite_check_due(step):
            self._raise_if_not_finite(step)
        self._last_values = values
        self.loss_history.record(total)
        if step == self._uniform_check_step:
            self._check_teacher_targets(out["_teacher_probs"], step, values["teacher_temp"])
        if self._should_log(step):
            self._log_step(out, values, batch)
        return total

    def _track_finite(self, total: torch.Tensor, step: int) -> None:
        """Remember the first non-finite loss on the device: ``where`` instead of an ``if`` (no sync)."""
        bad = ~torch.isfinite(total)
        if self._bad_step is None or self._bad_loss is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=total.device)
            self._bad_loss = torch.zeros((), dtype=total.dtype, device=total.device)
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, torch.full_like(self._bad_step, step), self._bad_step)
        self._bad_loss = torch.where(first, total, self._bad_loss)

    def _finite_check_due(self, step: int) -> bool:
        """Every ``train.finite_check_every`` steps, on logged steps, on the last step and before every
        checkpoint (so no checkpoint ever holds weights updated from a NaN loss)."""
        every = self.cfg.train.finite_check_every
        ckpt = max(1, self.cfg.train.checkpoint_every_steps)
        return (step % every == 0 or (step + 1) % ckpt == 0 or step >= self.total_steps - 1
                or self._should_log(step))

    def _raise_if_not_finite(self, step: int) -> None:
        """Raise on every rank when any rank saw a non-finite loss (one rank stopping alone would leave
        the others waiting in the next all-reduce)."""
        if self._bad_step is None or self._bad_loss is None:
            return
        any_bad = (self._bad_step >= 0).to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(any_bad, op=torch.distributed.ReduceOp.MAX)
        if not int(any_bad):  # the one host sync of the check
            return
        bad_step = int(self._bad_step)
        where = (f"loss is {float(self._bad_loss)} at step {bad_step}" if bad_step >= 0
                 else f"loss became non-finite on another rank by step {step}")
        raise NonFiniteLossError(f"{where}; stopping (the last good checkpoint in checkpoints/ is kept). "
                                 "Lower optim.lr or check the data scaling.")

    def _check_teacher_targets(self, probs: torch.Tensor, step: int, teacher_temp: float) -> None:
        msg = diagnostics.uniform_teacher_message(probs, step, teacher_temp)
        if msg is not None and self.trainer.global_rank == 0:
            log.warning(msg)

    def _should_log(self, step: int) -> bool:
        interval = max(1, self.cfg.track.log_interval)
        return self.logger is not None and (step % interval == 0 or step == self.total_steps - 1)

    def _log_step(self, out: dict[str, torch.Tensor], values: dict[str, float], batch: dict[str, Any]) -> None:
        metrics: dict[str, float] = {f"loss/{k}": float(out[k].detach()) for k in ("dino", "ibot", "koleo",
                                                                                  "gram", "total")}
        metrics.update({
            "training/lr": values["lr"], "training/weight_decay": values["weight_decay"],
            "training/momentum": values["momentum"], "training/teacher_temp": values["teacher_temp"],
            "training/gram_weight": values["gram_weight"], "training/backbone_lr_factor": values["backbone_lr_factor"],
            "training/epoch": self.global_step / self.steps_per_epoch, "training/iteration": self.global_step,
            "perf/data_time": self._t_data,
        })
        metrics.update(diagnostics.collapse_stats(out["_teacher_probs"], out["_student_cls"],
                                                  out["_student_cls"], out["_patch_tokens"]))
        usage = diagnostics.prototype_usage_stats(out["_teacher_logits"], values["teacher_temp"])
        metrics.update(usage)
        msg = self._collapse.update(usage, self.global_step)
        if msg is not None and self.trainer.global_rank == 0:
            log.warning(msg)
        metrics.update(diagnostics.system_stats())
        if hasattr(self.source, "metrics"):
            metrics.update({k: float(v) for k, v in self.source.metrics().items() if k.startswith("s3/")})
        loader = getattr(self.trainer, "train_dataloader", None)
        if hasattr(loader, "metrics"):
            metrics.update({k: float(v) for k, v in loader.metrics().items()})
        # step-only metrics: Lightning weighs by batch size only for epoch means, so none is passed (the
        # per-device batch is the DataModule's, derived from data.batch_size; it is not logged twice)
        self.log_dict(metrics, on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._should_log(self.global_step):
            return
        self.log_dict(diagnostics.grad_stats(self.meta.student.named_parameters()), on_step=True, on_epoch=False)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step, then EMA-update the teacher with this step's momentum.

        The EMA lives here, not in ``on_train_batch_end``: checkpoint callbacks run before the
        module's batch-end hook, and a checkpoint must hold the teacher *after* its update.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        momentum = self._last_values.get("momentum", self.schedules.at(0)["momentum"])
        self.meta.update_teacher(momentum)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_last is not None and self._should_log(self.global_step - 1):
            dt = now - self._t_last
            self.log_dict({"perf/iteration_time": dt, "perf/images_per_second": self.global_batch / max(dt, 1e-9)},
                          on_step=True, on_epoch=False)
        self._t_last = now

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Config and RNG states as plain data (loadable with ``weights_only=True``)."""
        np_state = np.random.get_state()
        checkpoint["dinocell"] = {
            "config": to_dict(self.cfg),
            "loss_history": self.loss_history.state(),
            "channel_names": self.channel_names,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                          int(np_state[3]), float(np_state[4])],
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # FSDP2 (ModelParallelStrategy) loads and removes it beforehand
            check_resume(self.state_dict(), checkpoint, to_dict(self.cfg))
        self.loss_history = LossHistory.from_state(checkpoint.get("dinocell", {}).get("loss_history"))
        state = checkpoint.get("dinocell", {}).get("rng")
        if not state:
            return
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
