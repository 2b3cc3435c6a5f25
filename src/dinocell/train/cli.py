"""``dinocell pretrain`` and ``dinocell export``."""

from __future__ import annotations

import argparse
from typing import Any

from dinocell.config import add_config_arguments, config_from_args
from dinocell.paths import check_output_dir, refuse_segmentation_run


def register(sub: Any) -> None:
    """Add ``pretrain`` and ``export``."""
    p = sub.add_parser("pretrain", help="multi-view DINOv3 pretraining (resumes automatically)")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/<config name>)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    add_config_arguments(p)
    p.set_defaults(func=_pretrain)

    e = sub.add_parser("export", help="write the teacher backbone as a model folder (config.json + model.safetensors) "
                                      "that dinocell.load_model and timm.create_model('local-dir:OUT', pretrained=True) load")
    e.add_argument("run_dir", help="run folder (or a .ckpt file)")
    e.add_argument("--out", required=True, help="output folder (created; an earlier export there is replaced)")
    # the one format since the .safetensors + sidecar export was retired: `--format timm` of older
    # scripts still works, `--format safetensors` is one line
    e.add_argument("--format", default="timm", help=argparse.SUPPRESS)
    e.set_defaults(func=_export)


def _pretrain(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from dinocell.train.run import pretrain

    cfg = config_from_args(args)  # validated: TrainConfig.validate refuses bad checkpoint settings
    refuse_segmentation_run(cfg.model.pretrained, "model.pretrained")
    out = args.output_dir if args.output_dir is None else str(check_output_dir(args.output_dir))
    if out is None and os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        # each sweep trial gets its own folder, so parallel agents never share checkpoints
        out = str(Path("runs") / "sweeps" / os.environ["WANDB_SWEEP_ID"] / os.environ["WANDB_RUN_ID"])
    if out is None:
        out = str(Path("runs") / (Path(args.config).stem if args.config else "default"))
    args.output_dir = out  # the CLI removes this run's temp files if the disk fills up
    pretrain(cfg, out, max_steps=args.max_steps, resume=not args.no_resume)
    return 0


def _export(args: argparse.Namespace) -> int:
    from dinocell.errors import UserError
    from dinocell.train.export import check_export_out, export_run

    if args.format != "timm":
        raise UserError(f"--format {args.format}: dinocell export writes one format now, a timm model folder "
                        "(config.json + model.safetensors); drop --format")
    refuse_segmentation_run(args.run_dir, "dinocell export")
    check_output_dir(check_export_out(args.out))
    path = export_run(args.run_dir, args.out)
    print(f"wrote {path}/ (config.json, model.safetensors, dinocell.safetensors)")
    return 0
