"""Benchmark the field index at JUMP scale: grouping, write, warm start, epoch order, resume, listing.

    python benchmarks/bench_index.py [--quick] [--sizes 1e4,1e5,1e6,3e6] [--latency-ms 30]

Synthetic keys in the cpg0016 layout (384-well plates x 9 sites x 5 channels, 17,280 keys per plate
folder) go through the real code: ``jump.add_phenix_folder`` per plate folder -> ``write_index`` ->
``read_index`` in a fresh process (time and RSS growth per field; baseline ``pyarrow.parquet.read_table``
of the same file in the same process) -> the epoch's order and shards for 8 ranks x 8 workers -> the
first sample after a mid-epoch resume.  Then a listing of a moto S3 server behind a 30 ms latency
proxy: the concurrent plate-folder listing vs one ``list_objects_v2`` page at a time.

Prints a table and the lines P7 (warm start / read_table), P8 (RSS bytes per field after warm start),
P9 (concurrent / sequential listing keys/s), P10 (growth exponent of warm-start time).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "data"))  # s3_fixtures: moto server + loopback proxy
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
warnings.filterwarnings("ignore", message="This DataLoader will create")

FIELDS_PER_PLATE = 384 * 9
PREFIX = "cpg0016-jump/source_4/images/2021_04_26_Batch1/images/"


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def plate_names(p: int) -> list[str]:
    """The 17,280 image names of one 384-well plate folder (9 sites x 5 channels)."""
    from dinocell.data.field import format_name

    return [format_name(r, c, s, ch) for r in range(1, 17) for c in range(1, 25) for s in range(1, 10)
            for ch in range(1, 6)]


def build(n_plates: int) -> tuple[Any, float, int]:
    """Group every plate folder's names into an index; returns (index, seconds, RSS growth)."""
    from dinocell.data import jump
    from dinocell.data.index import IndexBuilder

    names = plate_names(0)  # the same names in every folder; each folder is grouped separately
    cmap = jump.channel_map("source_4")
    r0 = rss()
    t0 = time.perf_counter()
    b = IndexBuilder(naming={})
    for p in range(n_plates):
        folder = f"s3://cellpainting-gallery/{PREFIX}BR{p:06d}__2021-05-02T16_02_51-Measurement1/Images/"
        jump.add_phenix_folder(b, folder, f"BR{p:06d}", names, cmap,
                               {"Metadata_Project": "cpg0016-jump", "Metadata_Source": "source_4",
                                "Metadata_Batch": "2021_04_26_Batch1"})
    idx = b.build()
    return idx, time.perf_counter() - t0, rss() - r0


WARM = """
import json, os, sys, tempfile, time, gc
import psutil, pyarrow as pa, pyarrow.parquet as pq
from dinocell.data.index import read_index
proc = psutil.Process()
path = sys.argv[1]
# Warm-up that favours neither reader: pyarrow's lazy imports (a tiny other file) and the page cache.
tiny = os.path.join(tempfile.mkdtemp(), "t.parquet"); pq.write_table(pa.table({"a": [1]}), tiny); pq.read_table(tiny)
open(path, "rb").read()
gc.collect()
base = proc.memory_info().rss
t0 = time.perf_counter(); idx, info = read_index(path); t_warm = time.perf_counter() - t0
gc.collect()
grow = proc.memory_info().rss - base
rec = idx[len(idx) // 2]
t0 = time.perf_counter(); t = pq.read_table(path); t_arrow = time.perf_counter() - t0
print(json.dumps({"warm": t_warm, "arrow": t_arrow, "rss": grow, "n": len(idx), "nbytes": idx.nbytes}))
"""


def warm_start(path: Path) -> dict[str, float]:
    """``read_index`` in a fresh process (RSS measured there), against ``read_table`` of the file."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", WARM, str(path)], capture_output=True, text=True, env=env,
                         timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])



def epoch_and_resume(idx: Any) -> tuple[float, float]:
    """(seconds for the epoch order and the 64 shards of 8 ranks x 8 workers, seconds from a resume in
    the middle of the epoch to the first batch of 8 forked DataLoader workers of rank 3)."""
    from dinocell.data.local import IndexSource
    from dinocell.data.stream import StreamingFieldDataset

    class Source(IndexSource):
        def load_raw(self, rec: Any) -> np.ndarray:
            return np.zeros((len(self.channels), 8, 8), np.uint16)

    src = Source(idx, None, "bench")
    ds = StreamingFieldDataset(src, None, repeats=1, shuffle_buffer=64, seed=0, rank=3, world_size=8)
    t0 = time.perf_counter()
    shards = [ds.shard(0, r, 8, w, 8) for r in range(8) for w in range(8)]
    t_epoch = time.perf_counter() - t0
    assert sum(len(s) for s in shards) == len(idx)
    batch = 8
    loader = ds.make_loader(batch_size=batch, num_workers=8, multiprocessing_context="fork")
    quota = ds.fields_per_worker(8, 8)
    half = (quota // 2 // batch) * batch * 8  # a batch boundary in the middle of the epoch
    t0 = time.perf_counter()
    loader.load_state_dict({"epoch": 0, "samples_yielded": half, "num_workers": 8, "batch_size": batch,
                            "seed": 0, "repeats": 1, "n_fields": len(src)})
    it = iter(loader)
    next(it)
    t_resume = time.perf_counter() - t0
    del it
    return t_epoch, t_resume


# -------------------------------------------------------------------------------------------------
# Listing against moto behind the latency proxy
# -------------------------------------------------------------------------------------------------


def _serve(latency_s: float, n_plates: int, keys_per_plate: int, q: Any, stop: Any) -> None:
    """moto + the latency proxy in one process; keys are created through moto's backend (fast)."""
    from moto.s3.models import s3_backends
    from s3_fixtures import FaultProxy, admin_client, make_public_bucket, start_moto

    server, url = start_moto()
    make_public_bucket(admin_client(url), "bench")
    backend = s3_backends["123456789012"]["aws"]
    names = plate_names(0)[:keys_per_plate]
    for p in range(n_plates):
        folder = f"{PREFIX}BR{p:06d}__2021-05-02T16_02_51-Measurement1/Images/"
        for n in names:
            backend.put_object("bench", folder + n, b"")
    proxy = FaultProxy(url, latency_s=latency_s).start()
    q.put(proxy.url)
    stop.wait()
    proxy.stop()
    server.stop()


def listing(latency_ms: float, n_plates: int, keys_per_plate: int, workers: int) -> tuple[float, float, int]:
    """(sequential keys/s, concurrent keys/s, keys)."""
    from dinocell.config import load_config
    from dinocell.data.s3.config import make_client
    from dinocell.data.s3.discovery import Lister

    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_serve, args=(latency_ms / 1000.0, n_plates, keys_per_plate, q, stop), daemon=True)
    p.start()
    try:
        url = q.get(timeout=600)
        cfg = load_config(None, [f"data.s3.endpoint_url={url}"]).data.s3
        client, attempts = make_client(cfg, pool=workers)
        t0 = time.perf_counter()
        seq = 0
        token = None
        while True:  # one page at a time, the whole prefix
            kw: dict[str, Any] = {"Bucket": "bench", "Prefix": PREFIX}
            if token:
                kw["ContinuationToken"] = token
            page = client.list_objects_v2(**kw)
            seq += len(page.get("Contents", []))
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        t_seq = time.perf_counter() - t0
        got = [0]
        lister = Lister(client, attempts, "bench", workers)
        t0 = time.perf_counter()
        lister.walk(PREFIX, None, lambda keys: got.__setitem__(0, got[0] + len(keys)))
        t_conc = time.perf_counter() - t0
        assert got[0] == seq == n_plates * keys_per_plate, (got, seq)
        return seq / t_seq, got[0] / t_conc, seq
    finally:
        stop.set()
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None, help="comma-separated field counts (default 1e4,1e5[,1e6,3e6])")
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--list-plates", type=int, default=None)
    ap.add_argument("--list-workers", type=int, default=32)
    args = ap.parse_args()
    sizes = [int(float(s)) for s in (args.sizes or ("1e4,1e5" if args.quick else "1e4,1e5,1e6,3e6")).split(",")]
    from dinocell.data.index import write_index

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="dinocell-bench-index-"))
    for n in sizes:
        n_plates = max(1, round(n / FIELDS_PER_PLATE))
        idx, t_group, rss_group = build(n_plates)
        path = tmp / f"index-{n}.parquet"
        t0 = time.perf_counter()
        write_index(path, idx, {"ident": {"bench": n}})
        t_write = time.perf_counter() - t0
        w = warm_start(path)
        t_epoch, t_resume = epoch_and_resume(idx)
        rows.append({"n": len(idx), "plates": n_plates, "group": t_group, "group_rss": rss_group,
                     "write": t_write, "mb": path.stat().st_size / 1e6, **w, "epoch": t_epoch,
                     "resume": t_resume})
        del idx
        path.unlink()
        print(f"... {rows[-1]['n']} fields done", file=sys.stderr, flush=True)
    n_list = args.list_plates or (32 if args.quick else 64)
    seq_kps, conc_kps, n_keys = listing(args.latency_ms, n_list, 2000, args.list_workers)

    print("| fields | plates | group s | group RSS B/field | write s | file MB | read_table s | warm start s "
          "| warm RSS B/field | epoch order 8x8 s | first sample after resume s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['plates']} | {r['group']:.2f} | {r['group_rss'] / r['n']:.0f} | {r['write']:.2f} "
              f"| {r['mb']:.2f} | {r['arrow']:.3f} | {r['warm']:.3f} | {r['rss'] / r['n']:.0f} | {r['epoch']:.3f} "
              f"| {r['resume']:.3f} |")
    print(f"\nlisting {n_keys:,} keys in {n_list} plate folders, {args.latency_ms:.0f} ms latency: one page at a "
          f"time {seq_kps:,.0f} keys/s, concurrent ({args.list_workers} threads) {conc_kps:,.0f} keys/s")
    big, small = rows[-1], rows[0]
    p7 = big["warm"] / max(big["arrow"], 1e-9)
    p8 = big["rss"] / big["n"]
    p9 = conc_kps / seq_kps
    p10 = math.log(big["warm"] / small["warm"]) / math.log(big["n"] / small["n"]) if len(rows) > 1 else float("nan")
    per_field_s = big["group"] / big["n"]
    print(f"projection to 3M fields: grouping {per_field_s * 3e6:.0f} s, index {big['mb'] / big['n'] * 3e6:.0f} MB "
          f"on disk, warm start ~{big['warm'] * (3e6 / big['n']) ** max(p10, 1.0):.1f} s, "
          f"{p8 * 3e6 / 1e6:.0f} MB resident")
    print(f"P7 ratio={p7:.2f} target<=3")
    print(f"P8 ratio={p8:.1f} target<=100")
    print(f"P9 ratio={p9:.2f} target>=8")
    print(f"P10 ratio={p10:.2f} target<=1.1")
    return 0 if p7 <= 3 and p8 <= 100 and p9 >= 8 and p10 <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
