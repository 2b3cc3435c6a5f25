"""Subcommands ``extract-volumes``, ``check`` and ``bench-load``.

``extract-fields`` is an alias of ``dinocell embed`` (registered by :mod:`dinocell.evaluate.cli`).

Each handler only turns arguments into a library call (heavy imports happen inside the handler),
so ``dinocell --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dinocell.paths import check_output_dir


def _ints(text: str) -> list[int]:
    """"0 2 5-7" / "0,2,5-7" -> [0, 2, 5, 6, 7]."""
    out: list[int] = []
    for tok in text.replace(",", " ").split():
        if "-" in tok[1:]:
            a, b = tok.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(tok))
    return out


def _index_list(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    try:
        return [i for v in values for i in _ints(v)]
    except ValueError:
        from dinocell.errors import ConfigError

        raise ConfigError(f"indices must be integers or ranges like 3-7; got {' '.join(values)}") from None


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.replace(",", " ").split()]


#: flags without an argparse default: a flag the user did not give keeps its dataclass default
#: (ExtractionConfig / ClusterOptions), so no default is written twice
UNSET = argparse.SUPPRESS


def _given(args: argparse.Namespace, names: Any, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """The options among ``names`` the user gave, keyed by their config names (``rename``: flag -> key)."""
    rename = rename or {}
    return {rename.get(n, n): getattr(args, n) for n in names if hasattr(args, n)}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: a tiny random-initialised ViT, with a warning)")
    g.add_argument("--backbone", default=UNSET,
                   help="dinocell export folder (or old .safetensors export), or a run folder (export/ or checkpoints/last.ckpt + config.yaml)")
    g.add_argument("--model-name", default=UNSET, help="timm DINOv3 name, e.g. vit_small_patch16_dinov3")
    g.add_argument("--weights", default=UNSET, help="local official DINOv3 .pth for --model-name")


# --------------------------------------------------------------------------------------------------
# extract-volumes
# --------------------------------------------------------------------------------------------------


def extraction_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(ExtractionConfig, ClusterOptions) of parsed ``extract-volumes`` arguments, through the one config
    engine: dataclass defaults, then the flags given (typed, strict), then each one's ``validate()``."""
    from dinocell.config import load
    from dinocell.extract.runner import ClusterOptions
    from dinocell.extract.volumes import ExtractionConfig

    if getattr(args, "base_resolution", None):
        args.base_resolution = _floats(args.base_resolution)
    if getattr(args, "chunks", None):
        args.chunks = [int(v) for v in _floats(args.chunks)]
    options = _given(args, ("manifest", "base_resolution", "output_image_dim", "min_label_fraction",
                            "min_unique_ids", "min_ground_truth_fraction", "max_tries", "seed", "axes", "store",
                            "batch_size", "compression", "compression_level", "checksum", "chunks",
                            "feature_dtype", "gpu"))
    options["model"] = _given(args, ("backbone", "model_name", "weights"))
    options["s3"] = _given(args, ("s3_endpoint", "s3_region", "s3_anonymous"),
                           {"s3_endpoint": "endpoint", "s3_region": "region", "s3_anonymous": "anonymous"})
    cfg = load(ExtractionConfig(output_dir=args.output_dir), data=options)
    opts = load(ClusterOptions, data=_given(args, ("cluster", "num_processors", "memory_gb", "walltime", "queue",
                                                   "project", "gpu", "max_jobs", "local_workers", "interface",
                                                   "prologue")))
    return cfg, opts


def _cmd_extract_volumes(args: argparse.Namespace) -> int:
    from dinocell.extract.runner import plan_indices, run_extraction

    check_output_dir(args.output_dir)
    cfg, opts = extraction_configs(args)
    indices = plan_indices(args.num_volumes, args.start_index, _index_list(args.indices))
    summary = run_extraction(cfg, indices, opts, dry_run=args.dry_run, progress=not args.no_progress)
    if args.dry_run:
        return 0
    print(f"extracted {len(summary.completed)}, skipped {len(summary.skipped)} (already complete), "
          f"failed {len(summary.failed)} of {len(summary.requested)} volume(s) in "
          f"{summary.elapsed_seconds:.1f} s -> {cfg.output_dir}")
    for i, line in sorted(summary.failed.items()):
        print(f"  volume {i} failed: {line} (see logs/volume_{i:06d}.err)", file=sys.stderr)
    return 1 if summary.failed else 0


def _register_extract_volumes(sub: Any) -> None:
    p = sub.add_parser("extract-volumes", help="pre-extract DINOv3 features of 3-D volumes to zarr",
                       description="Extract DINOv3 features of 3-D volumes listed in a manifest (default: "
                                   "built-in synthetic volumes) into OUTPUT_DIR, resumably, locally or on "
                                   "LSF/SLURM via Dask.")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--manifest", default=UNSET, help="YAML/CSV listing raw (+ label) arrays; default: synthetic volumes")
    sel = p.add_argument_group("which volumes")
    sel.add_argument("--num-volumes", type=int, help="number of volumes (indices START..START+N-1)")
    sel.add_argument("--start-index", type=int, default=0)
    sel.add_argument("--indices", nargs="+", help="explicit indices/ranges, e.g. 0 3 10-19")
    sel.add_argument("--volume-index", dest="indices_single", type=int,
                     help="extract exactly this index (it is also the crop's seed)")
    crop = p.add_argument_group("crop sampling")
    crop.add_argument("--base-resolution", default=UNSET, help="output voxel size in nm: one value or 'z,y,x' "
                                                "(default: the raw array's finest level)")
    crop.add_argument("--output-image-dim", type=int, default=UNSET, help="crop side in voxels (default 128)")
    crop.add_argument("--min-label-fraction", type=float, default=UNSET)
    crop.add_argument("--min-unique-ids", type=int, default=UNSET)
    crop.add_argument("--min-ground-truth-fraction", type=float, default=UNSET)
    crop.add_argument("--max-tries", type=int, default=UNSET)
    crop.add_argument("--seed", type=int, default=UNSET, help="combined with the volume index")
    feat = p.add_argument_group("features and storage")
    feat.add_argument("--axes", choices=("z", "zyx"), default=UNSET,
                      help="slice along z only, or along z, y and x and average (needs --store voxel)")
    feat.add_argument("--store", choices=("patch", "voxel"), default=UNSET,
                      help="patch (default): features at the ViT's patch grid, ~256x smaller, upsample while "
                           "training; voxel: features upsampled to every voxel")
    feat.add_argument("--batch-size", type=int, default=UNSET, help="slices per forward pass")
    feat.add_argument("--compression", choices=("none", "zstd", "blosc-lz4"), default=UNSET)
    feat.add_argument("--compression-level", type=int, default=UNSET)
    feat.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=UNSET,
                      help="per-chunk checksum so --verify detects corruption (zstd: free; none/blosc: crc32c)")
    feat.add_argument("--chunks", default=UNSET, help="feature chunk shape 'C,D,H,W' (default 16,64,64,64)")
    feat.add_argument("--feature-dtype", choices=("float16", "float32"), default=UNSET)
    _add_model_args(p)
    cl = p.add_argument_group("cluster")
    cl.add_argument("--cluster", choices=("local", "lsf", "slurm", "serial"), default=UNSET)
    cl.add_argument("--num-processors", type=int, default=UNSET,
                    help="cores per worker/job (default: all local cores; 4 per cluster job)")
    cl.add_argument("--memory-gb", type=float, default=UNSET)
    cl.add_argument("--walltime", default=UNSET, help="HH:MM")
    cl.add_argument("--queue", default=UNSET)
    cl.add_argument("--project", default=UNSET, help="LSF project / SLURM account")
    cl.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=UNSET,
                    help="request/use one GPU per job (default: use one if visible locally)")
    cl.add_argument("--max-jobs", type=int, default=UNSET, help="adaptive maximum of cluster jobs")
    cl.add_argument("--local-workers", type=int, default=UNSET, help="concurrent volumes on --cluster local")
    cl.add_argument("--interface", default=UNSET, help="network interface for the Dask scheduler/workers (e.g. ib0)")
    cl.add_argument("--prologue", action="append", default=UNSET, help="job-script line before the worker starts "
                                                        "(repeatable), e.g. 'source venv/bin/activate'")
    cl.add_argument("--dry-run", action="store_true", help="print the plan / job script, extract nothing")
    s3 = p.add_argument_group("s3 inputs")
    s3.add_argument("--s3-endpoint", default=UNSET, help="S3 endpoint override (e.g. http://127.0.0.1:9000)")
    s3.add_argument("--s3-region", default=UNSET)
    s3.add_argument("--s3-anonymous", action="store_true", default=UNSET, help="unsigned requests (public buckets)")
    p.add_argument("--no-progress", action="store_true")

    def func(args: argparse.Namespace) -> int:
        if args.indices_single is not None:
            args.indices = [str(args.indices_single)] + list(args.indices or [])
        return _cmd_extract_volumes(args)

    p.set_defaults(func=func)


# --------------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------------


def _register_check(sub: Any) -> None:
    p = sub.add_parser("check", help="progress, gaps, failures, timing and storage of an extraction",
                       description="Report on an extract-volumes output folder; --verify re-reads chunks. "
                                   "Exit code 0 when everything requested is complete and healthy, else 1.")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--verify", action="store_true", help="read every chunk of the checked volumes")
    p.add_argument("--sample-size", type=int, help="verify a random sample of K completed volumes")
    p.add_argument("--verify-indices", nargs="+", help="verify exactly these indices/ranges")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    def func(args: argparse.Namespace) -> int:
        from dinocell.extract.check import check_output, format_report

        verify_indices = _index_list(args.verify_indices)
        report = check_output(args.output_dir, verify=args.verify or bool(verify_indices),
                              sample_size=args.sample_size, verify_indices=verify_indices)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0 if report["ok"] else 1

    p.set_defaults(func=func)


# --------------------------------------------------------------------------------------------------
# bench-load
# --------------------------------------------------------------------------------------------------


def _register_bench_load(sub: Any) -> None:
    p = sub.add_parser("bench-load", help="time cold and warm loading of cached volume features")
    p.add_argument("--preprocessed-dir", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-batches", type=int, default=20)
    p.add_argument("--num-threads", type=int, default=8)
    p.add_argument("--json", action="store_true")

    def func(args: argparse.Namespace) -> int:
        from dinocell.extract.dataset import bench_load

        res = bench_load(args.preprocessed_dir, args.batch_size, args.num_batches, args.num_threads,
                         printer=None if args.json else print)
        if args.json:
            print(json.dumps(res, indent=2))
        return 0

    p.set_defaults(func=func)


def register(subparsers: Any) -> None:
    """Add the extraction subcommands to ``dinocell``'s subparsers."""
    _register_extract_volumes(subparsers)
    _register_check(subparsers)
    _register_bench_load(subparsers)
