"""P2: multi-view samples/s from local 1080x1080 5-channel 16-bit LZW TIFF fields vs the decode-only
rate of the same fields (repeats=1), and vs a naive pipeline that redoes scaling + CLAHE on the full
image for every crop.

    python benchmarks/bench_views.py [--quick] [--fields N] [--size PX] [--clahe]

Last line: ``P2 ratio=<samples/s / decode fields/s> target>=0.6``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dinocell.config import load_config
from dinocell.data.decode import clahe, percentile_scale, read_image
from dinocell.data.sources import FieldDataset, open_source
from dinocell.data.synthetic import write_jump_folder
from dinocell.data.views import MultiViewAugmentation


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def decode_only(source, n: int) -> float:
    t0 = time.perf_counter()
    for rec in source.records[:n]:
        for ch in source.channels:
            read_image(rec.channels[ch])
    return _rate(n, time.perf_counter() - t0)


def multiview(source, aug: MultiViewAugmentation, n: int) -> float:
    ds = FieldDataset(source, aug, repeats=1)
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return _rate(n, time.perf_counter() - t0)


def naive(source, aug: MultiViewAugmentation, n: int, cfg) -> float:
    """The seed's approach: scale + CLAHE the full-resolution field again for every crop."""
    n_crops = 2 + cfg.data.views.n_local_crops
    t0 = time.perf_counter()
    for rec in source.records[:n]:
        raw = source.load_raw(rec)
        for _ in range(n_crops):
            scaled = np.stack([clahe(percentile_scale(raw[c], 0.1, 99.9)) for c in range(raw.shape[0])])
            aug(torch.from_numpy(scaled))  # one sample's worth of work per crop, as the seed did
    return _rate(n, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer fields")
    ap.add_argument("--smoke", action="store_true", help="every code path in seconds (2 small fields)")
    ap.add_argument("--fields", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="field side in px (default 1080; --smoke 256)")
    ap.add_argument("--clahe", action="store_true", help="CLAHE on in the dinocell pipeline too")
    ap.add_argument("--data", default=None, help="existing JUMP folder (default: write synthetic fields)")
    args = ap.parse_args(argv)
    n = args.fields or (2 if args.smoke else 4 if args.quick else 16)
    args.size = args.size or (256 if args.smoke else 1080)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data) if args.data else Path(tmp) / "jump"
        if not args.data:
            write_jump_folder(folder, n_fields=n, size=args.size, seed=0)
        cfg = load_config(None, [f"data.scaling.clahe={str(args.clahe).lower()}"])
        source = open_source(cfg.data, str(folder))
        n = min(n, len(source))
        aug = MultiViewAugmentation(cfg.data.views, source.fluorescent)
        decode_only(source, 1)  # warm caches and imports
        dec = decode_only(source, n)
        mv = multiview(source, aug, n)
        nv = naive(source, aug, max(1, n // 4), cfg)

    rows = [("decode only (5 TIFFs/field)", dec, "fields/s"),
            ("dinocell multi-view (decode+scale+10 crops)", mv, "samples/s"),
            ("naive: CLAHE+scale per crop", nv, "samples/s")]
    print(f"{'pipeline':<46} {'rate':>10}  unit    ({n} fields, {args.size}px, 5 channels, 1 thread)")
    for name, rate, unit in rows:
        print(f"{name:<46} {rate:>10.2f}  {unit}")
    print(f"speed-up over naive: {mv / nv:.1f}x")
    print(f"P2 ratio={mv / dec:.3f} target>=0.6")


if __name__ == "__main__":
    main()
