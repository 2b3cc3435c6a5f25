"""Training schedules as pure functions of the optimisation step.

DINO-style training (Caron et al., 2021; DINOv2, Oquab et al., 2023; DINOv3, Siméoni et al., 2025)
drives four quantities by the step: learning rate (linear warm-up, then cosine to ``min_lr``), weight
decay (cosine 0.04 -> 0.4), teacher temperature (linear 0.04 -> 0.07, then constant) and teacher EMA
momentum (cosine 0.992 -> 1.0).  DINOv2 precomputes arrays of length ``total_steps``; we evaluate closed
forms instead, so nothing has to be checkpointed or rebuilt on resume, any step (even past the end) has
a value, and runs far shorter than the lr warm-up (the offline demo) compress it.  The teacher-temperature
warm-up is *not* compressed, as in dinov3 (``CosineScheduler`` over ``warmup_teacher_temp_epochs``): a run
shorter than it ends below ``teacher_temp``.  The generic lr curves (:func:`cosine`, :func:`linear_warmup`)
live in :mod:`dinocell.engine.schedules`, shared with ``segment fit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dinocell.config import LossConfig, OptimConfig
from dinocell.engine.schedules import check_step, cosine, linear_warmup
from dinocell.errors import ConfigError

__all__ = ["Schedules", "backbone_lr_factor", "cosine", "freeze_last_layer", "from_config", "gram_refresh_due",
           "gram_weight", "linear_warmup", "official_warmup"]

REFERENCE_BATCH = 1024  # DINOv2/v3 learning rates are quoted per 1024 images
SQRT_SCALE_FACTOR = 4.0  # dinov3 ``sqrt_wrt_1024``: lr * 4 * sqrt(global_batch / 1024)


def official_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """dinov3's warm-up, ``np.linspace(start, end, warmup_steps)[step]``: ``end`` is reached at the *last*
    warm-up step (``warmup_steps - 1``), then held.  Used for the teacher temperature."""
    check_step(step)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step >= warmup_steps:
        return float(end)
    if warmup_steps == 1:
        return float(start)
    return float(start + (end - start) * step / (warmup_steps - 1))


def freeze_last_layer(step: int, steps_per_epoch: int, freeze_epochs: int) -> bool:
    """True while the DINO head's last layer should stay frozen (its gradients zeroed).

    DINO freezes the prototypes for the first epoch(s): early on they would otherwise move fast
    enough to make training unstable.
    """
    check_step(step)
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return step < max(freeze_epochs, 0) * steps_per_epoch


def gram_refresh_due(step: int, start: int, every: int, first_update: int = 0,
                     max_updates: int | None = None) -> bool:
    """True when the Gram teacher takes a snapshot of the EMA teacher before ``step``.

    dinov3 (``train/train.py``) loads the EMA teacher once (``gram.it_load_ema_teacher``; here ``start``) and
    then refreshes it after iteration ``it`` when ``it + 1`` is an absolute multiple of
    ``gram.update_frequency`` (``every``), ``it + 1 >= gram.it_first_update`` (``first_update``) and fewer
    than ``gram.max_updates`` refreshes happened.  In our convention that is "before step ``it + 1``".
    Refreshes before ``start`` are skipped (nothing is anchored yet) but count against ``max_updates``, as
    upstream.  A pure function of the step: a resumed run refreshes at the same steps (upstream re-derives
    the count on resume with a formula that can over-count).
    """
    check_step(step)
    if step < start:
        return False
    if step == start:
        return True
    if every <= 0 or step % every or step < max(first_update, 1):
        return False
    if max_updates is None:
        return True
    first = max(first_update, 1)
    first_multiple = -(-first // every) * every
    done = 0 if step <= first_multiple else (step - first_multiple - 1) // every + 1
    return done < max_updates


def gram_weight(step: int, total_steps: int, peak: float, start: float | None = None, end: float | None = None,
                warmup_steps: int = 0) -> float:
    """The Gram loss weight at ``step``: constant ``peak`` unless ``start`` or ``end`` is given; then dinov3's
    ``linear_warmup_cosine_decay``: linear ``start -> peak`` over ``warmup_steps`` (end point excluded), a
    cosine ``peak -> end`` whose last value (``end``) falls on step ``total_steps - 1``, ``end`` after it."""
    check_step(step)
    if start is None and end is None:
        return float(peak)
    s0 = peak if start is None else start
    s1 = peak if end is None else end
    warmup = min(max(warmup_steps, 0), total_steps)
    if step < warmup:
        return float(s0 + (peak - s0) * step / warmup)
    n_cos = total_steps - warmup
    if step >= total_steps or n_cos <= 1:
        return float(s1 if step >= total_steps or n_cos < 1 else peak)
    progress = (step - warmup) / (n_cos - 1)
    return float(s1 + (peak - s1) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def backbone_lr_factor(step: int, head_warmup_steps: int, backbone_warmup_steps: int) -> float:
    """Multiplier of the backbone's lr in two-stage continued pretraining.

    0 while the backbone is frozen (``step < head_warmup_steps``), then a linear ramp that reaches 1 after
    ``backbone_warmup_steps`` steps: the first backbone update uses ``1 / backbone_warmup_steps`` of its lr,
    so freshly initialised heads cannot push large gradients into released weights at full lr.
    """
    check_step(step)
    if step < head_warmup_steps:
        return 0.0
    if backbone_warmup_steps <= 0:
        return 1.0
    return float(min(1.0, (step - head_warmup_steps + 1) / backbone_warmup_steps))


@dataclass(frozen=True)
class Schedules:
    """All step-driven hyper-parameters of a run; :meth:`at` evaluates them at one step."""

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    wd: float
    wd_end: float
    teacher_temp_start: float
    teacher_temp: float
    teacher_temp_warmup_steps: int
    momentum: float
    momentum_end: float

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0 or self.teacher_temp_warmup_steps < 0:
            raise ValueError("warm-up lengths must be >= 0")
        if self.teacher_temp_start <= 0 or self.teacher_temp <= 0:
            raise ValueError("teacher temperatures must be > 0")

    def at(self, step: int) -> dict[str, float]:
        """``{"lr", "weight_decay", "teacher_temp", "momentum"}`` at ``step`` (any step >= 0).

        The teacher temperature follows dinov3's warm-up over its full length, even past the run's end.
        """
        return {
            "lr": cosine(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps, 0.0),
            "weight_decay": cosine(step, self.total_steps, self.wd, self.wd_end),
            "teacher_temp": official_warmup(step, self.teacher_temp_warmup_steps, self.teacher_temp_start,
                                            self.teacher_temp),
            "momentum": cosine(step, self.total_steps, self.momentum, self.momentum_end),
        }


def from_config(
    optim_cfg: OptimConfig,
    loss_cfg: LossConfig,
    steps_per_epoch: int,
    epochs: int,
    global_batch: int,
    max_steps: int | None = None,
) -> Schedules:
    """Build :class:`Schedules` from the config, converting epochs to steps.

    ``optim.scale_lr == "sqrt"`` scales the peak lr by ``4 * sqrt(global_batch / 1024)``, dinov3's
    ``sqrt_wrt_1024`` rule (``min_lr`` is not scaled, as in dinov3's default schedules).  ``max_steps`` (e.g. ``train.max_steps``) shortens the run, and with it
    the cosine horizon.  The lr warm-up is clamped to the run; the teacher-temperature warm-up is not (dinov3).
    """
    if steps_per_epoch < 1:
        raise ConfigError(
            f"steps per epoch must be >= 1, got {steps_per_epoch} (dataset smaller than one batch?)"
        )
    if epochs < 1:
        raise ConfigError(f"config key 'train.epochs' must be >= 1, got {epochs}")
    if global_batch < 1:
        raise ConfigError(f"global batch size must be >= 1, got {global_batch}")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"config key 'train.max_steps' must be >= 1, got {max_steps}")
    if optim_cfg.warmup_epochs < 0:
        raise ConfigError(f"config key 'optim.warmup_epochs' must be >= 0, got {optim_cfg.warmup_epochs}")
    if loss_cfg.warmup_teacher_temp_epochs < 0:
        raise ConfigError(
            "config key 'loss.warmup_teacher_temp_epochs' must be >= 0, "
            f"got {loss_cfg.warmup_teacher_temp_epochs}"
        )
    if loss_cfg.teacher_temp <= 0 or loss_cfg.warmup_teacher_temp <= 0:
        raise ConfigError("config keys 'loss.teacher_temp' and 'loss.warmup_teacher_temp' must be > 0")

    if optim_cfg.scale_lr == "sqrt":
        lr = optim_cfg.lr * SQRT_SCALE_FACTOR * math.sqrt(global_batch / REFERENCE_BATCH)
    elif optim_cfg.scale_lr == "none":
        lr = optim_cfg.lr
    else:
        raise ConfigError(
            f"config key 'optim.scale_lr' must be one of none, sqrt; got '{optim_cfg.scale_lr}'"
        )

    total = steps_per_epoch * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    return Schedules(
        lr=lr,
        min_lr=optim_cfg.min_lr,
        warmup_steps=min(optim_cfg.warmup_epochs * steps_per_epoch, total),
        total_steps=total,
        wd=optim_cfg.weight_decay,
        wd_end=optim_cfg.weight_decay_end,
        teacher_temp_start=loss_cfg.warmup_teacher_temp,
        teacher_temp=loss_cfg.teacher_temp,
        teacher_temp_warmup_steps=loss_cfg.warmup_teacher_temp_epochs * steps_per_epoch,
        momentum=optim_cfg.momentum_teacher,
        momentum_end=optim_cfg.final_momentum_teacher,
    )
