"""Q12 screen: view policies and cross-channel iBOT on the demo budget (issue #12).

Trains each variant of ``configs/demo_synthetic.yaml`` one after the other (2 cores: never two at once),
then reads ``DIR/summary.json`` and measures on the run's held-out fields how the teacher's CLS
embedding variance splits into per-field, per-channel-offset and field×channel residual parts: the
residual is what the seed objective leaves (benchmarks/RESULTS.md, Q1/Q2).

    python benchmarks/bench_invariance.py --out runs/q12 --epochs 6            # screen
    python benchmarks/bench_invariance.py --out runs/q12full --only multiview,single_view,all_cross
    python benchmarks/bench_invariance.py --out /tmp/q12smoke --smoke      # every code path, seconds

Ends with ``Q12 ratio=<best consistency / seed multiview consistency> target>=1.39`` (0.70 / 0.505).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dinocell.runs import RunDir

#: every variant starts from the seed's view settings, whatever the config file ships
SEED_VIEWS = ["data.views.aligned_globals=false", "data.views.mean_global=false",
              "data.views.scale_batch_to_crops=false", "loss.ibot_cross_channel=false",
              "loss.dense_cross_weight=0"]

VARIANTS: dict[str, list[str]] = {
    "multiview": ["data.views.policy=multiview"],
    "single_view": ["data.views.policy=single_view"],
    "multiview_aligned": ["data.views.policy=multiview", "data.views.aligned_globals=true"],
    "multiview_aligned_cross": ["data.views.policy=multiview", "data.views.aligned_globals=true",
                                "loss.ibot_cross_channel=true"],
    # the shipped demo design (issue 20): aligned + cross-channel iBOT + dense cross-channel cosine
    "multiview_aligned_cross_dense": ["data.views.policy=multiview", "data.views.aligned_globals=true",
                                      "loss.ibot_cross_channel=true", "loss.dense_cross_weight=1.0",
                                      "loss.dense_cross_mode=cosine"],
    "pairs": ["data.views.policy=channel_pairs"],
    "pairs_mean_aligned": ["data.views.policy=channel_pairs", "data.views.mean_global=true",
                           "data.views.aligned_globals=true"],
    "pairs_mean_aligned_cross": ["data.views.policy=channel_pairs", "data.views.mean_global=true",
                                 "data.views.aligned_globals=true", "loss.ibot_cross_channel=true"],
    "pairs_mean_aligned_cross_scaled": ["data.views.policy=channel_pairs", "data.views.mean_global=true",
                                        "data.views.aligned_globals=true", "loss.ibot_cross_channel=true",
                                        "data.views.scale_batch_to_crops=true"],
    "all": ["data.views.policy=all_channels", "data.views.scale_batch_to_crops=true"],
    "all_cross": ["data.views.policy=all_channels", "data.views.scale_batch_to_crops=true",
                  "loss.ibot_cross_channel=true"],
}

#: --smoke: tiny fields and batches, in-process loading, a small held-out evaluation
SMOKE = ["data.synthetic.n_fields=64", "data.batch_size=8", "data.num_workers=0", "train.eval_fields=16",
         "train.progress_bar=false"]


def variance_split(emb: torch.Tensor) -> tuple[float, float, float]:
    """Fractions of the centred (F, C, D) embedding variance that are per field, per channel offset
    and field×channel residual (a two-way decomposition; the three add up to 1)."""
    e = emb.double() - emb.double().reshape(-1, emb.shape[-1]).mean(0)
    total = float((e ** 2).sum())
    field = e.mean(1, keepdim=True)
    channel = e.mean(0, keepdim=True)
    f_part = float((field ** 2).sum()) * e.shape[1]
    c_part = float((channel ** 2).sum()) * e.shape[0]
    return f_part / total, c_part / total, 1.0 - (f_part + c_part) / total


def decompose(run_dir: Path) -> tuple[float, float, float]:
    from dinocell.config import config_from_dict, load_yaml
    from dinocell.data.holdout import heldout_source
    from dinocell.data.sources import load_resized_fields
    from dinocell.evaluate.consistency import channel_embeddings
    from dinocell.models.loading import load_model

    cfg = config_from_dict(load_yaml(RunDir(run_dir).config))
    held = heldout_source(run_dir)
    fields, _ = load_resized_fields(held, cfg.train.eval_fields, cfg.data.views.global_crop_size)
    model = load_model(run_dir)
    with torch.no_grad():
        emb = channel_embeddings(model.backbone, torch.stack(fields), list(held.fluorescent))
    n_real = len(held.fluorescent)
    return variance_split(emb[:, :n_real])


def step_times(config: str, names: list[str], reps: int = 5) -> dict[str, float]:
    """Median seconds of one forward+backward step per variant, with the batch each variant trains
    with (``scale_batch_to_crops`` applied), interleaved so machine load hits every variant alike."""
    from dinocell.config import load_config
    from dinocell.data.masking import collate_multiview
    from dinocell.data.views import MultiViewAugmentation, crop_scaled_batch_size
    from dinocell.train.meta_arch import MultiViewDINO

    setups = {}
    for name in names:
        cfg = load_config(config, [*SEED_VIEWS, *VARIANTS[name]])
        aug = MultiViewAugmentation(cfg.data.views, [True] * 5)
        bs = cfg.data.batch_size
        if cfg.data.views.scale_batch_to_crops:
            bs = crop_scaled_batch_size(bs, aug.n_global_crops)
        g = torch.Generator().manual_seed(0)
        fields = torch.rand(bs, 5, cfg.data.synthetic.size, cfg.data.synthetic.size, generator=g)
        batch = collate_multiview([aug(f, generator=g) for f in fields], cfg.data.mask, cfg.model.patch_size, 0)
        setups[name] = (MultiViewDINO(cfg), batch)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps + 1):
        for name, (model, batch) in setups.items():
            t0 = time.perf_counter()
            model(batch, teacher_temp=0.01)["total"].backward()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def train(name: str, overrides: list[str], out: Path, config: str, extra: list[str],
          max_steps: int | None = None) -> float:
    run = out / name
    if RunDir(run).summary.is_file():
        return float("nan")
    cmd = [sys.executable, "-m", "dinocell.cli", "pretrain", "--config", config, "--output-dir", str(run),
           *(["--max-steps", str(max_steps)] if max_steps else []),
           "track.logger=none", *SEED_VIEWS, *overrides, *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/q12")
    p.add_argument("--config", default="configs/demo_synthetic.yaml")
    p.add_argument("--epochs", type=int, default=0, help="shortened budget (0: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated variant names")
    p.add_argument("--step-time", action="store_true", help="only time one step of each variant")
    p.add_argument("--smoke", action="store_true",
                   help="every code path in seconds: two variants, 2 steps of tiny batches (numbers meaningless)")
    args = p.parse_args()
    out = Path(args.out)
    names = [n for n in args.only.split(",") if n] or (["multiview", "single_view"] if args.smoke else list(VARIANTS))
    if args.step_time:
        t = step_times(args.config, names)
        for name, sec in t.items():
            print(f"{name}: {sec * 1000:.0f} ms/step")
        if "multiview" in t and "all" in t:
            print(f"Q12-step ratio={t['all'] / t['multiview']:.3f} target<=1.2")
        return
    extra = [f"train.seed={args.seed}"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    if args.smoke:
        extra += SMOKE
    rows = []
    for name in names:
        secs = train(name, VARIANTS[name], out, args.config, extra, max_steps=2 if args.smoke else None)
        s = json.loads(RunDir(out / name).summary.read_text())
        fld, ch, res = decompose(out / name)
        rows.append((name, s, secs, fld, ch, res))
        print(f"{name}: cons {s['channel_consistency_after']:.3f} retr {s['cross_channel_retrieval_top1']:.3f} "
              f"knn {s['transfer_knn_accuracy']:.3f} split {fld:.2f}/{ch:.2f}/{res:.2f} steps {s['steps']} "
              f"{secs:.0f}s", flush=True)
    print("| variant | steps | consistency | retrieval | transfer | field / channel / residual | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, s, secs, fld, ch, res in rows:
        print(f"| {name} | {s['steps']} | {s['channel_consistency_after']:.3f} | "
              f"{s['cross_channel_retrieval_top1']:.3f} | {s['transfer_knn_accuracy']:.3f} | "
              f"{fld:.2f} / {ch:.2f} / {res:.2f} | {secs:.0f} |")
    by = {name: s for name, s, *_ in rows}
    if "multiview" in by:
        best = max(s["channel_consistency_after"] for s in by.values())
        print(f"Q12 ratio={best / by['multiview']['channel_consistency_after']:.3f} target>=1.39")


if __name__ == "__main__":
    main()
