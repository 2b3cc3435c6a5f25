"""S1/S2: does a channel-invariant backbone make a segmenter trained on one stain work on the others?

Held-out synthetic fields (the generator with another seed), frozen backbones, a decoder trained on
one channel -- DNA for nuclei, AGP for cells -- and evaluated (AP at IoU 0.5, cellpose/StarDist
definition) on every fluorescent channel and on their mean.  Three backbones of the demo
architecture: random initialisation, single-view pretrained (``data.views.policy=single_view``) and
multiview pretrained, both pretrained here with ``configs/demo_synthetic.yaml`` (shortened by
``--quick``) or read from ``--runs DIR`` (``DIR/multiview``, ``DIR/single_view``: pretraining run
folders).

    S1 ratio = multiview AP50 on the other channels / multiview AP50 on the training channel   (>= 0.8)
    S2 ratio = multiview AP50 on the other channels / single-view AP50 on the other channels  (>= 1.2)

"Other channels" are the four fluorescent channels a head was not trained on; values are pooled
over the two tasks (mean of their AP50s).  Usage::

    PYTHONPATH=src python benchmarks/bench_segmentation.py --quick
    PYTHONPATH=src python benchmarks/bench_segmentation.py --runs runs/bench_seg_full
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASKS = (("nuclei", "DNA"), ("cells", "AGP"))
BACKBONES = ("random", "single_view", "multiview")


def pretrained_run(runs: Path, policy: str, steps: int | None) -> Path:
    """A pretraining run folder for ``policy``; trained here with the demo config unless it exists."""
    from dinocell.config import load_config
    from dinocell.train.run import pretrain

    run = runs / policy
    if (run / "checkpoints" / "last.ckpt").is_file():
        return run
    overrides = [f"data.views.policy={policy}", "track.logger=none", "train.progress_bar=false",
                 "train.eval_fields=0"]
    cfg = load_config(ROOT / "configs" / "demo_synthetic.yaml", overrides)
    t0 = time.perf_counter()
    pretrain(cfg, run, max_steps=steps)
    print(f"pretrained {policy}: {steps or 'full'} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return run


def segment_one(work: Path, backbone: str, spec: str | None, objects: str, channel: str, steps: int,
                n_eval: int) -> dict[str, float]:
    """Fit a frozen-backbone segmenter on ``channel`` and return AP50 per evaluation channel."""
    from dinocell.segment.config import load_segment_config
    from dinocell.segment.predict import evaluate_net, evaluation_source
    from dinocell.segment.run import fit, load_segmenter

    cfg = load_segment_config(ROOT / "configs" / "segment_synthetic.yaml",
                              [f"task.objects={objects}", f"task.channel={channel}", f"train.steps={steps}",
                               "train.progress_bar=false", "track.logger=none", "model.mode=frozen"])
    run = work / f"seg_{backbone}_{objects}"
    t0 = time.perf_counter()
    fit(cfg, run, backbone=spec)
    net, cfg, _ = load_segmenter(run)
    t1 = time.perf_counter()
    res = evaluate_net(net, cfg, evaluation_source(cfg, "synthetic"), "synthetic", limit=n_eval)
    print(f"  {backbone:<12} {objects:<7} fit {t1 - t0:5.0f} s, evaluate {time.perf_counter() - t1:5.0f} s "
          f"({res['fields']} fields)", flush=True)
    return {c: s["ap50"] for c, s in res["channels"].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short pretraining, fewer steps and fields")
    p.add_argument("--runs", type=Path, default=None, help="folder with multiview/ and single_view/ runs")
    p.add_argument("--work", type=Path, default=None, help="working folder (default runs/bench_segmentation[_quick])")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the pretraining length")
    p.add_argument("--steps", type=int, default=None, help="segmenter training steps")
    p.add_argument("--eval-fields", type=int, default=None, help="held-out fields per evaluation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a loaded 2-core machine OpenMP barriers waste most of a 2-thread run)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = args.work or ROOT / "runs" / ("bench_segmentation_quick" if args.quick else "bench_segmentation")
    runs = args.runs or work / "pretrain"
    pre_steps = args.pretrain_steps or (120 if args.quick else None)
    steps = args.steps or (150 if args.quick else 300)
    n_eval = args.eval_fields or (16 if args.quick else 64)

    specs: dict[str, str | None] = {"random": None}
    for policy in ("single_view", "multiview"):
        specs[policy] = str(pretrained_run(runs, policy, pre_steps))

    ap: dict[tuple[str, str], dict[str, float]] = {}
    for objects, channel in TASKS:
        for bb in BACKBONES:
            ap[(bb, objects)] = segment_one(work, bb, specs[bb], objects, channel, steps, n_eval)

    channels = list(next(iter(ap.values())))
    for objects, channel in TASKS:
        print(f"\nAP50, {objects} (head trained on {channel}; * = training channel), {n_eval} held-out fields")
        print(f"{'channel':<9}" + "".join(f"{bb:>13}" for bb in BACKBONES))
        for c in channels:
            mark = "*" if c == channel else " "
            print(f"{c + mark:<9}" + "".join(f"{ap[(bb, objects)][c]:>13.3f}" for bb in BACKBONES))

    def pooled(bb: str, own: bool) -> float:
        vals = []
        for objects, channel in TASKS:
            vals += [v for c, v in ap[(bb, objects)].items() if c != "mean" and (c == channel) == own]
        return float(np.mean(vals))

    summary = {bb: {"own": pooled(bb, True), "other": pooled(bb, False)} for bb in BACKBONES}
    print("\npooled AP50      own channel   other channels")
    for bb in BACKBONES:
        print(f"{bb:<16} {summary[bb]['own']:>11.3f} {summary[bb]['other']:>16.3f}")
    (work / "results.json").write_text(json.dumps({"ap50": {f"{b}/{o}": v for (b, o), v in ap.items()},
                                                   "pooled": summary, "quick": args.quick}, indent=2))
    mv, sv = summary["multiview"], summary["single_view"]
    s1 = mv["other"] / mv["own"] if mv["own"] > 0 else float("nan")
    s2 = mv["other"] / sv["other"] if sv["other"] > 0 else float("nan")
    print(f"S1 ratio={s1:.3f} target>=0.8")
    print(f"S2 ratio={s2:.3f} target>=1.2")


if __name__ == "__main__":
    main()
