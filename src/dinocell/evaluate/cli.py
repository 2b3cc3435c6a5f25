"""``dinocell evaluate``, ``dinocell embed`` and ``dinocell preview``.

Each subcommand only parses its arguments and calls one library function; torch and friends are
imported inside the functions so ``dinocell --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dinocell.config import add_config_arguments, allow_intermixed
from dinocell.paths import check_output_dir, refuse_segmentation_run

DATA_HELP = "synthetic (held-out fields; default) | folder | load_data .csv/.parquet | s3://bucket/prefix"


def register(sub: Any) -> None:
    """Add ``evaluate``, ``embed`` and ``preview``."""
    ev = sub.add_parser("evaluate", help="channel consistency, retrieval, kNN/linear probes, transfer, copairs mAP")
    ev.add_argument("model", nargs="?", default=None,
                    help="run folder (its newest export/ or checkpoints/last.ckpt), .ckpt or export folder")
    ev.add_argument("--data", default=None, help=DATA_HELP)
    ev.add_argument("--labelled", default=None, metavar="DIR", help="labelled images as DIR/<class>/*.tif")
    ev.add_argument("--labels-csv", default=None, metavar="CSV", help="labelled images: CSV with path,label")
    ev.add_argument("--profiles", default=None, metavar="FILE",
                    help="profile table (Parquet/CSV from 'dinocell embed'): copairs replicate mAP")
    ev.add_argument("--limit", type=int, default=None,
                    help="at most N fields, spread over the source (default: all; a run's held-out wells: "
                         "the run's train.eval_fields, as summary.json)")
    ev.add_argument("--size", type=int, default=None, help="image size fed to the model (default: training crop)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--null-size", type=int, default=10000, help="copairs null distribution size")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out-dir", default=None, help="output folder (default <run>/eval)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.channels=[DNA,RNA]")
    ev.set_defaults(func=_evaluate)
    allow_intermixed(ev)

    em = sub.add_parser("embed", aliases=["extract-fields"],
                        help="fields -> per-field and per-well Parquet profiles (alias: extract-fields)",
                        description="Embed every field of a data source with a model: tiles at the training "
                                    "magnification (or the whole field), each stain as its own image; "
                                    "resumable in chunks. 'extract-fields' is the same command.")
    em.add_argument("model", nargs="?", default=None,
                    help="run folder, .ckpt, export folder (or old .safetensors export) or official DINOv3 .pth")
    em.add_argument("--backbone", default=None, help="same as MODEL (the extract-fields spelling)")
    em.add_argument("--model-name", default=None, help="timm architecture of an official .pth with a custom name")
    em.add_argument("--data", "--source", dest="data", default=None, help=DATA_HELP)
    em.add_argument("--config", default=None, help="experiment YAML whose data section selects the fields")
    em.add_argument("--out", "--output-dir", dest="out", required=True, metavar="DIR",
                    help="output folder (fields.parquet, wells.parquet, parts/)")
    # options without an argparse default: one not given keeps its EmbedOptions default (written once)
    em.add_argument("--view", default=argparse.SUPPRESS, choices=("concat", "channel_mean", "mean_image"),
                    help="field profile: channel embeddings side by side (default), mean of the fluorescent "
                         "channel embeddings, or embedding of the fluorescent mean image")
    em.add_argument("--pool", default=argparse.SUPPRESS, choices=("cls", "mean"), help="CLS token or mean of patch tokens")
    em.add_argument("--geometry", default=argparse.SUPPRESS, choices=("tiles", "full"),
                    help="tiles of the training crop at native resolution, mean-pooled (default), or the "
                         "whole field in one pass; fields are never resized")
    em.add_argument("--tile", type=int, default=argparse.SUPPRESS, help="tile side in px (default: the training crop)")
    em.add_argument("--dtype", default=argparse.SUPPRESS, choices=("fp32", "fp16"), help="feature precision on disk")
    em.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help="images per forward pass")
    em.add_argument("--chunk-size", type=int, default=argparse.SUPPRESS, help="fields per resumable part file")
    em.add_argument("--limit", type=int, default=argparse.SUPPRESS, help="at most N fields, spread over the source")
    em.add_argument("--patch-maps", action="store_true", default=argparse.SUPPRESS, help="also write patch-feature maps per plate (full)")
    em.add_argument("--overwrite", action="store_true", help="discard earlier parts in the output folder")
    em.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    em.add_argument("--no-progress", action="store_true")
    em.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    em.set_defaults(func=_embed)
    allow_intermixed(em)

    pv = sub.add_parser("preview", help="grids of fields before/after scaling and of the training views")
    group = pv.add_mutually_exclusive_group(required=True)
    group.add_argument("--dir", default=None, help="data source: folder, load_data file, s3:// prefix, synthetic")
    group.add_argument("--csv", default=None, help="CSV of image tiles (with --tile-col)")
    pv.add_argument("--tile-col", default=None, help="CSV column holding the tile paths")
    pv.add_argument("--n", type=int, default=12, help="number of fields/tiles")
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--out-dir", default="preview", help="output folder (default ./preview)")
    add_config_arguments(pv)
    pv.set_defaults(func=_preview)
    allow_intermixed(pv)


def _evaluate(args: argparse.Namespace) -> int:
    from dinocell.evaluate.run import evaluate, summary_line

    if args.out_dir is not None:
        check_output_dir(args.out_dir)
    refuse_segmentation_run(args.model, "dinocell evaluate")
    res = evaluate(model=args.model, out_dir=args.out_dir, data=args.data, overrides=args.overrides,
                   labelled=args.labelled, labels_csv=args.labels_csv, limit=args.limit, size=args.size,
                   batch_size=args.batch_size, profiles=args.profiles, null_size=args.null_size, seed=args.seed)
    if args.json:
        print(json.dumps(res))
    else:
        print(summary_line(res))
        print(f"wrote {res['out_dir']}/evaluation.json and evaluation.md")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dinocell.errors import UserError
    from dinocell.evaluate.embed import run_embed

    check_output_dir(args.out)
    overrides = list(args.overrides or [])
    if args.model and "=" in args.model and not Path(args.model).exists():
        overrides.insert(0, args.model)  # with --backbone, the first key=value lands in MODEL
        args.model = None
    model = args.model or args.backbone
    if model is None:
        raise UserError("give a model: a run folder, .ckpt, export folder or DINOv3 .pth")
    refuse_segmentation_run(model, "dinocell embed")
    base = None
    if args.config:
        from dinocell.config import load_config

        base = load_config(args.config)
    device = args.device
    options = {k: getattr(args, k) for k in ("view", "pool", "geometry", "tile", "dtype", "batch_size",
                                             "chunk_size", "limit", "patch_maps") if hasattr(args, k)}
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    info = run_embed(model, args.out, data=args.data, overrides=overrides, base_config=base,
                     model_name=args.model_name, device=device, overwrite=args.overwrite,
                     progress=not args.no_progress, **options)
    print(f"embedded {info['fields']} fields ({info['wells']} wells, {info['features']} features, "
          f"{info['dtype']}, {info['geometry']} {info['tile']} px) -> {info['paths']['fields']}, "
          f"{info['paths']['wells']}")
    if info["skipped"]:
        print(f"skipped {len(info['skipped'])} field(s); first: {info['skipped'][0]}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from dinocell.config import config_from_args
    from dinocell.evaluate.preview import preview

    cfg = config_from_args(args)
    info = preview(cfg, args.out_dir, source=args.dir, csv=args.csv, tile_col=args.tile_col, n=args.n,
                   seed=args.seed)
    print(f"wrote {', '.join(info['files'])} ({info['n']} images)")
    if info["skipped"]:
        print(f"skipped {len(info['skipped'])}; first: {info['skipped'][0]}")
    return 0
