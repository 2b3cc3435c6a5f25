"""R1-R3, S1, S2, PROF: every downstream figure, from backbones pretrained at ONE fixed budget.

Backbones: ``random`` (the demo architecture, untrained) and one per pretraining *design*
(``--designs``; ``multiview`` = configs/demo_synthetic.yaml, ``single_view`` = the seed's views; new
designs are named lists of overrides, ``--design NAME:key=value``), each pretrained for
``--budget-steps`` through the library's ``pretrain`` and cached by config hash in
``runs/bench_cache/<hash>/`` (benchmarks/_pretrain_cache.py), so reruns and other benchmarks reuse it.
Segmentation heads are trained and scored with ``dinocell.segment`` (``fit``, ``load_segmenter``,
``evaluate_net``; AP50 = TP / (TP + FP + FN) at IoU 0.5), frozen backbone, one head per training channel.
The pretrainings, the heads and the profiling run as independent jobs in ``--jobs`` worker processes
(default: one per core, one torch thread each); every job is seeded by its own config, so the figures
are the same for any ``--jobs`` (measured: ``--quick`` gives identical figures with 1 and 2 workers,
in 1214 s and 660 s).

    R1  DSB2018 nuclei (human labels), head trained on the left half, scored on the right half:
        best dinocell head AP50 / classical Otsu + watershed AP50                          (>= 1.0)
    R2  pediatric 6-channel site (CellProfiler nuclei), left half / right half, primary design:
        mean over ER, RNA, AGP, Mito of AP50(head trained on DNA) / AP50(head trained there) (>= 0.6)
    R3  one labelled tile: AP50 primary design / random init, mean AP50 over DSB2018 and pediatric DNA (>= 1.1)
    S1  R2 on held-out synthetic fields (generator ground truth)                            (>= 0.8)
    S2  synthetic AP50 on ER, RNA, AGP, Mito of the DNA head: primary design / single_view   (>= 1.2)
    PROF copairs mAP vs negcon of held-out synthetic plates, primary design / untrained       (>= 1.05)

Real images are resized by the product's own rule (``model.input_scale: auto``: the median nucleus
diameter of the training half becomes ``model.object_patches`` tokens).  ``--smoke`` runs every code path on tiny sizes in
about a minute; ``--quick`` is the < 15 min version; the default is the full budget.  Writes
``WORK/results.json`` and ``WORK/side_by_side.png`` (pediatric right half: image | truth | prediction
per channel, DNA-trained head of the primary design).

    PYTHONPATH=src python benchmarks/bench_downstream.py --quick
    PYTHONPATH=src python benchmarks/bench_downstream.py --backbone multiview=runs/demo   # an existing run
    PYTHONPATH=src python benchmarks/bench_downstream.py --quick --designs multiview,single_view,dense \\
        --design dense:loss.dense_cross_weight=1.0 --primary dense
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _downstream_data import (  # noqa: E402
    PEDIATRIC_CHANNELS,
    classical_nuclei,
    load_dsb2018,
    load_pediatric_site,
    median_diameter,
    side_by_side,
    write_field,
)
from _pretrain_cache import DEFAULT_CACHE, parse_design_args, pretrained_run  # noqa: E402

from dinocell.runs import RunDir  # noqa: E402
from dinocell.segment.scale import auto_scale  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEG_CONFIG = ROOT / "configs" / "segment_synthetic.yaml"
SHARED = ROOT.parent / "shared" / "data"
OTHER = ("ER", "RNA", "AGP", "Mito")  # the channels a DNA-trained head is asked to transfer to
GROUPS = ("synthetic", "real", "prof")


@dataclass
class Mode:
    """Sizes of one run mode."""

    budget_steps: int | None  # pretraining steps (None: the demo config's full schedule)
    seg_steps: int
    seg_batch: int
    syn_fields: int  # synthetic training fields of the segmenters
    syn_eval: int  # held-out synthetic fields per evaluation
    null_size: int  # copairs null distribution
    pretrain_sizes: list[str] = field(default_factory=list)
    plates: list[str] = field(default_factory=lambda: [
        "data.synthetic.n_plates=2", "data.synthetic.wells_per_plate=32", "data.synthetic.sites_per_well=2",
        "data.synthetic.n_classes=4", "data.synthetic.n_fields=128"])
    real_side: int | None = None  # crop real images to this many px (smoke only)


MODES = {
    "smoke": Mode(budget_steps=2, seg_steps=2, seg_batch=4, syn_fields=8, syn_eval=2, null_size=100,
                  pretrain_sizes=["data.synthetic.n_fields=64", "data.batch_size=8"],
                  plates=["data.synthetic.n_plates=2", "data.synthetic.wells_per_plate=8",
                          "data.synthetic.sites_per_well=1", "data.synthetic.n_classes=3",
                          "data.synthetic.n_fields=16"], real_side=384),
    "quick": Mode(budget_steps=120, seg_steps=150, seg_batch=16, syn_fields=128, syn_eval=16, null_size=2000),
    "full": Mode(budget_steps=None, seg_steps=300, seg_batch=16, syn_fields=256, syn_eval=64, null_size=5000),
}


def ratio(num: float, den: float) -> float:
    """``num / den``; nan when the denominator scored nothing (the figure is undefined then)."""
    return float(num / den) if den > 0 else float("nan")


def mean_ratio(pairs: list[tuple[float, float]]) -> float:
    """Mean of the defined ratios (nan when none is defined)."""
    vals = [r for r in (ratio(n, d) for n, d in pairs) if np.isfinite(r)]
    return float(np.mean(vals)) if vals else float("nan")


class Inline:
    """An executor that runs each call at once (``--jobs 1``): the same code path, no processes."""

    def submit(self, fn: Any, *args: Any) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def __enter__(self) -> Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def make_pool(jobs: int, threads: int) -> Any:
    """``jobs`` worker processes (spawned: torch's OpenMP does not survive fork), ``threads`` each.
    Every head and every pretraining is seeded by its own config, so the figures do not depend on
    which worker runs what or in which order."""
    if jobs <= 1:
        return Inline()
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=init_worker,
                               initargs=(threads,))


def init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


@dataclass
class HeadJob:
    """One head: fit from ``backbone`` with ``cfg`` into ``run``, then AP50 per channel on ``spec``."""

    tag: str
    run: Path
    backbone: str | None
    cfg: Any
    spec: str
    channels: list[str]
    limit: int | None


def fit_and_score(job: HeadJob) -> dict[str, float]:
    """Train a head (fresh, never resumed) and score it (runs in a worker)."""
    from dinocell.segment.predict import evaluate_net, evaluation_source
    from dinocell.segment.run import fit, load_segmenter

    t0 = time.perf_counter()
    fit(job.cfg, job.run, backbone=job.backbone, resume=False)
    net = load_segmenter(job.run)[0]
    res = evaluate_net(net, job.cfg, evaluation_source(job.cfg, job.spec), job.spec, channels=job.channels,
                       limit=job.limit)
    print(f"  head {job.tag:<34} fit + score {time.perf_counter() - t0:5.0f} s", flush=True)
    return {c: float(s["ap50"]) for c, s in res["channels"].items()}


class Heads:
    """Fits and scores segmentation heads through the segment library, one run folder each, in a pool."""

    def __init__(self, work: Path, mode: Mode, backbones: dict[str, str | None], pool: Any) -> None:
        self.work, self.mode, self.backbones, self.pool = work, mode, backbones, pool

    def config(self, channel: str, overrides: list[str], channel_map: dict[int, str] | None = None) -> Any:
        from dinocell.segment.config import load_segment_config

        cfg = load_segment_config(SEG_CONFIG, [
            "task.objects=nuclei", f"task.channel={channel}", f"train.steps={self.mode.seg_steps}",
            f"train.batch_size={self.mode.seg_batch}", f"train.checkpoint_every_steps={self.mode.seg_steps}",
            "train.progress_bar=false", "track.logger=none", "model.mode=frozen",
            f"data.synthetic.n_fields={self.mode.syn_fields}", *overrides])
        if channel_map is not None:
            cfg.data.channel_map = dict(channel_map)
        return cfg

    def submit(self, tag: str, backbone: str, cfg: Any, spec: str, channels: list[str]) -> Future:
        """A future of the head's AP50 per channel on ``spec`` (``synthetic``: held-out generator fields)."""
        limit = self.mode.syn_eval if spec == "synthetic" else None
        job = HeadJob(tag, self.work / "heads" / tag, self.backbones[backbone], cfg, spec, channels, limit)
        return self.pool.submit(fit_and_score, job)

    def net(self, tag: str) -> Any:
        """A fitted head, in eval mode."""
        from dinocell.segment.run import load_segmenter

        return load_segmenter(self.work / "heads" / tag)[0]


def submit_synthetic(heads: Heads, primary: str, designs: list[str]) -> dict[str, Future]:
    """The heads of S1 (per-channel oracle) and S2 (primary / single_view), held-out synthetic fields."""
    chans = ["DNA", *OTHER]
    jobs = {f"dna/{bb}": heads.submit(f"syn_{bb}_DNA", bb, heads.config("DNA", []), "synthetic", chans)
            for bb in ["random", *designs]}
    for c in OTHER:
        jobs[f"oracle/{c}"] = heads.submit(f"syn_{primary}_{c}", primary, heads.config(c, []), "synthetic", [c])
    return jobs


def finish_synthetic(heads: Heads, jobs: dict[str, Future], primary: str) -> dict[str, Any]:
    dna = {k.split("/", 1)[1]: f.result() for k, f in jobs.items() if k.startswith("dna/")}
    oracle = {c: jobs[f"oracle/{c}"].result()[c] for c in OTHER}
    table(f"AP50, synthetic nuclei, head trained on DNA ({heads.mode.syn_eval} held-out fields)", dna,
          {f"{primary} oracle": oracle})
    s1 = mean_ratio([(dna[primary][c], oracle[c]) for c in OTHER])
    s2 = float("nan")
    if "single_view" in dna:
        s2 = ratio(float(np.mean([dna[primary][c] for c in OTHER])),
                   float(np.mean([dna["single_view"][c] for c in OTHER])))
    return {"dna_head": dna, "oracle": oracle, "S1": s1, "S2": s2}


def table(title: str, rows: dict[str, dict[str, float]], extra: dict[str, dict[str, float]] | None = None) -> None:
    allrows = {**rows, **(extra or {})}
    cols = list(dict.fromkeys(c for r in allrows.values() for c in r))
    print(f"\n{title}\n{'backbone':<28}" + "".join(f"{c:>10}" for c in cols))
    for name, r in allrows.items():
        print(f"{name:<28}" + "".join(f"{r[c]:>10.3f}" if c in r else f"{'':>10}" for c in cols))
    print(flush=True)


@dataclass
class RealTask:
    """One real image split into a training half, an evaluation half and one labelled tile."""

    name: str
    train: Path
    test: Path
    tile: Path
    channel_map: dict[int, str]
    overrides: list[str]
    diameter: float
    test_labels: np.ndarray
    test_planes: dict[str, np.ndarray]


def real_task(heads: Heads, name: str, planes: dict[str, np.ndarray], labels: np.ndarray,
              numbers: dict[int, str]) -> RealTask:
    """Write the halves + tile as field folders; choose input scale, crop and post-processing sizes."""
    side = heads.mode.real_side
    if side:  # the centre (corners of a site can be empty)
        y, x = max(0, (labels.shape[0] - side) // 2), max(0, (labels.shape[1] - side) // 2)
        planes = {c: p[y:y + side, x:x + side] for c, p in planes.items()}
        labels = labels[y:y + side, x:x + side]
    w = labels.shape[1] // 2
    diameter = median_diameter(labels[:, :w])
    if diameter <= 0:
        raise SystemExit(f"{name}: no labelled object in the training half")
    # the product's rule (segment.scale, `model.input_scale: auto`): objects become `object_patches`
    # tokens wide; crop, tile and post-processing sizes stay in network pixels, so only the scale is set
    base = heads.config("DNA", [])
    scale = auto_scale(diameter, int(base.model.arch.patch_size), float(base.model.object_patches))
    crop = max(16, min(int(round(base.task.crop_size / scale)), labels.shape[0], w))  # the tile, in field px
    h0, w0 = (labels.shape[0] - crop) // 2, (w - crop) // 2
    numbered = {k: planes[c] for k, c in numbers.items()}
    root = heads.work / "real" / name
    train = write_field(root / "train", {k: p[:, :w] for k, p in numbered.items()}, labels[:, :w], "nuclei")
    test = write_field(root / "test", {k: p[:, w:] for k, p in numbered.items()}, labels[:, w:], "nuclei")
    tile = write_field(root / "tile", {k: p[h0:h0 + crop, w0:w0 + crop] for k, p in numbered.items()},
                       labels[h0:h0 + crop, w0:w0 + crop], "nuclei")
    overrides = [f"model.input_scale={scale:.4f}"]
    print(f"{name}: {labels.shape[0]}x{labels.shape[1]} px, median nucleus diameter {diameter:.1f} px "
          f"-> input_scale {scale:.3f} (auto rule), labelled tile {crop} px", flush=True)
    return RealTask(name, train, test, tile, numbers, overrides, diameter, labels[:, w:],
                    {c: p[:, w:] for c, p in planes.items()})


def head_on(heads: Heads, task: RealTask, backbone: str, channel: str, where: str, channels: list[str],
            ) -> Future:
    """Fit on ``task.<where>`` (train | tile) from ``channel``; a future of AP50 on the test half per channel."""
    cfg = task_config(heads, task, channel, where)
    return heads.submit(real_tag(task, where, backbone, channel), backbone, cfg, str(task.test), channels)


def task_config(heads: Heads, task: RealTask, channel: str, where: str) -> Any:
    """The segment config of a head trained on ``task.<where>`` (train | tile) from ``channel``."""
    return heads.config(channel, [f"data.source={getattr(task, where)}", *task.overrides], task.channel_map)


def real_tag(task: RealTask, where: str, backbone: str, channel: str) -> str:
    return f"{task.name}_{where}_{backbone}_{channel}"


def submit_real(heads: Heads, primary: str, designs: list[str], shared: Path) -> dict[str, Any]:
    """The heads of R1 (DSB2018 vs classical), R2 (pediatric cross-channel), R3 (one tile, primary vs random)."""
    img, lab = load_dsb2018(shared / "dsb2018_nuclei")
    dsb = real_task(heads, "dsb2018", {"DNA": np.asarray(img)}, np.asarray(lab), {5: "DNA"})
    images, nuclei, _ = load_pediatric_site(shared / "pediatric_BR00143976_C03_3")
    ped = real_task(heads, "pediatric", {c: np.asarray(p) for c, p in images.items()}, np.asarray(nuclei),
                    PEDIATRIC_CHANNELS)
    jobs: dict[str, Future] = {f"r1/{bb}": head_on(heads, dsb, bb, "DNA", "train", ["DNA"])
                               for bb in ["random", *designs]}
    jobs["ped/DNA"] = head_on(heads, ped, primary, "DNA", "train", ["DNA", *OTHER])
    for c in OTHER:
        jobs[f"ped/{c}"] = head_on(heads, ped, primary, c, "train", [c])
    for t in (dsb, ped):
        for bb in ("random", primary):
            jobs[f"tile/{t.name}/{bb}"] = head_on(heads, t, bb, "DNA", "tile", ["DNA"])
    return {"dsb": dsb, "ped": ped, "jobs": jobs}


def finish_real(heads: Heads, plan: dict[str, Any], primary: str, designs: list[str]) -> dict[str, Any]:
    from dinocell.segment.infer import segment_image
    from dinocell.segment.metrics import match_counts, scores

    dsb, ped, jobs = plan["dsb"], plan["ped"], plan["jobs"]
    classical = classical_nuclei(dsb.test_planes["DNA"], dsb.diameter)
    ap_classical = float(scores(match_counts(dsb.test_labels, classical))["ap50"])
    r1_heads = {bb: jobs[f"r1/{bb}"].result()["DNA"] for bb in ["random", *designs]}
    table("AP50, DSB2018 right half (head trained on the left half)",
          {bb: {"DNA": v} for bb, v in r1_heads.items()}, {"classical Otsu+watershed": {"DNA": ap_classical}})

    chans = ["DNA", *OTHER]
    dna = jobs["ped/DNA"].result()
    oracle = {c: jobs[f"ped/{c}"].result()[c] for c in OTHER}
    table(f"AP50, pediatric site right half, {primary} backbone", {"head trained on DNA": dna},
          {"head trained on the channel": oracle})
    net, cfg = heads.net(real_tag(ped, "train", primary, "DNA")), task_config(heads, ped, "DNA", "train")
    preds = segment_image(net, np.stack([ped_plane(ped, c) for c in chans]), cfg)
    side_by_side(heads.work / "side_by_side.png",
                 [(c, ped.test_planes[c], ped.test_labels, p) for c, p in zip(chans, preds, strict=True)])

    names = ("dsb2018", "pediatric")
    tile = {(t, bb): jobs[f"tile/{t}/{bb}"].result()["DNA"] for t in names for bb in ("random", primary)}
    table("AP50 with one labelled tile (DNA), test half", {bb: {t: tile[(t, bb)] for t in names}
                                                           for bb in ("random", primary)})
    r3 = ratio(np.mean([tile[(t, primary)] for t in names]), np.mean([tile[(t, "random")] for t in names]))
    return {"dsb2018": {"heads": r1_heads, "classical": ap_classical},
            "pediatric": {"dna_head": dna, "oracle": oracle}, "tile": {f"{t}/{b}": v for (t, b), v in tile.items()},
            "R1": ratio(max(r1_heads[d] for d in designs), ap_classical),
            "R2": mean_ratio([(dna[c], oracle[c]) for c in OTHER]), "R3": r3}


def ped_plane(task: RealTask, channel: str) -> np.ndarray:
    """The test half's ``channel`` plane as the segment library scales it (its own source)."""
    from dinocell.config import DataConfig
    from dinocell.data.sources import open_source
    from dinocell.segment.data import input_plane

    src = open_source(DataConfig(source=str(task.test), channel_map=dict(task.channel_map)))
    return input_plane(src.load(src.records[0]), src.channels, src.fluorescent, channel)


def run_prof(run: Path, mode: Mode, work: Path) -> dict[str, Any]:
    """Copairs replicate mAP of held-out synthetic plates: the pretrained teacher vs the same
    architecture untrained (same seed), field profiles -> median wells -> negcon normalisation."""
    import lightning as L
    import pandas as pd

    from dinocell.config import load_config
    from dinocell.evaluate.embed import load_model, run_embed
    from dinocell.evaluate.profiling import aggregate_wells, replicate_map
    from dinocell.models.backbone import build_backbone

    trained = load_model(run)
    cfg = load_config(RunDir(run).config)
    L.seed_everything(cfg.train.seed, verbose=False)
    untrained = replace(trained, backbone=build_backbone(cfg.model, img_size=trained.crop_size).eval(),
                        description="untrained")
    rows = {}
    for name, model in (("untrained", untrained), ("trained", trained)):
        res = run_embed(model, work / "profiles" / name, data="synthetic", overrides=mode.plates, overwrite=True)
        wells = aggregate_wells(pd.read_parquet(res["paths"]["fields"]))
        m = replicate_map(wells, null_size=mode.null_size, seed=0)
        rows[name] = {"wells": len(wells), "negcon_map": m["negcon"]["mean_average_precision"],
                      "negcon_retrieved": m["negcon"]["fraction_retrieved"],
                      "nonrep_map": m.get("nonrep", {}).get("mean_average_precision", float("nan"))}
    return {**rows, "PROF": ratio(rows["trained"]["negcon_map"], rows["untrained"]["negcon_map"])}


def print_prof(res: dict[str, Any]) -> None:
    print(f"\nprofiling, held-out synthetic plates ({res['trained']['wells']} wells)")
    print(f"{'model':<12}{'negcon mAP':>12}{'retrieved':>11}{'nonrep mAP':>12}")
    for name in ("untrained", "trained"):
        r = res[name]
        print(f"{name:<12}{r['negcon_map']:>12.3f}{r['negcon_retrieved']:>11.2f}{r['nonrep_map']:>12.3f}")
    print(flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes, every code path (about a minute)")
    size.add_argument("--quick", action="store_true", help="short budget (< 15 min on 2 cores)")
    p.add_argument("--designs", default="multiview,single_view",
                   help="comma-separated pretraining designs (named in benchmarks/_pretrain_cache.py or --design)")
    p.add_argument("--design", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="add an override to a design (repeatable; defines a new design by name)")
    p.add_argument("--backbone", action="append", default=[], metavar="DESIGN=RUN_DIR",
                   help="use this existing pretraining run (or export) for a design instead of the cache")
    p.add_argument("--primary", default="multiview", help="the design R2/R3/S1/S2/PROF report")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {', '.join(GROUPS)}")
    p.add_argument("--budget-steps", type=int, default=None, help="pretraining steps (default: per mode)")
    p.add_argument("--seg-steps", type=int, default=None, help="segmentation head training steps")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="pretrained backbone cache")
    p.add_argument("--work", type=Path, default=None, help="output folder (default runs/bench_downstream_<mode>)")
    p.add_argument("--shared", type=Path, default=SHARED, help="real fixtures (../shared/data)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="worker processes for the pretrainings and head fits (default: one per core)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (1: small tensors; a process per core beats threads per core)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[mode_name]
    if args.budget_steps is not None:
        mode.budget_steps = args.budget_steps
    if args.seg_steps is not None:
        mode.seg_steps = args.seg_steps
    only = [g for g in args.only.split(",") if g]
    if bad := [g for g in only if g not in GROUPS]:
        raise SystemExit(f"--only: unknown group(s) {', '.join(bad)} (known: {', '.join(GROUPS)})")
    designs = parse_design_args([d for d in args.designs.split(",") if d], args.design)
    if args.primary not in designs:
        raise SystemExit(f"--primary {args.primary} is not among --designs {', '.join(designs)}")
    work = args.work or ROOT / "runs" / f"bench_downstream_{mode_name}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"mode {mode_name}: pretraining budget {mode.budget_steps or 'full demo schedule'} steps, "
          f"designs {', '.join(designs)} (primary {args.primary}), head steps {mode.seg_steps}", flush=True)
    given = dict(item.split("=", 1) for item in args.backbone if "=" in item)
    if bad := [n for n in given if n not in designs]:
        raise SystemExit(f"--backbone: {', '.join(bad)} not among --designs {', '.join(designs)}")
    names = list(designs)
    real = "real" in only and all((args.shared / d).is_dir() for d in ("dsb2018_nuclei", "pediatric_BR00143976_C03_3"))
    if "real" in only and not real:
        print(f"real fixtures not found in {args.shared}: R1-R3 skipped", flush=True)
    results: dict[str, Any] = {"mode": mode_name, "budget_steps": mode.budget_steps, "designs": designs,
                               "primary": args.primary, "jobs": args.jobs}
    lines = []
    with make_pool(args.jobs, args.threads) as pool:
        # the designs pretrain side by side; every head waits for all of them (a head's backbone is a path)
        pending = {name: pool.submit(pretrained_run, name, overrides, mode.budget_steps, mode.pretrain_sizes,
                                     args.cache_dir) for name, overrides in designs.items() if name not in given}
        backbones: dict[str, str | None] = {"random": None}
        backbones.update({name: given.get(name) or str(pending[name].result()) for name in designs})
        results["backbones"] = backbones
        heads = Heads(work, mode, backbones, pool)
        # the longest job first (two embeddings of the held-out plates), so no worker idles at the end
        prof = pool.submit(run_prof, Path(backbones[args.primary] or ""), mode, work) if "prof" in only else None
        plan_real = submit_real(heads, args.primary, names, args.shared) if real else None
        plan_syn = submit_synthetic(heads, args.primary, names) if "synthetic" in only else None
        if plan_real is not None:
            results["real"] = r = finish_real(heads, plan_real, args.primary, names)
            lines += [f"R1 ratio={r['R1']:.3f} target>=1.0", f"R2 ratio={r['R2']:.3f} target>=0.6",
                      f"R3 ratio={r['R3']:.3f} target>=1.1"]
        if plan_syn is not None:
            results["synthetic"] = s = finish_synthetic(heads, plan_syn, args.primary)
            lines += [f"S1 ratio={s['S1']:.3f} target>=0.8", f"S2 ratio={s['S2']:.3f} target>=1.2"]
        if prof is not None:
            results["prof"] = pr = prof.result()
            print_prof(pr)
            lines.append(f"PROF ratio={pr['PROF']:.3f} target>=1.05")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    from dinocell.paths import write_text_atomic

    write_text_atomic(work / "results.json", json.dumps(results, indent=2, default=float))
    print(f"wall time {results['seconds']:.0f} s; results in {work}")
    for line in lines:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
