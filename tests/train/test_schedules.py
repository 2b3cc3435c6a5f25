"""Step schedules: endpoints, shape, purity and short-run edge cases."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dinocell.config import LossConfig, OptimConfig
from dinocell.errors import ConfigError
from dinocell.train.schedules import Schedules, cosine, freeze_last_layer, from_config, linear_warmup


def test_linear_warmup() -> None:
    assert linear_warmup(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(10, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(10_000, 10, 0.04, 0.07) == pytest.approx(0.07)  # constant afterwards
    assert linear_warmup(0, 0, 0.04, 0.07) == pytest.approx(0.07)  # no warm-up
    values = [linear_warmup(s, 10, 0.04, 0.07) for s in range(12)]
    assert all(b > a for a, b in zip(values[:10], values[1:11], strict=True))


def test_cosine_endpoints_and_midpoint() -> None:
    assert cosine(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine(100, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine(10**6, 100, 1.0, 0.1) == pytest.approx(0.1)  # beyond the end
    assert cosine(50, 100, 1.0, 0.1) == pytest.approx(0.55)  # midpoint = average
    assert cosine(99, 100, 1.0, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.99)))
    values = [cosine(s, 100, 1.0, 0.1) for s in range(101)]
    assert all(b < a for a, b in zip(values, values[1:], strict=False))


def test_cosine_increasing_and_warmup() -> None:
    # weight decay / momentum go *up*
    inc = [cosine(s, 50, 0.04, 0.4) for s in range(51)]
    assert inc[0] == pytest.approx(0.04) and inc[-1] == pytest.approx(0.4)
    assert all(b > a for a, b in zip(inc, inc[1:], strict=False))
    # warm-up 0 -> base over 10 steps, then cosine over the remaining 90 (midpoint at 55)
    assert cosine(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert cosine(5, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine(10, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine(55, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine(0, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.2) == pytest.approx(0.2)
    lr = [cosine(s, 100, 1.0, 0.0, warmup_steps=10) for s in range(101)]
    assert max(lr) == pytest.approx(1.0) and lr.index(max(lr)) == 10


def test_cosine_short_runs() -> None:
    # one step, no warm-up: base on the step, final after it
    assert cosine(0, 1, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine(1, 1, 1.0, 0.1) == pytest.approx(0.1)
    # warm-up longer than the run: clamped, the run is all warm-up, values stay finite and monotone
    vals = [cosine(s, 4, 1.0, 0.1, warmup_steps=100) for s in range(4)]
    assert vals == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert cosine(4, 4, 1.0, 0.1, warmup_steps=100) == pytest.approx(0.1)
    # warm-up equal to the run minus one: one cosine step at base
    assert cosine(3, 4, 1.0, 0.1, warmup_steps=3) == pytest.approx(1.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        cosine(0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        cosine(-1, 10, 1.0, 0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup(0, -1, 0.0, 1.0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        freeze_last_layer(0, 0, 1)


def test_freeze_last_layer() -> None:
    assert freeze_last_layer(0, 10, 1)
    assert freeze_last_layer(9, 10, 1)
    assert not freeze_last_layer(10, 10, 1)
    assert not freeze_last_layer(0, 10, 0)


def _schedules() -> Schedules:
    return Schedules(
        lr=1e-3,
        min_lr=1e-6,
        warmup_steps=10,
        total_steps=100,
        wd=0.04,
        wd_end=0.4,
        teacher_temp_start=0.04,
        teacher_temp=0.07,
        teacher_temp_warmup_steps=30,
        momentum=0.992,
        momentum_end=1.0,
    )


def test_schedules_at() -> None:
    sch = _schedules()
    start = sch.at(0)
    assert set(start) == {"lr", "weight_decay", "teacher_temp", "momentum"}
    assert start == pytest.approx({"lr": 0.0, "weight_decay": 0.04, "teacher_temp": 0.04, "momentum": 0.992})
    assert sch.at(10)["lr"] == pytest.approx(1e-3)
    assert sch.at(15)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 15 / 29)  # np.linspace(0.04, 0.07, 30)
    assert sch.at(29)["teacher_temp"] == pytest.approx(0.07)
    assert sch.at(50)["weight_decay"] == pytest.approx(0.22)
    assert sch.at(50)["momentum"] == pytest.approx(0.996)
    end = sch.at(100)
    assert end == pytest.approx({"lr": 1e-6, "weight_decay": 0.4, "teacher_temp": 0.07, "momentum": 1.0})
    # pure: same step, same values, in any order; the dataclass is frozen
    assert sch.at(37) == sch.at(37) == _schedules().at(37)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sch.lr = 1.0  # type: ignore[misc]


def test_schedules_validation() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        dataclasses.replace(_schedules(), total_steps=0)
    with pytest.raises(ValueError, match="teacher temperatures"):
        dataclasses.replace(_schedules(), teacher_temp=0.0)


def test_from_config_defaults() -> None:
    optim, loss = OptimConfig(), LossConfig()
    sch = from_config(optim, loss, steps_per_epoch=100, epochs=100, global_batch=64)
    assert sch.total_steps == 10_000
    assert sch.warmup_steps == optim.warmup_epochs * 100
    assert sch.teacher_temp_warmup_steps == loss.warmup_teacher_temp_epochs * 100
    assert sch.lr == pytest.approx(optim.lr)  # scale_lr "none"
    assert (sch.wd, sch.wd_end) == (0.04, 0.4)
    assert (sch.teacher_temp_start, sch.teacher_temp) == (0.04, 0.07)
    assert (sch.momentum, sch.momentum_end) == (0.992, 1.0)
    assert sch.at(10_000)["lr"] == pytest.approx(optim.min_lr)


def test_from_config_sqrt_scaling_and_max_steps() -> None:
    optim = dataclasses.replace(OptimConfig(), lr=1e-3, scale_lr="sqrt")
    sch = from_config(optim, LossConfig(), steps_per_epoch=10, epochs=5, global_batch=256)
    assert sch.lr == pytest.approx(1e-3 * 4 * 0.5)
    assert sch.min_lr == pytest.approx(OptimConfig().min_lr)
    short = from_config(optim, LossConfig(), steps_per_epoch=10, epochs=5, global_batch=256, max_steps=7)
    assert short.total_steps == 7


def test_from_config_tiny_run_clamps_lr_warmup_but_not_teacher_temp() -> None:
    # demo-sized: 3 epochs of 4 steps, but 10 warm-up epochs and 30 teacher-temp epochs.  The lr warm-up is
    # compressed into the run; the teacher temperature follows dinov3's full 120-step warm-up (no compression)
    sch = from_config(OptimConfig(), LossConfig(), steps_per_epoch=4, epochs=3, global_batch=8)
    assert sch.total_steps == 12
    assert sch.warmup_steps == 12 and sch.teacher_temp_warmup_steps == 120
    temps = [sch.at(s)["teacher_temp"] for s in range(13)]
    assert temps[0] == pytest.approx(0.04) and temps[-1] == pytest.approx(0.04 + 0.03 * 12 / 119)
    assert all(b > a for a, b in zip(temps, temps[1:], strict=False))
    values = [sch.at(s) for s in range(20)]
    assert all(math.isfinite(v) for d in values for v in d.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps_per_epoch": 0}, "steps per epoch"),
        ({"epochs": 0}, "train.epochs"),
        ({"global_batch": 0}, "global batch"),
        ({"max_steps": 0}, "train.max_steps"),
    ],
)
def test_from_config_errors(kwargs: dict, match: str) -> None:
    args = {"steps_per_epoch": 10, "epochs": 2, "global_batch": 8} | kwargs
    with pytest.raises(ConfigError, match=match):
        from_config(OptimConfig(), LossConfig(), **args)


def test_from_config_bad_config_values() -> None:
    with pytest.raises(ConfigError, match="optim.scale_lr"):
        from_config(dataclasses.replace(OptimConfig(), scale_lr="linear"), LossConfig(), 10, 2, 8)
    with pytest.raises(ConfigError, match="optim.warmup_epochs"):
        from_config(dataclasses.replace(OptimConfig(), warmup_epochs=-1), LossConfig(), 10, 2, 8)
    with pytest.raises(ConfigError, match="loss.warmup_teacher_temp_epochs"):
        from_config(OptimConfig(), dataclasses.replace(LossConfig(), warmup_teacher_temp_epochs=-1), 10, 2, 8)


# Reference values: dinov3.configs.config.apply_scaling_rules_to_cfg (scaling_rule sqrt_wrt_1024, lr 1e-3)
# run on facebookresearch/dinov3 @ 6876159a11b4df116f30f667f8c9888617df0751.
@pytest.mark.parametrize(("global_batch", "official_lr"), [(64, 0.001), (256, 0.002), (1024, 0.004)])
def test_sqrt_scaling_matches_official_dinov3(global_batch: int, official_lr: float) -> None:
    optim = dataclasses.replace(OptimConfig(), lr=1e-3, scale_lr="sqrt")
    sch = from_config(optim, LossConfig(), steps_per_epoch=10, epochs=5, global_batch=global_batch)
    assert sch.lr == pytest.approx(official_lr, rel=1e-12)


def test_gram_refresh_due_snapshot_then_absolute_multiples() -> None:
    from dinocell.train.schedules import gram_refresh_due

    # snapshot at start 2, refreshes at absolute multiples of 4 (not 2 + 4k)
    assert [s for s in range(13) if gram_refresh_due(s, start=2, every=4)] == [2, 4, 8, 12]
    assert [s for s in range(12) if gram_refresh_due(s, start=0, every=0)] == [0]  # one snapshot, never refreshed
    assert not gram_refresh_due(1, start=2, every=1)
    # first update and the cap
    assert [s for s in range(60) if gram_refresh_due(s, 0, 10, first_update=25, max_updates=2)] == [0, 30, 40]
    assert [s for s in range(60) if gram_refresh_due(s, 0, 10, max_updates=0)] == [0]


def test_gram_weight_schedule() -> None:
    from dinocell.train.schedules import gram_weight

    assert [gram_weight(s, 10, 0.7) for s in (0, 5, 50)] == [0.7, 0.7, 0.7]  # constant without start/end
    w = [gram_weight(s, 8, 1.0, start=0.0, end=2.0, warmup_steps=3) for s in range(10)]
    assert w[0] == 0.0 and w[3] == pytest.approx(1.0) and w[7] == pytest.approx(2.0) and w[9] == 2.0
    assert all(b >= a for a, b in zip(w, w[1:], strict=False))


def test_backbone_lr_factor_two_stage() -> None:
    from dinocell.train.schedules import backbone_lr_factor

    assert [backbone_lr_factor(s, 3, 4) for s in range(9)] == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [backbone_lr_factor(s, 2, 0) for s in range(4)] == [0, 0, 1, 1]
    assert [backbone_lr_factor(s, 0, 0) for s in range(2)] == [1, 1]  # one stage: untouched
