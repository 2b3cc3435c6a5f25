"""Benchmark S3 streaming against a local S3 server behind a loopback proxy with S3-like latency.

    python benchmarks/bench_s3.py [--quick] [--latency-ms 30] [--fields N] [--size PX]

Measures (all traffic on 127.0.0.1; moto and the latency proxy run in their own processes):

* fields/s of ``S3FieldSource.iter_loaded`` (``max_in_flight`` concurrent GETs) against one-at-a-time
  boto3 GETs doing the same decode + scaling work;
* samples/s of the training stream with ``repeats`` 1 and 4 (multi-view augmentation included);
* peak RSS growth of a fresh process streaming every field with a decoded-field cache smaller than
  the data, against the configured memory budget (cache + one batch of fields + fields in flight): it must
  stay within +10%.

The last line is ``P3 ratio=<concurrent / sequential fields/s> target>=4``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "data"))  # s3_fixtures: moto server + loopback proxy

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
BUCKET = "cellpainting-bench"
PREFIX = "cpg0016-jump/source_4/images/bench/images/"


# -------------------------------------------------------------------------------------------------
# Server processes
# -------------------------------------------------------------------------------------------------


def _serve_moto(q: Any, stop: Any) -> None:
    from s3_fixtures import start_moto

    server, url = start_moto()
    q.put(url)
    stop.wait()
    server.stop()


def _serve_proxy(upstream: str, latency_s: float, q: Any, stop: Any) -> None:
    from s3_fixtures import FaultProxy

    proxy = FaultProxy(upstream, latency_s=latency_s).start()
    q.put(proxy.url)
    stop.wait()
    proxy.stop()


def _start(ctx: Any, target: Any, *args: Any) -> tuple[Any, Any, str]:
    q, stop = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=target, args=(*args, q, stop), daemon=True)
    p.start()
    return p, stop, q.get(timeout=120)


# -------------------------------------------------------------------------------------------------
# Measurements
# -------------------------------------------------------------------------------------------------


def _cfg(endpoint: str, index: Path, *extra: str) -> Any:
    from dinocell.config import load_config

    return load_config(None, [f"data.s3.endpoint_url={endpoint}", f"data.s3.index_cache={index}", *extra]).data


def sequential_fields_per_s(endpoint: str, index: Path, n: int) -> float:
    """One GET at a time with a plain boto3 client; same decode + scaling as the streaming path."""
    import numpy as np

    from dinocell.data.decode import read_image, scale_field
    from dinocell.data.s3 import S3FieldSource, make_client, parse_s3_uri

    data_cfg = _cfg(endpoint, index)
    src = S3FieldSource(f"s3://{BUCKET}/{PREFIX}", data_cfg)
    client, _ = make_client(data_cfg.s3)
    t0 = time.perf_counter()
    for rec in src.records[:n]:
        planes = []
        for ch in src.channels:
            b, k = parse_s3_uri(rec.channels[ch])
            planes.append(read_image(client.get_object(Bucket=b, Key=k)["Body"].read()))
        scale_field(np.stack(planes), data_cfg.scaling)
    dt = time.perf_counter() - t0
    src.close()
    return n / dt


def concurrent_fields_per_s(endpoint: str, index: Path, max_in_flight: int) -> tuple[float, dict[str, float]]:
    from dinocell.data.s3 import S3FieldSource

    src = S3FieldSource(f"s3://{BUCKET}/{PREFIX}",
                        _cfg(endpoint, index, "data.s3.cache_bytes=0", f"data.s3.max_in_flight={max_in_flight}"))
    t0 = time.perf_counter()
    n = sum(1 for _, a in src.iter_loaded(src.records) if a is not None)
    dt = time.perf_counter() - t0
    metrics = src.metrics()
    src.close()
    return n / dt, metrics


def _epoch_loader(src: Any, views: Any, repeats: int, batch: int) -> Any:
    """One epoch of the training stream (in process) whose LRU holds one batch's fields."""
    from dinocell.data.stream import FieldDataset, StreamLoader, StreamSampler

    spe = max(batch, len(src) * repeats // batch * batch)
    ds = FieldDataset(src, views, repeats=repeats, seed=0, cache_bytes=0, cache_fields=batch)
    sampler = StreamSampler(len(src), repeats, spe, spe, seed=0, batch_size=batch)
    return StreamLoader(ds, batch_size=batch, sampler=sampler, drop_last=True, collate_fn=lambda s: s)


def stream_samples_per_s(endpoint: str, index: Path, repeats: int, max_in_flight: int) -> tuple[float, float]:
    from dinocell.config import ViewsConfig
    from dinocell.data.s3 import S3FieldSource
    from dinocell.data.views import MultiViewAugmentation

    src = S3FieldSource(f"s3://{BUCKET}/{PREFIX}",
                        _cfg(endpoint, index, "data.s3.cache_bytes=0", f"data.s3.max_in_flight={max_in_flight}"))
    views = MultiViewAugmentation(ViewsConfig(global_crop_size=64, local_crop_size=32, n_local_crops=2),
                                  src.fluorescent)
    t0 = time.perf_counter()
    n = sum(len(b) for b in _epoch_loader(src, views, repeats, batch=16))
    dt = time.perf_counter() - t0
    src.close()
    return n / dt, len(src) / dt


def _rss_child(endpoint: str, index: str, cache_bytes: int, buffer: int, max_in_flight: int, q: Any) -> None:
    """In a fresh process: stream every field with a small cache, sampling RSS every 5 ms."""
    import psutil

    from dinocell.data.s3 import S3FieldSource

    proc = psutil.Process()
    src = S3FieldSource(f"s3://{BUCKET}/{PREFIX}",
                        _cfg(endpoint, Path(index), f"data.s3.cache_bytes={cache_bytes}",
                             f"data.s3.max_in_flight={max_in_flight}"))
    # Warm up imports, clients and thread pools on two fields, then drop them from the cache.
    list(src.iter_loaded(src.records[:2]))
    src._state().lru = type(src._state().lru)(cache_bytes)
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    field_bytes = 0
    for b in _epoch_loader(src, None, 1, batch=buffer):
        field_bytes = b[-1]["image"].numel() * 4
    done.set()
    t.join()
    n_ch = len(src.channels)
    window = max(2, 2 * -(-max_in_flight // n_ch))
    q.put({"base": base, "peak": peak[0], "field_bytes": field_bytes, "window": window,
           "cache_used": src._state().lru.nbytes})


def rss_check(ctx: Any, endpoint: str, index: Path, cache_bytes: int, buffer: int,
              max_in_flight: int) -> dict[str, Any]:
    q = ctx.Queue()
    p = ctx.Process(target=_rss_child, args=(endpoint, str(index), cache_bytes, buffer, max_in_flight, q))
    p.start()
    out = q.get(timeout=1800)
    p.join()
    # The pipeline's declared memory: the decoded cache, one batch of fields and the fields being
    # fetched/decoded (their uint16 planes plus the float32 result).
    fb = out["field_bytes"]
    out["budget"] = cache_bytes + buffer * fb + out["window"] * int(fb * 1.5)
    out["growth"] = out["peak"] - out["base"]
    return out


# -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (~1 min)")
    ap.add_argument("--smoke", action="store_true",
                    help="every code path in seconds (8 small fields; exit 0 whatever the ratio)")
    ap.add_argument("--latency-ms", type=float, default=30.0, help="first-byte latency per request")
    ap.add_argument("--fields", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="field size in pixels")
    ap.add_argument("--max-in-flight", type=int, default=16)
    args = ap.parse_args(argv)
    n_fields = args.fields or (8 if args.smoke else 40 if args.quick else 160)
    size = args.size or (128 if args.smoke else 256 if args.quick else 540)
    n_seq = min(n_fields, 4 if args.smoke else 8 if args.quick else 24)

    from s3_fixtures import admin_client, make_public_bucket, upload_tree

    from dinocell.data.synthetic import write_jump_folder

    ctx = mp.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="dinocell-bench-s3-"))
    procs = []
    try:
        t0 = time.perf_counter()
        write_jump_folder(tmp / "jump", n_fields=n_fields, size=size, seed=0, n_plates=2,
                          wells_per_plate=max(4, -(-n_fields // 8)), sites_per_well=4, workers=2)
        moto_p, moto_stop, moto_url = _start(ctx, _serve_moto)
        procs.append((moto_p, moto_stop))
        admin = admin_client(moto_url)
        make_public_bucket(admin, BUCKET)
        keys = upload_tree(admin, BUCKET, PREFIX, tmp / "jump")
        obj_bytes = sum(p.stat().st_size for p in (tmp / "jump").rglob("*.tiff"))
        proxy_p, proxy_stop, endpoint = _start(ctx, _serve_proxy, moto_url, args.latency_ms / 1000.0)
        procs.append((proxy_p, proxy_stop))
        index = tmp / "index.parquet"
        setup_s = time.perf_counter() - t0

        seq = sequential_fields_per_s(endpoint, index, n_seq)
        conc, m = concurrent_fields_per_s(endpoint, index, args.max_in_flight)
        s1, f1 = stream_samples_per_s(endpoint, index, 1, args.max_in_flight)
        s4, f4 = stream_samples_per_s(endpoint, index, 4, args.max_in_flight)
        field_mb = 5 * size * size * 4 / 1e6
        cache = int(max(4, n_fields // 4) * 5 * size * size * 4)  # a quarter of the decoded data
        rss = rss_check(ctx, endpoint, index, cache, 8, args.max_in_flight)
    finally:
        for p, stop in procs:
            stop.set()
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    ratio = conc / seq
    mb = 1024 * 1024
    rss_ratio = rss["growth"] / rss["budget"]
    rows = [
        ("setup", f"{n_fields} fields x 5 ch, {size}px LZW ({obj_bytes / len(keys) / 1e3:.0f} kB/object), "
                  f"latency {args.latency_ms:.0f} ms, {setup_s:.0f} s"),
        ("sequential boto3 GETs", f"{seq:8.2f} fields/s  ({n_seq} fields)"),
        (f"concurrent ({args.max_in_flight} in flight)", f"{conc:8.2f} fields/s  "
         f"({m['s3/bandwidth_mbps']:.0f} Mbit/s, {m['s3/requests']:.0f} GETs, {m['s3/retries']:.0f} retries)"),
        ("stream repeats=1", f"{s1:8.2f} samples/s  ({f1:.2f} fields/s)"),
        ("stream repeats=4", f"{s4:8.2f} samples/s  ({f4:.2f} fields/s)"),
        ("peak RSS growth", f"{rss['growth'] / mb:8.1f} MiB  (cache {cache / mb:.1f} MiB + batch 8 + "
                            f"{rss['window']} in flight x {field_mb:.2f} MB = budget {rss['budget'] / mb:.1f} MiB; "
                            f"cache held {rss['cache_used'] / mb:.1f} MiB)"),
        ("RSS / budget", f"{rss_ratio:8.2f}  ({'PASS' if rss_ratio <= 1.10 else 'FAIL'}: must be <= 1.10)"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}} | result")
    print(f"{'-' * width}-+-{'-' * 60}")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")
    print(f"P3 ratio={ratio:.2f} target>=4")
    return 0 if args.smoke or (ratio >= 4 and rss_ratio <= 1.10) else 1


if __name__ == "__main__":
    sys.exit(main())
