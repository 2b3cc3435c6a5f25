"""C1-C3: continued pretraining from weights released without heads (issue 21), offline stand-in.

Released DINOv3 weights cannot be downloaded here, so the benchmark makes its own "release": it pretrains
a tiny ViT on one domain (synthetic Cell Painting, seed A), exports the teacher backbone *without heads*
(``dinocell export``, a model folder), then continues from it on a shifted domain (seed B: other plates and cells,
two more phenotypes, different intensity scaling) twice, with the same budget and lr:

* two-stage: ``train.head_warmup_steps`` (backbone frozen, fresh heads learn the released features), then
  the backbone unfreezes with its own lr ramp ``optim.backbone_warmup_steps``;
* one-stage: everything trains from step 0 (fresh heads push their noise into the released backbone).

The probe is measured on fields no run trained on (indices past the training fields, so new plates):
the mean of a kNN phenotype accuracy (mean-image CLS embeddings, stratified half/half split) and the
cross-channel same-field retrieval top-1.  It is evaluated on the EMA teacher at every checkpoint, which
gives the curves figure (``OUT/curves.png``), and ends with

    C1 ratio=<start-domain probe after / before, two-stage> target>=0.98
    C2 ratio=<new-domain probe after / before, two-stage> target>=1.05
    C3 ratio=<start-domain probe after two-stage / after one-stage> target>=1.0

    python benchmarks/bench_continue.py --quick --out runs/bench_continue   # < 10 min on 2 idle cores
    (on a loaded machine set OMP_NUM_THREADS=1: thread oversubscription slows it by an order of magnitude)
    python benchmarks/bench_continue.py --smoke --out /tmp/bc                 # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: the tiny "released" architecture (the demo's) and the settings every run shares
COMMON = [
    "model.embed_dim=192", "model.depth=4", "model.num_heads=3", "model.patch_size=8", "model.layerscale_init=0.1",
    "head.prototypes=128", "head.hidden_dim=512", "head.bottleneck_dim=128",
    "data.views.global_crop_size=32", "data.views.local_crop_size=16", "data.views.n_local_crops=0",
    "data.views.global_scale=[0.7,1.0]", "data.views.aligned_globals=true", "loss.ibot_cross_channel=true",
    "data.synthetic.size=64", "data.synthetic.n_plates=2", "data.synthetic.wells_per_plate=16",
    "data.synthetic.sites_per_well=4", "data.num_workers=0",
    "loss.teacher_temp=0.01", "loss.warmup_teacher_temp=0.01", "optim.layerwise_decay=1.0",
    "optim.patch_embed_lr_mult=1.0", "optim.momentum_teacher=0.97", "train.precision=32", "train.eval_fields=0",
    "track.logger=none", "train.progress_bar=false", "train.keep_last_n=1000",
]
SMOKE = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "head.prototypes=32", "head.hidden_dim=64",
         "head.bottleneck_dim=32"]
#: the two domains: the generator's seed, phenotype count and intensity scaling
DOMAIN_A = ["data.synthetic.seed=0", "data.synthetic.n_classes=4"]
DOMAIN_B = ["data.synthetic.seed=7", "data.synthetic.n_classes=6", "data.scaling.low_percentile=2.0",
            "data.scaling.high_percentile=98.0"]


@dataclass
class Budget:
    """Steps and sizes of one benchmark mode."""

    batch: int
    fields: int
    steps_a: int
    steps_b: int
    head_warmup: int
    backbone_warmup: int
    every: int
    probe_fields: int
    small: bool = False


MODES = {
    "smoke": Budget(batch=4, fields=32, steps_a=6, steps_b=6, head_warmup=2, backbone_warmup=2, every=3,
                    probe_fields=24, small=True),
    "quick": Budget(batch=32, fields=1024, steps_a=200, steps_b=120, head_warmup=40, backbone_warmup=30, every=20,
                    probe_fields=128),
    "full": Budget(batch=64, fields=2048, steps_a=672, steps_b=400, head_warmup=120, backbone_warmup=80, every=40,
                   probe_fields=256),
}


def _config(budget: Budget, domain: list[str], steps: int, extra: list[str]) -> Any:
    from dinocell.config import load_config

    spe = max(1, steps // 4)  # four "epochs": the lr warm-up is one of them
    return load_config(None, [*COMMON, *(SMOKE if budget.small else []), *domain,
                              f"data.batch_size={budget.batch}", f"data.synthetic.n_fields={budget.fields}",
                              f"train.steps_per_epoch={spe}", f"train.epochs={max(1, steps // spe)}",
                              f"train.checkpoint_every_steps={budget.every}", "optim.warmup_epochs=1", *extra])


def _probe_set(cfg: Any, budget: Budget) -> tuple[torch.Tensor, np.ndarray, list[bool]]:
    """Fields past the training fields (new plates of the same domain), with their phenotype labels."""
    import copy

    import torch.nn.functional as F

    from dinocell.data.sources import open_source

    data = copy.deepcopy(cfg.data)
    data.synthetic.n_fields = budget.fields + budget.probe_fields
    source = open_source(data)
    size = cfg.data.views.global_crop_size
    fields, labels = [], []
    for rec in source.records[budget.fields:]:
        x = torch.from_numpy(source.load(rec)).float()
        fields.append(F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False)[0])
        labels.append(int(rec.metadata.get("label", -1)))
    return torch.stack(fields), np.asarray(labels), list(source.fluorescent)


def probe(backbone: Any, probe_set: tuple[torch.Tensor, np.ndarray, list[bool]]) -> dict[str, float]:
    """kNN phenotype accuracy (mean image) and cross-channel retrieval top-1; ``probe`` is their mean."""
    from dinocell.evaluate.consistency import channel_embeddings, cross_channel_retrieval
    from dinocell.evaluate.probes import knn_accuracy, split_train_test

    fields, labels, fluorescent = probe_set
    backbone.eval()
    with torch.no_grad():
        emb = channel_embeddings(backbone, fields, fluorescent)
    mean = torch.nn.functional.normalize(emb[:, -1], dim=-1)
    train = split_train_test(labels, 0.5, seed=0)
    knn = knn_accuracy(mean[train], labels[train], mean[~train], labels[~train], k=10)
    retrieval = cross_channel_retrieval(emb[:, :-1])
    return {"knn": knn, "retrieval": retrieval, "probe": 0.5 * (knn + retrieval)}


def _teacher_from(ckpt: Path, cfg: Any) -> Any:
    from dinocell.engine.checkpoint import load_checkpoint_file
    from dinocell.models.backbone import build_backbone

    sd = load_checkpoint_file(ckpt)["state_dict"]
    prefix = "meta.teacher.backbone."
    bb = build_backbone(dataclass_replace(cfg.model, pretrained=None), img_size=cfg.data.views.global_crop_size)
    bb.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return bb


def dataclass_replace(obj: Any, **kw: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **kw)


def _curve(run: Path, cfg: Any, sets: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Probe of the EMA teacher at every periodic checkpoint of ``run``, per domain."""
    out: dict[str, list[tuple[int, float]]] = {k: [] for k in sets}
    from dinocell.runs import RunDir

    ckpts = sorted(RunDir(run).checkpoints.glob("step*.ckpt"))
    for ck in ckpts:
        step = int(ck.stem[4:])
        bb = _teacher_from(ck, cfg)
        for name, s in sets.items():
            out[name].append((step, probe(bb, s)["probe"]))
    return out


def _figure(curves: dict[str, dict[str, list[tuple[int, float]]]], before: dict[str, float], budget: Budget,
            path: Path) -> None:
    from dinocell.evaluate.plots import new_figure, save_figure

    fig = new_figure(10, 4)
    for i, (domain, title) in enumerate((("A", "start domain (A)"), ("B", "new domain (B)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for run, style in (("two_stage", "-o"), ("one_stage", "--s")):
            pts = [(0, before[domain]), *curves[run][domain]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=run.replace("_", "-"), markersize=3)
        ax.axvline(budget.head_warmup, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{title}: probe of the EMA teacher")
        ax.set_xlabel("continued-pretraining step")
        ax.set_ylabel("(kNN + retrieval) / 2")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def run(out: Path, mode: str, lr: float = 2e-4, gram_weight: float = 1.0, reuse_release: bool = False) -> dict[str, Any]:
    from dinocell.models.loading import load_model
    from dinocell.runs import RunDir
    from dinocell.train.export import export_run
    from dinocell.train.run import pretrain

    budget = MODES[mode]
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    # 1. the "release": pretrained on domain A, exported without heads
    cfg_a = _config(budget, DOMAIN_A, budget.steps_a, ["optim.lr=1e-3", "optim.min_lr=1e-5"])
    release = out / "release"
    if not (reuse_release and (release / "config.json").is_file()):
        pretrain(cfg_a, out / "release_run", resume=False)
        release = export_run(out / "release_run", release)
    print(f"release: {budget.steps_a} steps on domain A, exported backbone only -> {release} "
          f"({time.time() - t0:.0f}s)", flush=True)

    # 2. continue on domain B: two-stage and one-stage, same budget and lr
    cont = [f"model.pretrained={release}", f"optim.lr={lr}", "optim.min_lr=1e-5", f"loss.gram_weight={gram_weight}",
            "loss.gram_teacher_start=0", "loss.gram_teacher_every=0"]
    variants = {
        "two_stage": [f"train.head_warmup_steps={budget.head_warmup}",
                      f"optim.backbone_warmup_steps={budget.backbone_warmup}"],
        "one_stage": ["train.head_warmup_steps=0", "optim.backbone_warmup_steps=0"],
    }
    cfg_b = {}
    for name, extra in variants.items():
        cfg_b[name] = _config(budget, DOMAIN_B, budget.steps_b, cont + extra)
        pretrain(cfg_b[name], out / name, resume=False)
        print(f"{name}: {budget.steps_b} steps on domain B ({time.time() - t0:.0f}s)", flush=True)

    # 3. probes on unseen fields of both domains
    sets = {"A": _probe_set(cfg_a, budget), "B": _probe_set(cfg_b["two_stage"], budget)}
    released = load_model(release).backbone
    before = {k: probe(released, s) for k, s in sets.items()}
    curves = {name: _curve(out / name, cfg_b[name], sets) for name in variants}
    after = {name: {k: probe(_teacher_from(RunDir(out / name).last_checkpoint, cfg_b[name]), s)
                    for k, s in sets.items()} for name in variants}
    _figure(curves, {k: v["probe"] for k, v in before.items()}, budget, out / "curves.png")

    print(f"{'probe':<28}{'domain A':>10}{'domain B':>10}")
    rows = [("released (before)", before), ("two-stage (after)", after["two_stage"]),
            ("one-stage (after)", after["one_stage"])]
    for label, res in rows:
        for key in ("knn", "retrieval", "probe"):
            print(f"{label + ' ' + key:<28}{res['A'][key]:>10.3f}{res['B'][key]:>10.3f}")
    c1 = after["two_stage"]["A"]["probe"] / max(before["A"]["probe"], 1e-9)
    c2 = after["two_stage"]["B"]["probe"] / max(before["B"]["probe"], 1e-9)
    c3 = after["two_stage"]["A"]["probe"] / max(after["one_stage"]["A"]["probe"], 1e-9)
    summary = {"mode": mode, "lr": lr, "gram_weight": gram_weight, "seconds": time.time() - t0, "before": before, "after": after, "curves": curves,
               "C1": c1, "C2": c2, "C3": c3, "figure": str(out / "curves.png")}
    from dinocell.paths import write_text_atomic

    write_text_atomic(out / "bench_continue.json", json.dumps(summary, indent=2))
    print(f"curves: {out / 'curves.png'}   ({summary['seconds']:.0f}s)")
    print(f"C1 ratio={c1:.3f} target>=0.98")
    print(f"C2 ratio={c2:.3f} target>=1.05")
    print(f"C3 ratio={c3:.3f} target>=1.0")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_continue"))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true", help="seconds: a tiny model, a few steps (tests)")
    g.add_argument("--quick", action="store_true", help="< 10 min on 2 CPU cores")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak lr of both continuations (the release used 1e-3)")
    ap.add_argument("--gram-weight", type=float, default=1.0, help="Gram anchoring to the release (0: off)")
    ap.add_argument("--reuse-release", action="store_true", help="keep the OUT/release export of an earlier run")
    args = ap.parse_args(argv)
    run(args.out, "smoke" if args.smoke else "quick" if args.quick else "full", args.lr, args.gram_weight,
        args.reuse_release)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
