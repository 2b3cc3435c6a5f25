"""The one training sample stream: order, seeding, cache, bad fields, workers -- local and over S3."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
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
from dinocell.data.stream import FieldDataset, StreamLoader, StreamSampler, SupportsPrefetch, load_fields
from dinocell.errors import DataError


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
        i = int(rec.well[1:])
        with self._lock:
            self.loads[i] += 1
        if i in self.bad:
            raise DataError(f"field {i} is corrupt")
        return np.full((2, 4, 4), i, dtype=np.uint16)


class PrefetchListSource(ListSource, SupportsPrefetch):
    """A ListSource that declares the remote capability: it records each ``iter_loaded`` call."""

    def __init__(self, n: int, bad: tuple[int, ...] = ()) -> None:
        super().__init__(n, bad)
        self.calls: list[list[int]] = []

    def iter_loaded(self, records: Iterable[FieldRecord], ordered: bool = True, window: int | None = None,
                    cache: bool = True) -> Iterator[tuple[FieldRecord, np.ndarray | None]]:
        recs = list(records)
        self.calls.append([int(r.well[1:]) for r in recs])
        for rec in recs:
            try:
                yield rec, self.load(rec)
            except DataError:
                yield rec, None

    def metrics(self) -> dict[str, float]:
        return {"s3/calls": float(len(self.calls))}


def noisy(x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
    """A transform that consumes randomness, so augmentation seeds are checked too."""
    return {"image": x, "noise": torch.rand(3, generator=generator)}


def value(sample: dict[str, Any]) -> int:
    return int(round(float(sample["image"][0, 0, 0]) * 65535))


def loader(src: FieldSource, n_fields: int, repeats: int, bs: int, workers: int = 0, epochs: int = 1,
           start: int = 0, transform: Any = noisy) -> StreamLoader:
    spe = n_fields * repeats // bs * bs
    ds = FieldDataset(src, transform, repeats=repeats, seed=3, cache_bytes=0, cache_fields=bs)  # one batch
    sampler = StreamSampler(n_fields, repeats, spe, epochs * spe, seed=3, start=start * bs, batch_size=bs,
                            workers=workers)
    return StreamLoader(ds, batch_size=bs, sampler=sampler, drop_last=True, num_workers=workers,
                        collate_fn=lambda s: s)


def signature(batches: Iterable[list[dict[str, Any]]]) -> list[list[tuple[int, tuple[float, ...]]]]:
    return [[(int(s["index"]), tuple(s["noise"].tolist())) for s in b] for b in batches]


def test_capability_is_declared_not_guessed() -> None:
    assert isinstance(PrefetchListSource(2), SupportsPrefetch) and not isinstance(ListSource(2), SupportsPrefetch)
    assert issubclass(S3FieldSource, SupportsPrefetch)
    src = PrefetchListSource(4, bad=(1,))
    got = [(r.key, a is None) for r, a in load_fields(src, src.records)]
    assert got == [(r.key, i == 1) for i, r in enumerate(src.records)] and src.calls == [[0, 1, 2, 3]]


def test_remote_batches_are_fetched_together_and_identical_to_local() -> None:
    plain, remote = ListSource(12), PrefetchListSource(12)
    a = list(loader(plain, 12, 2, 4, epochs=2))
    b = list(loader(remote, 12, 2, 4, epochs=2))
    assert signature(a) == signature(b)
    assert all(len(c) == len(set(c)) <= 4 for c in remote.calls)  # one call per batch's missing fields
    # once per epoch (a field at the end of epoch 0 may still be cached when epoch 1 starts with it)
    assert remote.loads == plain.loads and set(plain.loads.values()) <= {1, 2} and sum(plain.loads.values()) >= 20
    assert all(s["label"] == s["index"] % 3 and value(s) == s["index"] for bt in b for s in bt)


def test_workers_get_every_repeat_of_their_fields() -> None:
    """The sampler hands worker i batches i, i+w, ...: each group's repeats stay in one worker."""
    n, r, bs, w = 24, 3, 4, 2
    spe = n * r // bs * bs
    one = list(StreamSampler(n, r, spe, spe, seed=1, batch_size=bs))
    two = list(StreamSampler(n, r, spe, spe, seed=1, batch_size=bs, workers=w))
    assert one != two and Counter(i % (n * r) for i in one) == Counter(i % (n * r) for i in two)
    batches = [two[k:k + bs] for k in range(0, len(two), bs)]
    for worker in range(w):
        fields = [[(i % (n * r)) // r for i in b] for b in batches[worker::w]]
        for g in range(0, len(fields), r):  # r consecutive batches of a worker: one group, r times
            assert all(sorted(f) == sorted(fields[g]) for f in fields[g:g + r])
            assert len(set(fields[g])) == bs


def test_dataloader_workers_decode_each_field_once_and_resume_exactly() -> None:
    src = ListSource(24)
    full = list(loader(src, 24, 3, 4, workers=2, epochs=2))
    assert len(full) == 36
    dl = loader(ListSource(24), 24, 3, 4, workers=2, epochs=2)
    assert signature(dl) == signature(full)
    assert dl.metrics()["stream/fields"] == 2 * 24 and dl.metrics()["stream/samples"] == 2 * 72
    # each epoch shows the fields of the run without workers, in another order
    serial = [i for b in signature(loader(ListSource(24), 24, 3, 4, epochs=2)) for i, _ in b]
    mine = [i for b in signature(full) for i, _ in b]
    assert mine != serial and Counter(mine[:72]) == Counter(serial[:72]) == {i: 3 for i in range(24)}
    for stop in (1, 7, 18, 25):
        tail = list(loader(ListSource(24), 24, 3, 4, workers=2, epochs=2, start=stop))
        assert signature(tail) == signature(full[stop:]), f"resume at batch {stop}"


def test_bad_fields_are_skipped_counted_and_replaced() -> None:
    src = PrefetchListSource(10, bad=(2, 5))
    batches = list(loader(src, 10, 2, 4))
    got = Counter(int(s["index"]) for b in batches for s in b)
    assert sum(got.values()) == 20 and 2 not in got and 5 not in got
    assert got[3] == 4 and got[6] == 4  # the next loadable field stands in
    ds = FieldDataset(src, None)
    assert ds[2]["index"] == 3 and ds.skipped_count() == 1 and "P1/A02/1" in ds.skipped
    with pytest.raises(DataError, match="every field"):
        FieldDataset(ListSource(2, bad=(0, 1)), None)[0]


def test_lru_is_byte_bounded_but_keeps_one_batch() -> None:
    src = ListSource(8)
    ds = FieldDataset(src, None, cache_bytes=0, cache_fields=3)
    ds.__getitems__([0, 1, 2])
    assert sorted(ds._lru) == [0, 1, 2]
    ds.__getitems__([3])
    assert len(ds._lru) == 3 and 3 in ds._lru
    ds.__getitems__([4, 5, 6, 7])  # a bigger batch is kept whole until it is served
    assert sorted(ds._lru) == [4, 5, 6, 7] and src.loads == {i: 1 for i in range(8)}


def test_high_res_stage_starts_at_its_stream_position() -> None:
    ds = FieldDataset(ListSource(4), [(0, noisy), (8, lambda x, generator: {"image": x[:, :2]})])
    assert ds[31]["noise"].shape == (3,) and ds[32]["image"].shape == (2, 2, 4) and ds[32]["stream_pos"] == 8


# -------------------------------------------------------------------------------------------------
# Over S3
# -------------------------------------------------------------------------------------------------


def s3_source(jb: JumpBucket, endpoint: str, tmp_path: Path, uri: str | None = None, *extra: str) -> S3FieldSource:
    cfg = load_config(None, [f"data.s3.endpoint_url={endpoint}", f"data.s3.index_cache={tmp_path / 'idx.parquet'}",
                             *extra]).data
    return S3FieldSource(uri or jb.uri, cfg)


def test_s3_stream_survives_faults_once_per_epoch_with_workers(
        jump_bucket: JumpBucket, proxy: FaultProxy, tmp_path: Path) -> None:
    from dinocell.config import ViewsConfig
    from dinocell.data.views import MultiViewAugmentation

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
    views = MultiViewAugmentation(ViewsConfig(global_crop_size=32, local_crop_size=16, n_local_crops=2),
                                  src.fluorescent)
    proxy.served.clear()
    dl = loader(src, len(recs), 2, 3, workers=2, transform=views)  # 4 groups of 3 fields: 2 per worker
    got: Counter[int] = Counter()
    for batch in dl:
        assert len(batch) == 3 and batch[0]["global_crops"][0].shape == (1, 32, 32)
        got.update(int(s["index"]) for s in batch)
    assert sum(got.values()) == 2 * len(recs) and not set(got) & bad
    stand_ins = {4, 9}  # a bad field's samples show the next field, which that worker may fetch again
    paths = {i: ["/" + "/".join(parse_s3_uri(u)) for u in r.channels.values()] for i, r in enumerate(recs)}
    assert all(proxy.served[p] == 1 for i in paths if i not in bad | stand_ins for p in paths[i]), \
        "each good object exactly once per epoch"
    assert all(proxy.served[p] >= 1 for i in stand_ins for p in paths[i])
    assert sum(proxy.injected.values()) == len(recs) - len(bad)
    m = dl.metrics()  # read in the main process, written by the workers
    assert m["stream/skipped"] == 2 and m["s3/retries"] >= len(recs) - 2 and m["stream/samples"] == 24
    assert len(recs) - len(bad) <= m["stream/fields"] <= len(recs) - len(bad) + 2 * len(stand_ins)


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
