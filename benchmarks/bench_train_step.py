"""P1: one multi-view DINOv3 training iteration vs its compute floor, measured in the same run.

Iteration: student on 2 globals + N locals (globals masked for iBOT), teacher on the 2 globals, DINO
(Sinkhorn) + iBOT + KoLeo losses, backward, grad clipping, AdamW step with schedule-set groups, EMA.
Floor: a plain timm-backbone student forward+backward on the same crops + teacher forward on the
globals (no heads, no losses, no optimiser, no EMA).  Timed interleaved (A B A B ...), median.

    python benchmarks/bench_train_step.py [--quick] [--reps N]

Last line: ``P1 ratio=<step / floor> target<=1.15`` (for ViT-S/16, or the tiny model with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch

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
    def __init__(self, cfg: Any) -> None:
        self.meta = MultiViewDINO(cfg).train()
        self.opt = build_optimizer(self.meta, cfg)  # the trainer's own optimiser (fused AdamW)
        for grp in self.opt.param_groups:
            grp["lr"], grp["weight_decay"] = 1e-4 * grp["lr_multiplier"], 0.04 * grp["wd_multiplier"]
        self.clip = cfg.optim.clip_grad

    def __call__(self, batch: dict[str, Any]) -> None:
        out = self.meta(batch, teacher_temp=0.04)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.meta.student.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.meta.update_teacher(0.996)


class Floor:
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


def measure(name: str, overrides: list[str], reps: int) -> tuple[float, float]:
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    batch = make_batch(cfg)
    step, floor = FullStep(cfg), Floor(cfg)
    step(batch)
    floor(batch)  # warm-up
    ts, tf = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(batch)
        ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        floor(batch)
        tf.append(time.perf_counter() - t0)
    s, f = statistics.median(ts), statistics.median(tf)
    print(f"{name:<40} {s * 1000:>10.1f} {f * 1000:>10.1f} {s / f:>7.3f}   "
          f"(step min/max {min(ts) * 1000:.0f}/{max(ts) * 1000:.0f} ms)")
    return s, f


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, few repetitions")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    reps = args.reps or (5 if args.quick else 7)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {reps} interleaved reps")
    print(f"{'model (batch 8, 2 globals + 8 locals)':<40} {'step ms':>10} {'floor ms':>10} {'ratio':>7}")
    names = list(MODELS)[1:] if args.quick else list(MODELS)
    ratios = {}
    for name in names:
        s, f = measure(name, MODELS[name], reps)
        ratios[name] = s / f
    headline = ratios[names[0]]
    print(f"P1 ratio={headline:.3f} target<=1.15")


if __name__ == "__main__":
    main()
