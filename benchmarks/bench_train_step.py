"""P1: one multi-view DINOv3 training iteration vs the model's own compute, measured in the same run.

Iteration: student on 2 globals + N locals (globals masked for iBOT), teacher on the 2 globals, DINO
(Sinkhorn) + iBOT + KoLeo losses, backward, grad clipping, AdamW step with schedule-set groups, EMA.

Two floors, timed interleaved with the step (step, floor, floor, step, ...; medians):
- backbone: the student backbone forward+backward on the same crops + teacher backbone forward;
- backbone+heads (the P1 denominator): the same plus the DINO head on every CLS token and the iBOT head
  on the masked patch tokens, forward+backward through a plain hard-label cross-entropy on the head
  outputs, and the teacher's two heads forward.  DINOv3's 65536-prototype heads are part of the model;
  what the trainer controls is everything beyond them (Sinkhorn, the soft-target losses, EMA, AdamW,
  clipping), and that is what P1 holds to <= 1.10.

    python benchmarks/bench_train_step.py [--quick] [--reps N] [--phases] [--memory] [--also KEY=VALUE]

``--phases`` times one step by phase (wrappers around the real modules; backward split at the gradient
of the backbone outputs).  ``--memory`` samples RSS during one call of each (peak above the RSS before).
Last line: ``P1 ratio=<step / backbone+heads floor> target<=1.10`` (ViT-S/16, or the tiny model with
--quick).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.config import load_config
from dinocell.data.masking import collate_multiview
from dinocell.train.meta_arch import MultiViewDINO
from dinocell.train.module import build_optimizer

MODELS = {
    "vit_small_patch16 (224/96, K=65536)": [
        "model.patch_size=16", "data.views.global_crop_size=224", "data.views.local_crop_size=96",
        "data.views.n_local_crops=8", "data.batch_size=8",
    ],
    "demo tiny (192x4, p8, 64/32, K=1024)": [
        "model.embed_dim=192", "model.depth=4", "model.num_heads=3", "model.patch_size=8",
        "head.prototypes=1024", "head.hidden_dim=512", "head.bottleneck_dim=128",
        "data.views.global_crop_size=64", "data.views.local_crop_size=32", "data.views.n_local_crops=8",
        "data.batch_size=8",
    ],
}


def make_batch(cfg: Any) -> dict[str, Any]:
    v, b = cfg.data.views, cfg.data.batch_size
    g = torch.Generator().manual_seed(0)
    samples = [{"global_crops": [torch.rand(1, v.global_crop_size, v.global_crop_size, generator=g)
                                 for _ in range(2)],
                "local_crops": [torch.rand(1, v.local_crop_size, v.local_crop_size, generator=g)
                                for _ in range(v.n_local_crops)],
                "global_channels": [-1, 0], "local_channels": [0] * v.n_local_crops} for _ in range(b)]
    return collate_multiview(samples, cfg.data.mask, cfg.model.patch_size, rng=np.random.default_rng(0))


class FullStep:
    """The trainer's iteration: meta-architecture forward, backward, clipping, fused AdamW, EMA."""

    def __init__(self, cfg: Any) -> None:
        self.meta = MultiViewDINO(cfg).train()
        self.opt = build_optimizer(self.meta, cfg)  # the trainer's own optimiser (fused AdamW)
        for grp in self.opt.param_groups:
            grp["lr"], grp["weight_decay"] = 1e-4 * grp["lr_multiplier"], 0.04 * grp["wd_multiplier"]
        self.clip = cfg.optim.clip_grad
        self.phases: Phases | None = None

    def __call__(self, batch: dict[str, Any]) -> None:
        ph = self.phases or Phases()
        with ph("forward (all)"):
            out = self.meta(batch, teacher_temp=0.04)
        ph.backward(out["total"])
        with ph("clip"):
            torch.nn.utils.clip_grad_norm_(self.meta.student.parameters(), self.clip)
        with ph("AdamW"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        with ph("EMA"):
            self.meta.update_teacher(0.996)


class BackboneFloor:
    """Student backbone fwd+bwd on all crops + teacher backbone fwd on the globals; nothing else."""

    def __init__(self, cfg: Any) -> None:
        from dinocell.models.backbone import build_backbone

        self.student = build_backbone(cfg.model, cfg.data.views.global_crop_size).train()
        self.teacher = build_backbone(cfg.model, cfg.data.views.global_crop_size).eval()

    def __call__(self, batch: dict[str, Any]) -> None:
        g, loc = batch["global_crops"], batch["local_crops"]
        s = self.student.forward_features(g, masks=batch["masks"])
        sl = self.student.forward_features(loc)
        (s["x_norm_clstoken"].sum() + s["x_norm_patchtokens"].sum() + sl["x_norm_clstoken"].sum()).backward()
        self.student.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.teacher.forward_features(g)


class HeadsFloor:
    """The model's own compute: backbones + DINO and iBOT heads, plain hard-label cross-entropy.

    Same modules as the step (a second :class:`MultiViewDINO`), same crops, same masked tokens; the
    labels are fixed random prototype indices, so no softmax over the teacher, no Sinkhorn, no
    soft-target loss, no optimiser and no EMA.
    """

    def __init__(self, cfg: Any, batch: dict[str, Any]) -> None:
        meta = MultiViewDINO(cfg).train()
        self.student, self.teacher = meta.student, meta.teacher
        n_crops = batch["global_crops"].shape[0] + batch["local_crops"].shape[0]
        k_dino = self.student["dino_head"].out_dim
        k_ibot = self.student["ibot_head"].out_dim
        g = torch.Generator().manual_seed(1)
        self.cls_labels = torch.randint(k_dino, (n_crops,), generator=g)
        self.patch_labels = torch.randint(k_ibot, (batch["mask_indices"].numel(),), generator=g)

    def __call__(self, batch: dict[str, Any]) -> None:
        g, loc, idx = batch["global_crops"], batch["local_crops"], batch["mask_indices"]
        sb = self.student["backbone"]
        s = sb.forward_features(g, masks=batch["masks"])
        cls = torch.cat([s["x_norm_clstoken"], sb.forward_features(loc)["x_norm_clstoken"]])
        patches = s["x_norm_patchtokens"]
        masked = patches.reshape(-1, patches.shape[-1]).index_select(0, idx)
        loss = F.cross_entropy(self.student["dino_head"](cls), self.cls_labels)
        loss = loss + F.cross_entropy(self.student["ibot_head"](masked), self.patch_labels)
        loss.backward()
        self.student.zero_grad(set_to_none=True)
        with torch.no_grad():
            t = self.teacher["backbone"].forward_features(g)
            self.teacher["dino_head"](t["x_norm_clstoken"])
            tp = t["x_norm_patchtokens"]
            self.teacher["ibot_head"](tp.reshape(-1, tp.shape[-1]).index_select(0, idx))


class Phases:
    """Wall time per named phase, accumulated over calls (``with phases("name"): ...``)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self._grad_times: list[float] = []

    def __call__(self, name: str) -> _Timer:
        return _Timer(self.ms, name)

    def wrap(self, obj: Any, attr: str, name: str, grad_mark: bool = False) -> None:
        """Shadow ``obj.attr`` with a timed version (the instance attribute wins over the method)."""
        fn: Callable[..., Any] = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                out = fn(*args, **kwargs)
            if grad_mark:  # note when backward first reaches a backbone output: heads and losses are done
                for v in out.values() if isinstance(out, dict) else [out]:
                    if isinstance(v, torch.Tensor) and v.requires_grad:
                        v.register_hook(self._mark)
            return out

        setattr(obj, attr, timed)

    def _mark(self, grad: torch.Tensor) -> None:
        self._grad_times.append(time.perf_counter())

    def backward(self, loss: torch.Tensor) -> None:
        self._grad_times.clear()
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        # autograd runs nodes newest first: every head/loss node before the first backbone node
        split = min(self._grad_times) if self._grad_times else t0
        self.ms["backward: losses + heads"] += (split - t0) * 1000
        self.ms["backward: backbone"] += (t1 - split) * 1000


class _Timer:
    def __init__(self, acc: dict[str, float], name: str) -> None:
        self.acc, self.name = acc, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.acc[self.name] += (time.perf_counter() - self.t0) * 1000


def instrument(step: FullStep) -> Phases:
    """Time the step's parts through wrappers around the very modules and losses it calls."""
    ph = Phases()
    m = step.meta
    for net in ("teacher", "student"):
        mods = getattr(m, net)
        ph.wrap(mods["backbone"], "forward_features", f"{net} backbone fwd", grad_mark=net == "student")
        ph.wrap(mods["dino_head"], "forward", f"{net} heads fwd")
        if mods["ibot_head"] is not mods["dino_head"]:
            ph.wrap(mods["ibot_head"], "forward", f"{net} heads fwd")
    ph.wrap(m.dino_loss, "teacher_probs", "Sinkhorn (DINO + iBOT)")
    ph.wrap(m.ibot_loss, "teacher_probs", "Sinkhorn (DINO + iBOT)")
    ph.wrap(m.dino_loss, "forward", "DINO + iBOT loss fwd")
    ph.wrap(m.ibot_loss, "forward", "DINO + iBOT loss fwd")
    step.phases = ph
    return ph


def print_phases(step: FullStep, batch: dict[str, Any], reps: int) -> None:
    """Median over ``reps`` instrumented steps of each phase; 'other forward' is KoLeo, Gram, routing."""
    ph = instrument(step)
    runs: dict[str, list[float]] = defaultdict(list)
    for _ in range(reps):
        ph.ms.clear()
        step(batch)
        fwd_parts = sum(v for k, v in ph.ms.items() if k != "forward (all)" and "fwd" in k or "Sinkhorn" in k)
        ph.ms["other forward"] = ph.ms["forward (all)"] - fwd_parts
        for k, v in ph.ms.items():
            runs[k].append(v)
    step.phases = None
    total = statistics.median([sum(v for k, v in zip(runs, vals, strict=True) if k != "forward (all)")
                               for vals in zip(*runs.values(), strict=True)])
    print(f"  step by phase (median of {reps}, ms):")
    for k, v in runs.items():
        if k != "forward (all)":
            print(f"    {k:<28} {statistics.median(v):>9.1f}")
    print(f"    {'sum':<28} {total:>9.1f}")


def peak_rss_mb(fn: Callable[[], None]) -> float:
    """Peak RSS above the RSS just before ``fn`` (sampled every ~1 ms from /proc), in MB."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return (max(peak[0], rss()) - base) / 2**20


def measure(name: str, overrides: list[str], reps: int, phases: bool, memory: bool, also: list[str]) -> float:
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    batch = make_batch(cfg)
    step, heads, backbone = FullStep(cfg), HeadsFloor(cfg, batch), BackboneFloor(cfg)
    runners: dict[str, Any] = {"step": step, "backbone+heads floor": heads, "backbone floor": backbone}
    for ov in also:  # step variants with one more override, e.g. loss.cross_entropy=compiled
        runners[f"step {ov}"] = FullStep(load_config(None, [*overrides, ov]))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():
        fn(batch)  # warm-up (and AdamW state allocation)
    order = list(runners)
    for r in range(reps):
        for k in order if r % 2 == 0 else order[::-1]:  # interleaved, alternating order
            t0 = time.perf_counter()
            runners[k](batch)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: {batch['mask_indices'].numel()} masked patches, median of {reps} interleaved reps")
    for k, v in times.items():
        print(f"  {k:<22} {med[k] * 1000:>9.1f} ms   (min/max {min(v) * 1000:.0f}/{max(v) * 1000:.0f})  "
              f"step / this = {med['step'] / med[k]:.3f}")
    if memory:
        for k, fn in runners.items():
            print(f"  peak RSS above resident, {k:<22} {peak_rss_mb(lambda fn=fn: fn(batch)):>8.0f} MB")
    if phases:
        print_phases(step, batch, max(3, reps // 2))
    return med["step"] / med["backbone+heads floor"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, few repetitions")
    ap.add_argument("--smoke", action="store_true", help="every code path in seconds (tiny model, 1 rep)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--phases", action="store_true", help="also time the step by phase")
    ap.add_argument("--memory", action="store_true", help="also sample peak RSS of each")
    ap.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                    help="also time a step variant with this config override (repeatable)")
    args = ap.parse_args(argv)
    args.quick = args.quick or args.smoke
    reps = args.reps or (1 if args.smoke else 5 if args.quick else 7)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} (batch 8, 2 globals + 8 locals)")
    names = list(MODELS)[1:] if args.quick else list(MODELS)
    ratios = [measure(n, MODELS[n], reps, args.phases, args.memory, args.also) for n in names]
    print(f"P1 ratio={ratios[0]:.3f} target<=1.10")


if __name__ == "__main__":
    main()
