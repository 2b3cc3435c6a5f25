"""Streaming dataset: sharding, shuffle buffer, repeats, determinism, resume -- local and over S3."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from s3_fixtures import FaultProxy, JumpBucket

from dinocell.config import load_config
from dinocell.data.field import FieldRecord
from dinocell.data.s3 import S3FieldSource, parse_s3_uri
from dinocell.data.sources import FieldSource
from dinocell.data.stream import (
    _EMIT,
    _ENTER,
    StreamingFieldDataset,
    buffer_plan,
    field_stream,
    worker_offsets,
)
from dinocell.errors import ConfigError, DataError


class ListSource(FieldSource):
    """Field ``i`` is a 2-channel 4x4 image filled with ``i``; ``bad`` fields fail to load."""

    def __init__(self, n: int, bad: tuple[int, ...] = ()) -> None:
        super().__init__(scaling=None)
        self.name = "list"
        self.channels = ["DNA", "RNA"]
        self.fluorescent = [True, True]
        self.records = [FieldRecord("P1", f"A{i:02d}", 1, metadata={"label": str(i % 3)}) for i in range(n)]
        self.bad = set(bad)
        self.loads: Counter[int] = Counter()
        self._lock = threading.Lock()

    def load_raw(self, rec: FieldRecord) -> np.ndarray:
        i = self.records.index(rec)
        with self._lock:
            self.loads[i] += 1
        if i in self.bad:
            raise DataError(f"field {i} is corrupt")
        return np.full((2, 4, 4), i, dtype=np.uint16)


def noisy(x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
    """A transform that consumes randomness, so augmentation seeds are checked too."""
    return {"image": x, "noise": torch.rand(3, generator=generator)}


def value(sample: dict[str, Any]) -> int:
    return int(round(float(sample["image"][0, 0, 0]) * 65535))


def run(ds: StreamingFieldDataset, limit: int | None = None) -> list[dict[str, Any]]:
    out = []
    for s in ds:
        out.append(s)
        if limit is not None and len(out) == limit:
            break
    return out


def signature(samples: list[dict[str, Any]]) -> list[tuple[int, tuple[float, ...]]]:
    return [(int(s["index"]), tuple(s["noise"].tolist())) for s in samples]


# -------------------------------------------------------------------------------------------------
# Pure pieces
# -------------------------------------------------------------------------------------------------


def test_buffer_plan_emits_each_item_repeats_times_within_the_buffer() -> None:
    events = list(buffer_plan(10, 3, 2, np.random.default_rng(0)))
    entered = [i for ev, i in events if ev == _ENTER]
    emits = Counter(i for ev, i in events if ev == _EMIT)
    assert entered == list(range(10)) and emits == {i: 2 for i in range(10)}
    live: set[int] = set()
    done: Counter[int] = Counter()
    for ev, i in events:
        if ev == _ENTER:
            live.add(i)
            assert len(live) <= 3
        else:
            assert i in live
            done[i] += 1
            if done[i] == 2:
                live.remove(i)
    assert events == list(buffer_plan(10, 3, 2, np.random.default_rng(0)))
    assert events != list(buffer_plan(10, 3, 2, np.random.default_rng(1)))
    order = [i for ev, i in events if ev == _EMIT]
    assert order != sorted(order)  # repeats are spread, not back to back


def test_worker_offsets_follow_dataloader_round_robin() -> None:
    # 2 workers, batch 4, 10 samples each: batches w0:4 w1:4 w0:4 w1:4 w0:2 w1:2
    assert worker_offsets(0, 2, 4, 10) == [0, 0]
    assert worker_offsets(4, 2, 4, 10) == [4, 0]
    assert worker_offsets(8, 2, 4, 10) == [4, 4]
    assert worker_offsets(12, 2, 4, 10) == [8, 4]
    assert worker_offsets(18, 2, 4, 10) == [10, 8]
    assert worker_offsets(20, 2, 4, 10) == [10, 10]
    with pytest.raises(DataError, match="not on a batch boundary"):
        worker_offsets(6, 2, 4, 10)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="repeats must be >= 1"):
        StreamingFieldDataset(ListSource(3), repeats=0)
    with pytest.raises(ConfigError, match="shuffle_buffer must be >= 1"):
        StreamingFieldDataset(ListSource(3), shuffle_buffer=0)
    with pytest.raises(DataError, match="has no fields"):
        StreamingFieldDataset(ListSource(0))


# -------------------------------------------------------------------------------------------------
# In-process streaming
# -------------------------------------------------------------------------------------------------


def test_every_field_once_per_epoch_with_repeats_and_determinism() -> None:
    src = ListSource(10)
    ds = StreamingFieldDataset(src, noisy, repeats=3, shuffle_buffer=4, seed=7)
    assert len(ds) == 30
    a = run(ds)
    assert Counter(int(s["index"]) for s in a) == {i: 3 for i in range(10)}
    assert all(value(s) == s["index"] for s in a) and all(s["label"] == s["index"] % 3 for s in a)
    assert src.loads == {i: 1 for i in range(10)}  # each field read once, 3 samples drawn from it
    assert ds.epoch == 1 and ds.position == 0
    b = run(ds)  # epoch 1: another order
    assert Counter(int(s["index"]) for s in b) == {i: 3 for i in range(10)}
    assert signature(a) != signature(b)
    again = StreamingFieldDataset(ListSource(10), noisy, repeats=3, shuffle_buffer=4, seed=7)
    assert signature(run(again)) == signature(a)
    other_seed = StreamingFieldDataset(ListSource(10), noisy, repeats=3, shuffle_buffer=4, seed=8)
    assert signature(run(other_seed)) != signature(a)
    assert ds.metrics()["stream/samples"] == 60


def test_ddp_ranks_split_fields_and_yield_equal_counts() -> None:
    n, world = 10, 3
    per_rank = []
    for rank in range(world):
        src = ListSource(n)
        ds = StreamingFieldDataset(src, None, repeats=2, shuffle_buffer=3, seed=1, rank=rank, world_size=world)
        samples = run(ds)
        per_rank.append((samples, set(src.loads)))
        assert len(samples) == len(ds) == 4 * 2  # ceil(10 / 3) fields x 2 repeats on every rank
        assert all(v == 1 for v in src.loads.values())
    loaded = [f for _, f in per_rank]
    assert set.union(*loaded) == set(range(n))
    assert sum(len(f) for f in loaded) == n  # disjoint: no field read twice per epoch
    for samples, fields in per_rank:
        assert {int(s["index"]) for s in samples} == fields  # padding re-uses the rank's own fields


def test_bad_fields_are_skipped_counted_and_replaced() -> None:
    src = ListSource(10, bad=(2, 5))
    ds = StreamingFieldDataset(src, None, repeats=2, shuffle_buffer=3, seed=0)
    samples = run(ds)
    got = Counter(int(s["index"]) for s in samples)
    assert len(samples) == 20  # the quota holds, so DDP ranks stay in step
    assert 2 not in got and 5 not in got
    assert all(got[i] >= 2 for i in range(10) if i not in (2, 5))
    assert src.loads == {i: 1 for i in range(10)}
    m = ds.metrics()
    assert m["stream/skipped"] == 2 and m["stream/substituted"] == 4 and m["stream/fields"] == 10


def test_threaded_prefetch_matches_synchronous_loading() -> None:
    a = run(StreamingFieldDataset(ListSource(9), noisy, repeats=2, shuffle_buffer=2, seed=3, prefetch=0))
    b = run(StreamingFieldDataset(ListSource(9), noisy, repeats=2, shuffle_buffer=2, seed=3, prefetch=4))
    assert signature(a) == signature(b)
    assert [k for k, _ in field_stream(ListSource(3), ListSource(3).records, prefetch=2)] == ListSource(3).records


@pytest.mark.parametrize("bad", [(), (0, 4)])
def test_resume_anywhere_is_identical_and_fetches_only_what_is_left(bad: tuple[int, ...]) -> None:
    kw: dict[str, Any] = {"repeats": 2, "shuffle_buffer": 2, "seed": 5, "rank": 1, "world_size": 2}
    full = run(StreamingFieldDataset(ListSource(7, bad), noisy, **kw))  # rank 1: 3 fields + 1 padding
    assert len(full) == 8
    for k in range(len(full)):
        first = StreamingFieldDataset(ListSource(7, bad), noisy, **kw)
        head = run(first, limit=k) if k else []
        state = first.state_dict()
        assert state["epoch"] == 0 and state["samples_yielded"] == k
        src = ListSource(7, bad)
        resumed = StreamingFieldDataset(src, noisy, **kw)
        resumed.load_state_dict(state)
        tail = run(resumed)
        assert signature(head + tail) == signature(full), f"resume at {k}"
        later = {int(s["index"]) for s in full[k:]}
        fetched = {i for i in src.loads if i not in bad}
        assert later <= fetched
        # fields whose samples were all consumed are not fetched (the fallback may re-read one)
        assert len(fetched - later) <= 1
        assert resumed.epoch == 1


def test_resume_mismatched_workers_restarts_epoch_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    ds = StreamingFieldDataset(ListSource(6), None, repeats=1, shuffle_buffer=2)
    ds.load_state_dict({"epoch": 2, "samples_yielded": 4, "num_workers": 3, "batch_size": 2})
    samples = run(ds)
    assert len(samples) == 6 and "restarts from its beginning" in caplog.text


# -------------------------------------------------------------------------------------------------
# DataLoader workers
# -------------------------------------------------------------------------------------------------


def test_dataloader_workers_shard_and_resume_exactly() -> None:
    kw: dict[str, Any] = {"repeats": 2, "shuffle_buffer": 3, "seed": 4}

    def batches(dl, limit=None):
        out = []
        for b in dl:
            out.append((b["index"].tolist(), b["noise"]))
            if limit is not None and len(out) == limit:
                break
        return out

    # 9 fields over 2 workers: 5 + 4 (+1 padding field), 10 samples each, batches of 3, 3, 3, 1.
    ds = StreamingFieldDataset(ListSource(9, bad=(6,)), noisy, **kw)
    dl = ds.make_loader(batch_size=3, num_workers=2)
    full = batches(dl)
    assert len(full) == len(dl) == 8
    got = Counter(i for idx, _ in full for i in idx)
    assert sum(got.values()) == 20 and set(got) == set(range(9)) - {6}
    assert ds.epoch == 1 and ds.position == 0
    for stop in (1, 3, 6, 7):  # stop, checkpoint, resume in a fresh dataset/loader
        ds2 = StreamingFieldDataset(ListSource(9, bad=(6,)), noisy, **kw)
        dl2 = ds2.make_loader(batch_size=3, num_workers=2)
        head = batches(dl2, limit=stop)
        state = dl2.state_dict()
        assert state["samples_yielded"] == sum(len(i) for i, _ in head) and state["epoch"] == 0
        ds3 = StreamingFieldDataset(ListSource(9, bad=(6,)), noisy, **kw)
        dl3 = ds3.make_loader(batch_size=3, num_workers=2)
        dl3.load_state_dict(state)
        joined = head + batches(dl3)
        assert [i for i, _ in joined] == [i for i, _ in full], f"resume after {stop} batches"
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(joined, full, strict=True))
        assert ds3.epoch == 1


def test_lookahead_batches_are_not_counted_as_consumed() -> None:
    ds = StreamingFieldDataset(ListSource(8), None, repeats=1, shuffle_buffer=2)
    dl = ds.make_loader(batch_size=2, lookahead_batches=1)
    it = iter(dl)
    next(it), next(it), next(it)  # a prefetching trainer has trained on 2 of these 3
    assert dl.state_dict()["samples_yielded"] == 4


# -------------------------------------------------------------------------------------------------
# Over S3
# -------------------------------------------------------------------------------------------------


def s3_source(jb: JumpBucket, endpoint: str, tmp_path: Path, uri: str | None = None, *extra: str) -> S3FieldSource:
    cfg = load_config(None, [f"data.s3.endpoint_url={endpoint}", f"data.s3.index_cache={tmp_path / 'idx.parquet'}",
                             *extra]).data
    return S3FieldSource(uri or jb.uri, cfg)


def test_s3_stream_survives_faults_exactly_once_per_epoch(
        jump_bucket: JumpBucket, proxy: FaultProxy, tmp_path: Path) -> None:
    prefix = f"stream-{uuid.uuid4().hex[:8]}/"
    for k in jump_bucket.keys:
        jump_bucket.admin.copy_object(Bucket=jump_bucket.bucket, Key=prefix + k[len(jump_bucket.prefix):],
                                      CopySource={"Bucket": jump_bucket.bucket, "Key": k})
    src = s3_source(jump_bucket, proxy.url, tmp_path, f"s3://{jump_bucket.bucket}/{prefix}",
                    "data.s3.cache_bytes=0", "data.s3.timeout_s=1.0", "data.s3.max_in_flight=4")
    recs = src.records
    admin = jump_bucket.admin
    admin.put_object(Bucket=jump_bucket.bucket, Key=parse_s3_uri(recs[3].channels["ER"])[1], Body=b"not a tiff")
    admin.delete_object(Bucket=jump_bucket.bucket, Key=parse_s3_uri(recs[8].channels["AGP"])[1])
    bad = {3, 8}
    proxy.slow_s = 2.5
    kinds = ["500", "503", "429", "reset", "truncate", "slow"]
    for i, r in enumerate(recs):
        if i not in bad:
            proxy.schedule["/" + "/".join(parse_s3_uri(r.channels["DNA"]))] = [kinds[i % len(kinds)]]
    ds = StreamingFieldDataset(src, None, repeats=2, shuffle_buffer=4, seed=0)

    def epoch() -> Counter[int]:
        proxy.served.clear()
        got = Counter(int(s["index"]) for s in ds)
        good_paths = ["/" + "/".join(parse_s3_uri(u)) for i, r in enumerate(recs) if i not in bad
                      for u in r.channels.values()]
        assert all(proxy.served[p] == 1 for p in good_paths), "each good object exactly once per epoch"
        return got

    got = epoch()
    assert set(got) == set(range(len(recs))) - bad and sum(got.values()) == 2 * len(recs)
    assert sum(proxy.injected.values()) == len(recs) - len(bad)
    m = ds.metrics()
    assert m["s3/skipped"] == 2 and m["stream/skipped"] == 2 and m["s3/retries"] >= len(recs) - 2
    got2 = epoch()  # epoch 1: fetched again (no cache), still once each
    assert set(got2) == set(got) and ds.epoch == 2


def test_s3_stream_with_workers_multiview_and_shared_metrics(jump_bucket: JumpBucket, proxy: FaultProxy,
                                                             tmp_path: Path) -> None:
    from dinocell.config import MaskConfig, ViewsConfig
    from dinocell.data.masking import collate_multiview
    from dinocell.data.views import MultiViewAugmentation

    src = s3_source(jump_bucket, proxy.url, tmp_path)
    views = MultiViewAugmentation(ViewsConfig(global_crop_size=32, local_crop_size=16, n_local_crops=2),
                                  src.fluorescent)
    ds = StreamingFieldDataset(src, views, repeats=2, shuffle_buffer=3, seed=0)

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_multiview(samples, MaskConfig(), patch_size=8, rng=0)

    proxy.reset_counts()
    dl = ds.make_loader(batch_size=4, num_workers=2, collate_fn=collate)
    seen: Counter[int] = Counter()
    n_batches = 0
    for batch in dl:
        n_batches += 1
        assert batch["global_crops"].shape[1:] == (1, 32, 32)
        assert batch["local_crops"].shape[1:] == (1, 16, 16)
        seen.update(batch["index"].tolist())
    assert n_batches == len(dl) == 6 and seen == {i: 2 for i in range(len(src))}
    assert all(v == 1 for v in proxy.served.values()) and len(proxy.served) == 5 * len(src)
    m = ds.metrics()  # read in the main process, written by the workers
    assert m["s3/fields"] == len(src) and m["s3/requests"] == 5 * len(src) and m["stream/samples"] == 24


def test_pretrain_two_steps_from_s3(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    """The trainer runs on an s3:// source served by the local server (the lead's pretrain entry point)."""
    from dinocell.train import run
    overrides = [
        f"data.source={jump_bucket.uri}", f"data.s3.endpoint_url={jump_bucket.endpoint_url}",
        f"data.s3.index_cache={tmp_path / 'idx.parquet'}",
        "model.name=vit_small_patch16_dinov3", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "model.patch_size=8", "data.views.global_crop_size=32", "data.views.local_crop_size=16",
        "data.views.n_local_crops=2", "head.prototypes=64", "head.hidden_dim=64", "head.bottleneck_dim=32",
        "data.batch_size=4", "track.logger=none", "train.progress_bar=false", "train.eval_fields=4",
        "train.accelerator=cpu", "train.devices=1",
    ]
    cfg = load_config(None, overrides)
    run.pretrain(cfg, str(tmp_path / "run"), max_steps=2, resume=False)
    ckpts = list((tmp_path / "run").rglob("*.ckpt"))
    assert ckpts, "the run wrote a checkpoint"
