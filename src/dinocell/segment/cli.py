"""``dinocell segment fit | predict | evaluate``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dinocell.config import allow_intermixed


def register(sub: Any) -> None:
    """Add ``segment`` with its three actions."""
    seg = sub.add_parser("segment", help="train / run / score a nuclei or cell segmenter on a dinocell backbone")
    ssub = seg.add_subparsers(dest="segment_command", metavar="ACTION", parser_class=type(seg))
    seg.set_defaults(func=lambda a: (seg.print_help(), 2)[1])

    fit = ssub.add_parser("fit", help="train the decoder (frozen or fine-tuned backbone); rerun to resume")
    fit.add_argument("--config", default=None, help="segmentation YAML (configs/segment_synthetic.yaml)")
    fit.add_argument("--output-dir", required=True, help="run folder")
    fit.add_argument("--backbone", default=None,
                     help="export folder (dinocell export), official DINOv3 .pth or pretraining run folder (default: "
                          "model.backbone; none = random init)")
    fit.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    fit.add_argument("--max-steps", type=int, default=None,
                     help="stop this invocation after N steps (the schedule stays train.steps; rerun to resume)")
    fit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. task.channel=AGP")
    allow_intermixed(fit)
    fit.set_defaults(func=_fit)

    pred = ssub.add_parser("predict", help="label TIFFs + a Parquet object table for images or sources")
    pred.add_argument("run_dir", help="a 'segment fit' run folder")
    pred.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="image file, folder, load_data file, s3:// prefix or 'synthetic'")
    pred.add_argument("--out", required=True, help="output folder")
    pred.add_argument("--channel", default=None, help="channel name or 'mean' (default: the training channel)")
    pred.add_argument("--override", dest="overrides", action="append", default=[], metavar="key=value",
                      help="config override for reading the inputs, e.g. data.synthetic.n_fields=4 (repeatable)")
    pred.set_defaults(func=_predict)

    ev = ssub.add_parser("evaluate", help="AP50 / AP / F1 per channel against instance masks")
    ev.add_argument("run_dir", help="a 'segment fit' run folder")
    ev.add_argument("--data", required=True, help="annotated source ('synthetic' = held-out synthetic fields)")
    ev.add_argument("--fields", type=int, default=None, help="evaluate at most N annotated fields")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.synthetic.n_fields=16")
    allow_intermixed(ev)
    ev.set_defaults(func=_evaluate)


def _fit(args: argparse.Namespace) -> int:
    from dinocell.segment.config import load_segment_config
    from dinocell.segment.run import fit

    cfg = load_segment_config(args.config, list(args.overrides or []))
    summary = fit(cfg, args.output_dir, backbone=args.backbone, resume=not args.no_resume,
                  max_steps=args.max_steps)
    print(json.dumps(summary))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dinocell.segment.predict import predict
    from dinocell.segment.run import apply_overrides, load_segmenter

    net, cfg, _ = load_segmenter(args.run_dir)
    cfg = apply_overrides(net, cfg, list(args.overrides))
    res = predict(net, cfg, list(args.inputs), args.out, channel=args.channel)
    print(f"segmented {res['fields']} field(s): {res['objects']} objects -> {res['table']}, {res['masks']}/")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dinocell.segment.predict import evaluate, format_evaluation

    res = evaluate(args.run_dir, args.data, list(args.overrides or []), limit=args.fields)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "per_image"} | {"per_image": res["per_image"]}))
    else:
        print(format_evaluation(res))
    return 0
