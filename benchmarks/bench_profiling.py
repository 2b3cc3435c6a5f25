"""PROF: do pretrained features make better profiles?  Replicate-retrieval mAP, trained vs untrained.

Held-out synthetic plates (2 plates x 32 wells x 2 sites; 4 phenotype classes, class 0 the negative
control, so 8 negcon wells and 3 x 8 replicate wells per plate) are embedded by the same tiny ViT twice:
untrained (the baseline, same seed and architecture) and after a short multi-view pretraining
(``configs/demo_synthetic.yaml``, shortened by overrides; ``--run DIR`` uses an existing run instead).
Field profiles are aggregated to wells by the median and normalised per plate against the negcons
with pycytominer (``mad_robustize``); copairs scores them as JUMP does: mAP of each perturbation's
replicates against the plate's negcons, and against the other perturbations.

    PYTHONPATH=src python benchmarks/bench_profiling.py --quick
    -> PROF ratio=<trained negcon mAP / untrained negcon mAP> target>=1.0
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATES = ["data.synthetic.n_plates=2", "data.synthetic.wells_per_plate=32", "data.synthetic.sites_per_well=2",
          "data.synthetic.n_classes=4", "data.synthetic.n_fields=128"]


def train(run: Path, steps: int) -> float:
    """Shortened demo pretraining into ``run``; returns the wall time."""
    from dinocell.config import load_config
    from dinocell.train.run import pretrain

    cfg = load_config(REPO / "configs" / "demo_synthetic.yaml",
                      ["track.logger=none", "train.progress_bar=false", "train.eval_fields=0",
                       "data.num_workers=0", f"train.checkpoint_every_steps={max(steps, 1)}"])
    t0 = time.perf_counter()
    pretrain(cfg, run, max_steps=steps)
    return time.perf_counter() - t0


def embed_both(run: Path, out: Path) -> dict[str, Path]:
    """Field profiles of the held-out plates from the trained teacher and the untrained architecture."""
    import lightning as L

    from dinocell.config import load_config
    from dinocell.evaluate.embed import LoadedModel, load_model, run_embed
    from dinocell.models.backbone import build_backbone

    trained = load_model(run)
    cfg = load_config(run / "config.yaml")
    L.seed_everything(cfg.train.seed, verbose=False)
    untrained = LoadedModel(build_backbone(cfg.model, img_size=trained.crop_size).eval(), cfg,
                            trained.crop_size, trained.channel_names, "untrained")
    paths = {}
    for name, model in (("untrained", untrained), ("trained", trained)):
        res = run_embed(model, out / name, data="synthetic", overrides=PLATES)
        paths[name] = Path(res["paths"]["fields"])
    return paths


def score(fields_path: Path, null_size: int) -> dict[str, float]:
    import pandas as pd

    from dinocell.evaluate.profiling import aggregate_wells, replicate_map

    fields = pd.read_parquet(fields_path)
    wells = aggregate_wells(fields)
    res = replicate_map(wells, null_size=null_size, seed=0)
    return {"wells": len(wells), "negcon_map": res["negcon"]["mean_average_precision"],
            "negcon_retrieved": res["negcon"]["fraction_retrieved"],
            "nonrep_map": res["nonrep"]["mean_average_precision"],
            "nonrep_retrieved": res["nonrep"]["fraction_retrieved"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="120 training steps instead of the demo's 768")
    ap.add_argument("--steps", type=int, default=None, help="training steps (overrides --quick)")
    ap.add_argument("--run", type=Path, default=None, help="use this existing run folder instead of training")
    ap.add_argument("--null-size", type=int, default=5000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    steps = args.steps or (120 if args.quick else 768)
    with tempfile.TemporaryDirectory(prefix="bench_prof_") as tmp:
        work = Path(tmp)
        run = args.run
        train_s = 0.0
        if run is None:
            run = work / "run"
            train_s = train(run, steps)
        paths = embed_both(run, work / "profiles")
        rows = {name: score(p, args.null_size) for name, p in paths.items()}
    print(f"held-out synthetic plates: {rows['trained']['wells']} wells; "
          f"{'existing run ' + str(args.run) if args.run else f'{steps} training steps in {train_s:.0f} s'}")
    print("| model | negcon mAP | fraction retrieved | nonrep mAP | fraction retrieved |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['negcon_map']:.3f} | {r['negcon_retrieved']:.2f} | {r['nonrep_map']:.3f} "
              f"| {r['nonrep_retrieved']:.2f} |")
    ratio = rows["trained"]["negcon_map"] / max(rows["untrained"]["negcon_map"], 1e-9)
    print(f"PROF ratio={ratio:.3f} target>=1.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
