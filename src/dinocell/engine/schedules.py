"""Learning-rate curves as pure functions of the optimisation step, shared by ``pretrain`` and ``segment fit``.

Closed forms instead of precomputed arrays: nothing has to be checkpointed or rebuilt on resume, any step
(even past the end) has a value, and runs far shorter than the warm-up compress it.  The DINO-specific
schedules (teacher temperature, EMA momentum, Gram, last-layer freeze) stay in
:mod:`dinocell.train.schedules`.
"""

from __future__ import annotations

import math

__all__ = ["check_step", "cosine", "linear_warmup"]


def check_step(step: int) -> None:
    """Schedules are defined from step 0 on; a negative step is a caller's bug."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start`` at step 0, linearly to ``end`` at ``warmup_steps``, then ``end`` for ever."""
    check_step(step)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step >= warmup_steps:
        return float(end)
    return float(start + (end - start) * step / warmup_steps)


def cosine(
    step: int,
    total_steps: int,
    base: float,
    final: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warm-up ``warmup_start -> base``, then half a cosine ``base -> final``; ``final`` after the end.

    The warm-up is clamped to ``total_steps``, so a run shorter than its warm-up is all warm-up
    (reaching ``base`` at ``total_steps``) instead of failing.
    """
    check_step(step)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warmup = min(warmup_steps, total_steps)
    if step >= total_steps:
        return float(final)
    if step < warmup:
        return linear_warmup(step, warmup, warmup_start, base)
    progress = (step - warmup) / (total_steps - warmup)  # in [0, 1): step < total_steps
    return float(final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress)))
