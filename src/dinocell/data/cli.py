"""``dinocell data ...``: inspect data sources and write synthetic JUMP folders."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dinocell.config import add_config_arguments, config_from_args
from dinocell.paths import check_output_dir


def register(sub: Any) -> None:
    """Add ``data ls``, ``data check`` and ``data synth``."""
    data = sub.add_parser("data", help="inspect data sources, write synthetic data")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(data))
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])

    ls = dsub.add_parser("ls", help="list the fields of a folder, load_data file, s3:// prefix or 'synthetic'")
    ls.add_argument("path", help="folder | load_data.csv/.parquet | s3://bucket/prefix | synthetic")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.add_argument("--pattern", default=None, help="regex with named groups channel[, plate, well, site]")
    ls.add_argument("--channels", default=None, help="comma-separated channel names")
    ls.add_argument("--endpoint-url", default=None, help="S3 endpoint (local S3, MinIO)")
    ls.add_argument("--no-verify", action="store_true", help="skip the TIFF header check of local files")
    add_config_arguments(ls)
    ls.set_defaults(func=_ls)

    check = dsub.add_parser("check", help="preflight a source: reachable, access, fields, one field decoded, "
                                           "the bandwidth the batch size needs")
    check.add_argument("path", help="s3://bucket/prefix | folder | load_data.csv/.parquet")
    check.add_argument("--endpoint-url", default=None, help="S3 endpoint (local S3, MinIO)")
    check.add_argument("--steps-per-s", type=float, default=1.0,
                       help="training speed the bandwidth estimate assumes (default 1 step/s)")
    add_config_arguments(check)
    check.set_defaults(func=_check)

    synth = dsub.add_parser("synth", help="write a JUMP-layout folder of synthetic LZW TIFF fields")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--fields", type=int, default=8, help="number of fields")
    synth.add_argument("--size", type=int, default=1080, help="field size in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--plates", type=int, default=1)
    synth.add_argument("--no-masks", action="store_true",
                       help="skip the instance masks (<field>_nuclei_masks.tif, <field>_cells_masks.tif)")
    synth.set_defaults(func=_synth)


def _ls(args: argparse.Namespace) -> int:
    from dinocell.data.sources import open_source

    extra = []
    if args.pattern:
        extra.append(f"data.pattern={json.dumps(args.pattern)}")
    if args.channels:
        extra.append(f"data.channels=[{args.channels}]")
    if args.endpoint_url:
        extra.append(f"data.s3.endpoint_url={args.endpoint_url}")
    cfg = config_from_args(args, extra)
    source = open_source(cfg.data, args.path)
    if not args.no_verify:
        source.verify()
    screen_fields(source, headers=not args.no_verify)
    info = source.describe()
    if args.json:
        print(json.dumps(info))
    else:
        print(format_listing(info))
    return 0


def _check(args: argparse.Namespace) -> int:
    extra = [f"data.s3.endpoint_url={args.endpoint_url}"] if args.endpoint_url else []
    cfg = config_from_args(args, extra)
    for line in check_source(args.path, cfg.data, args.steps_per_s):
        print(line)
    return 0


def check_source(path: str, data_cfg: Any, steps_per_s: float = 1.0) -> list[str]:
    """The preflight verdict of a source (``s3://``: :func:`dinocell.data.s3.check.check_s3`; local:
    open it and load one field).  Failures raise one-line :class:`~dinocell.errors.UserError`."""
    if path.startswith("s3://"):
        from dinocell.data.s3.check import check_s3

        return check_s3(path, data_cfg, steps_per_s)
    from dinocell.data.sources import open_source

    source = open_source(data_cfg, path)
    source.verify()
    screen_fields(source)
    rec = source.records[0]
    arr = source.load(rec)
    info = source.describe()
    return [f"fields:      {info['fields']} ({', '.join(info['channels'])})",
            f"channels:    {format_channel_map(info)}",
            f"decoded:     {rec.key}: {arr.shape[0]} channels of {arr.shape[1]}x{arr.shape[2]}",
            "verdict:     ok"]


def screen_fields(source: Any, headers: bool = True) -> list[str]:
    """Drop (into ``skipped``) the local fields whose channel files disagree in size (from the TIFF
    headers), or, with ``headers=False`` (``--no-verify``), whose files are empty: both used to be listed
    as fine and fail only when a run read them.  One ``stat`` / header per file; S3 fields are left to
    the fetch.  All fields bad -> DataError."""
    import os

    import numpy as np

    from dinocell.data.decode import image_shape
    from dinocell.data.field import take_records
    from dinocell.errors import DataError

    bad: list[str] = []
    good: list[int] = []
    for i, rec in enumerate(source.records):
        local = [(c, p) for c in source.channels if (p := rec.channels.get(c)) and "://" not in p]
        why = None
        if headers:
            shapes = {c: image_shape(p) for c, p in local}
            sizes = {s for s in shapes.values() if s is not None}
            if len(sizes) > 1:
                why = "channels of different sizes: " + ", ".join(
                    f"{c} {'x'.join(map(str, s))}" for c, s in shapes.items() if s is not None)
        else:
            empty = [os.path.basename(p) for _, p in local if os.path.isfile(p) and os.path.getsize(p) == 0]
            if empty:
                why = f"{empty[0]}: empty file (0 bytes)"
        if why:
            bad.append(f"{rec.key}: {why}")
        else:
            good.append(i)
    if bad and not good:
        raise DataError(f"no usable field in {getattr(source, 'name', 'the source')}: {bad[0]}")
    if bad:
        source.records = take_records(source.records, np.asarray(good, dtype=np.int64))
        source.skipped.extend(bad)
    return bad


def format_channel_map(info: dict[str, Any]) -> str:
    """``1 -> Mito, 2 -> AGP, ... (origin)``, or how the channels are named when there is no map."""
    cmap = info.get("channel_map")
    if cmap is None:
        return "named by the source itself (file pattern or synthetic; no channel-number map)"
    if not cmap:
        return f"named by the table's FileName_Orig<Name> columns ({info.get('channel_map_origin')})"
    return ", ".join(f"{k} -> {v}" for k, v in cmap.items()) + f" ({info.get('channel_map_origin')})"


def format_listing(info: dict[str, Any]) -> str:
    """Human-readable summary of a source."""
    lines = [
        f"source:   {info['source']}",
        f"fields:   {info['fields']}",
        f"channels: {', '.join(info['channels'])}"
        + (f"  (fluorescent: {', '.join(info['fluorescent'])})" if info.get("fluorescent") else ""),
        f"plates:   {', '.join(info['plates'][:10])}" + (" ..." if len(info["plates"]) > 10 else ""),
        f"wells:    {info['wells']}",
        f"channel map: {format_channel_map(info)}",
        *([f"  ch{n} -> {c}" for c, n in sorted(info["channel_numbers"].items(), key=lambda kv: kv[1])]
          if info.get("channel_numbers") else []),
        f"illum:    {info.get('illum') or 'no load_data table'}",
        f"scaling:  {info.get('scaling')}",
        f"skipped:  {len(info['skipped'])}",
    ]
    lines += [f"  - {s}" for s in info["skipped"][:20]]
    return "\n".join(lines)


def _synth(args: argparse.Namespace) -> int:
    from dinocell.data.synthetic import write_jump_folder
    from dinocell.errors import UserError

    check_output_dir(args.out)
    if args.fields < 1 or args.size < 16:
        raise UserError("--fields must be >= 1 and --size >= 16")
    paths = write_jump_folder(args.out, n_fields=args.fields, size=args.size, seed=args.seed,
                              n_plates=args.plates, progress=True, masks=not args.no_masks)
    masks = "" if args.no_masks else " + nuclei/cells instance masks"
    print(f"wrote {len(paths)} TIFFs ({args.fields} fields x 5 channels, {args.size}px){masks} to {args.out}")
    return 0
