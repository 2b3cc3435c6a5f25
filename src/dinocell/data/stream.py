"""Streaming multi-view samples from any :class:`~dinocell.data.sources.FieldSource`.

Random access over 3M fields with a small LRU almost never hits the cache.  Streaming instead reads
each field once per epoch (in a shuffled order), decodes it once, keeps it in a *shuffle buffer* and
draws ``repeats`` augmented samples from it at random times while it sits there.  Training speed then
depends on ``repeats`` and decode speed rather than on luck, and the network only has to deliver
``samples/s / repeats`` fields per second.

Guarantees (tested):

* **Sharding**: the epoch's field permutation is split over DDP ranks, then over DataLoader workers;
  no field is read twice per epoch.  Every worker of every rank yields the same number of samples
  (``ceil(fields / (ranks * workers)) * repeats``): a worker with one field less, or with a field that
  failed to load, fills the gap with extra views of fields in its buffer (counted as
  ``substituted``), so DDP ranks never disagree on the number of batches.
* **Determinism**: the buffer's draws, the fetch order and each sample's augmentation seed are pure
  functions of ``(seed, epoch, rank, worker, sample number)``.
* **Resume**: ``state_dict()`` holds the epoch and the number of samples already consumed;
  ``load_state_dict()`` makes the next iteration skip them *without fetching* fields whose samples were
  all consumed -- the buffer plan is replayed on record indices only.

With DataLoader workers, the main process cannot see how far each worker got; use
:class:`StreamingDataLoader` (or :meth:`StreamingFieldDataset.make_loader`), which counts the batches it
hands out and maps that count back to per-worker positions (DataLoader serves workers round-robin, and
equal per-worker quotas make that mapping exact).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dinocell.data.counters import SharedCounters
from dinocell.data.field import FieldRecord, FieldSource, field_labels
from dinocell.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_ENTER, _EMIT = 0, 1
_STREAM_COUNTERS = ("samples", "fields", "skipped", "substituted")


def dist_info() -> tuple[int, int]:
    """(rank, world size) of torch.distributed if initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def buffer_plan(n_items: int, size: int, repeats: int, rng: np.random.Generator) -> Iterator[tuple[int, int]]:
    """The shuffle-buffer schedule as events ``(_ENTER, item)`` / ``(_EMIT, item)``.

    Items enter in order until ``size`` sit in the buffer; each step emits one sample from a uniformly
    drawn slot; an item leaves after ``repeats`` emissions and the next item takes its slot.  It only
    depends on counts and ``rng``, never on data, so a resumed run can replay it without fetching.
    """
    slots: list[list[int]] = []
    nxt = 0
    while nxt < n_items and len(slots) < size:
        yield _ENTER, nxt
        slots.append([nxt, repeats])
        nxt += 1
    while slots:
        i = int(rng.integers(len(slots))) if len(slots) > 1 else 0
        slot = slots[i]
        yield _EMIT, slot[0]
        slot[1] -= 1
        if slot[1] == 0:
            if nxt < n_items:
                yield _ENTER, nxt
                slots[i] = [nxt, repeats]
                nxt += 1
            else:
                slots[i] = slots[-1]
                slots.pop()


def worker_offsets(consumed: int, n_workers: int, batch_size: int, quota: int) -> list[int]:
    """Samples each worker had produced when ``consumed`` samples came out of a DataLoader.

    DataLoader takes batches from workers round-robin; every worker yields ``quota`` samples, so its
    batches are ``batch_size`` long except the last one, and the order is round-major.
    """
    offs = [0] * n_workers
    if quota <= 0:
        return offs
    n_batches = math.ceil(quota / batch_size)
    rem = consumed
    for r in range(n_batches):
        size = batch_size if r < n_batches - 1 else quota - (n_batches - 1) * batch_size
        for w in range(n_workers):
            if rem <= 0:
                return offs
            if rem < size:
                raise DataError(f"stream position {consumed} is not on a batch boundary "
                                f"(batch size {batch_size}, {n_workers} workers)")
            offs[w] += size
            rem -= size
    return offs


def _sample_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _threaded_loader(source: FieldSource, records: Iterable[FieldRecord],
                     prefetch: int) -> Iterator[tuple[FieldRecord, np.ndarray | None]]:
    """``iter_loaded`` for sources without one: ``source.load`` in a small thread pool, in order."""

    def load(rec: FieldRecord) -> np.ndarray | None:
        try:
            return source.load(rec)
        except DataError as e:
            log.warning("skipping field %s: %s", rec.key, e)
            return None

    if prefetch <= 0:
        for rec in records:
            yield rec, load(rec)
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, prefetch)), thread_name_prefix="field-load")
    pending: deque[tuple[FieldRecord, Future[np.ndarray | None]]] = deque()
    it = iter(records)
    try:
        for rec in it:
            pending.append((rec, pool.submit(load, rec)))
            if len(pending) >= prefetch:
                break
        while pending:
            rec, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield rec, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


class StreamingFieldDataset(IterableDataset):
    """Shuffle-buffered stream of multi-view samples from a field source.

    ``transform(field: Tensor (C,H,W), generator=torch.Generator) -> dict`` (e.g.
    :class:`~dinocell.data.views.MultiViewAugmentation`); ``None`` yields ``{"image": field}``.  Every
    sample also carries ``index`` (the record index) and ``label`` when the record has one.
    ``prefetch`` fields load ahead when the source has no concurrent ``iter_loaded`` of its own.
    ``rank``/``world_size`` override torch.distributed (tests, custom launchers).
    """

    def __init__(self, source: FieldSource, transform: Callable[..., dict[str, Any]] | None = None,
                 repeats: int = 1, shuffle_buffer: int = 64, seed: int = 0, prefetch: int = 8,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        if repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {repeats}")
        if shuffle_buffer < 1:
            raise ConfigError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if len(source) == 0:
            raise DataError(f"source {source.name} has no fields")
        self.source = source
        self.transform = transform
        self.repeats = int(repeats)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.prefetch = int(prefetch)
        self.shuffle = shuffle
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.position = 0  # samples of ``epoch`` already consumed (this rank)
        self.num_workers = 0  # set by StreamingDataLoader: needed for __len__ and resume
        self.batch_size: int | None = None
        self._resume_workers: int | None = None
        self._order: tuple[tuple[int, int, int, bool], np.ndarray] | None = None
        self.counters = SharedCounters(_STREAM_COUNTERS)
        self._labels = field_labels(source.records)  # once: a sample never builds a record for it

    # -- layout ------------------------------------------------------------------------------------
    def _dist(self) -> tuple[int, int]:
        rank, world = dist_info()
        return (self._rank if self._rank is not None else rank,
                self._world if self._world is not None else world)

    def fields_per_worker(self, num_workers: int | None = None, world_size: int | None = None) -> int:
        """Fields (real or substituted) each worker streams per epoch: ceil(N / (ranks * workers))."""
        w = max(1, self.num_workers if num_workers is None else num_workers)
        world = world_size if world_size is not None else self._dist()[1]
        return math.ceil(len(self.source) / (world * w))

    def __len__(self) -> int:
        """Samples per epoch on this rank (for ``self.num_workers`` DataLoader workers)."""
        w = max(1, self.num_workers)
        return self.fields_per_worker(w) * w * self.repeats

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of record indices (the same on every rank; kept for the epoch:
        permuting 3M indices costs ~0.1 s, and every shard of the epoch slices the same order)."""
        n = len(self.source)
        cached = self._order
        if cached is not None and cached[0] == (epoch, n, self.seed, self.shuffle):
            return cached[1]
        order = (np.random.default_rng([self.seed, epoch, 0x0D1C]).permutation(n) if self.shuffle
                 else np.arange(n))
        order.flags.writeable = False
        self._order = ((epoch, n, self.seed, self.shuffle), order)
        return order

    def shard(self, epoch: int, rank: int, world: int, worker: int, n_workers: int) -> np.ndarray:
        """Record indices of one worker of one rank, in fetch order."""
        return self.epoch_order(epoch)[rank::world][worker::n_workers]

    # -- position ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch = int(epoch)
        self.position = 0

    def state_dict(self, samples_consumed: int | None = None) -> dict[str, Any]:
        """Epoch and samples consumed on this rank (pass ``samples_consumed`` if you count them)."""
        return {"epoch": self.epoch,
                "samples_yielded": int(self.position if samples_consumed is None else samples_consumed),
                "seed": self.seed, "repeats": self.repeats, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "n_fields": len(self.source)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a stored position; the next iteration skips what was consumed, unfetched."""
        self.epoch = int(state["epoch"])
        self.position = int(state["samples_yielded"])
        for key in ("seed", "repeats", "n_fields"):
            mine = self.seed if key == "seed" else self.repeats if key == "repeats" else len(self.source)
            if key in state and state[key] is not None and int(state[key]) != mine:
                log.warning("resuming a stream whose %s was %s (now %s): the epoch order differs, so "
                            "the rest of epoch %d may repeat or miss fields", key, state[key], mine,
                            self.epoch)
        self._resume_workers = state.get("num_workers")
        if self.batch_size is None and state.get("batch_size"):
            self.batch_size = int(state["batch_size"])

    def _resume_layout(self, n_workers: int, quota: int) -> tuple[list[int], int]:
        """(samples already consumed per logical worker, rotation of the workers).

        DataLoader always asks worker 0 first, but after ``b`` consumed batches the uninterrupted run
        would continue with worker ``b % n``: so physical worker ``p`` plays logical worker
        ``(p + b) % n``, which replays the exact batch order (workers that already gave their extra
        batch in the current round come last and run out first).
        """
        if self.position <= 0:
            return [0] * n_workers, 0
        saved = self._resume_workers if self._resume_workers is not None else self.num_workers
        if max(1, saved) != n_workers:
            log.warning("stream position %d was saved with %s DataLoader worker(s), now %d: the shards "
                        "differ, so epoch %d restarts from its beginning", self.position, saved,
                        n_workers, self.epoch)
            return [0] * n_workers, 0
        if n_workers == 1:
            return [self.position], 0
        if not self.batch_size:
            log.warning("stream position %d cannot be mapped to %d workers without the batch size: "
                        "epoch %d restarts from its beginning", self.position, n_workers, self.epoch)
            return [0] * n_workers, 0
        offs = worker_offsets(self.position, n_workers, int(self.batch_size), quota)
        batches = sum(math.ceil(o / int(self.batch_size)) for o in offs)
        return offs, batches % n_workers

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        rank, world = self._dist()
        epoch = self.epoch
        n_items = self.fields_per_worker(n_workers, world)
        quota = n_items * self.repeats
        skips, shift = self._resume_layout(n_workers, quota)
        worker = (worker + shift) % n_workers  # the logical worker this process plays
        skip = skips[worker]
        shard = self.shard(epoch, rank, world, worker, n_workers)
        if len(shard) == 0:
            log.warning("worker %d of rank %d has no fields (%d fields < %d ranks x %d workers)",
                        worker, rank, len(self.source), world, n_workers)
            return
        in_process = info is None
        for sample in self._stream(shard, n_items, epoch, rank, worker, skip):
            if in_process:
                self.position += 1
            yield sample
        if in_process:  # a full pass: the next iteration is the next epoch
            self.epoch = epoch + 1
            self.position = 0
            self._resume_workers = None

    def _loaded(self, records: Iterable[FieldRecord]) -> Iterator[tuple[FieldRecord, np.ndarray | None]]:
        if hasattr(self.source, "iter_loaded"):
            # Each field is read once per epoch: a decoded-field cache here would only hold memory
            # until the worker exits at the end of the (virtual) epoch.
            return self.source.iter_loaded(records, cache=False)
        return _threaded_loader(self.source, records, self.prefetch)

    def _stream(self, shard: np.ndarray, n_items: int, epoch: int, rank: int, worker: int,
                skip: int) -> Iterator[dict[str, Any]]:
        n_real = len(shard)

        def plan() -> Iterator[tuple[int, int]]:
            rng = np.random.default_rng([self.seed, epoch, rank, worker, 0xB0F])
            return buffer_plan(n_items, self.shuffle_buffer, self.repeats, rng)

        # Which real items still have samples at or after ``skip``?  Only those are fetched.
        if skip > 0:
            last = np.full(n_items, -1, dtype=np.int64)
            k = 0
            for ev, item in plan():
                if ev == _EMIT:
                    last[item] = k
                    k += 1
            needed = np.flatnonzero(last[:n_real] >= skip).tolist()
        else:
            needed = list(range(n_real))
        issued: deque[FieldRecord] = deque()  # records handed to the loader, not yet returned

        def records() -> Iterator[FieldRecord]:
            # Lazy: a columnar index builds each record only when the loader reaches it, so the first
            # sample after a resume does not wait for the whole shard's records.
            for i in needed:
                rec = self.source.records[int(shard[i])]
                issued.append(rec)
                yield rec

        loaded = self._loaded(records())

        arrays: dict[int, np.ndarray | None] = {}  # items in the buffer -> data (None: bad/virtual)
        in_buffer: dict[int, None] = {}  # insertion-ordered set of items in the buffer
        left: list[int] = []  # real items in the order they left the buffer (for the fallback)
        status: dict[int, bool] = {}  # real item -> loaded fine (known only for fetched items)
        last_good: tuple[int, np.ndarray] | None = None
        needed_set = set(needed)
        emitted: dict[int, int] = {}
        k = 0
        try:
            for ev, item in plan():
                if ev == _ENTER:
                    in_buffer[item] = None
                    if item < n_real and item in needed_set:
                        rec, arr = next(loaded)
                        if rec is not issued.popleft():
                            raise RuntimeError("field loader returned fields out of order")
                        arrays[item] = arr
                        status[item] = arr is not None
                        self.counters.add(fields=1, skipped=int(arr is None))
                    else:
                        arrays[item] = None
                    continue
                # _EMIT
                emitted[item] = emitted.get(item, 0) + 1
                if emitted[item] == self.repeats:
                    in_buffer.pop(item, None)
                this_k = k
                k += 1
                if this_k < skip:
                    if emitted[item] == self.repeats:
                        self._leave(item, n_real, arrays, left, status)
                        del emitted[item]
                    continue
                arr = arrays.get(item)
                src_item = item
                if arr is None:  # bad field or padding: a view of another buffered field instead
                    pick = self._substitute(item, this_k, epoch, rank, worker, arrays, in_buffer)
                    if pick is None:
                        pick = self._fallback(last_good, left, status, shard)
                    if pick is None:
                        log.warning("no loadable field left to fill sample %d of worker %d", this_k, worker)
                        if emitted[item] == self.repeats:
                            self._leave(item, n_real, arrays, left, status)
                            del emitted[item]
                        continue
                    src_item, arr = pick
                    self.counters.add(substituted=1)
                yield self._make_sample(arr, int(shard[src_item]), epoch, rank, worker, this_k)
                if emitted[item] == self.repeats:
                    good = arrays.get(item)
                    if good is not None:
                        last_good = (item, good)
                    self._leave(item, n_real, arrays, left, status)
                    del emitted[item]
        finally:
            close = getattr(loaded, "close", None)
            if close is not None:
                close()

    @staticmethod
    def _leave(item: int, n_real: int, arrays: dict[int, np.ndarray | None], left: list[int],
               status: dict[int, bool]) -> None:
        arrays.pop(item, None)
        if item < n_real:
            left.append(item)

    def _substitute(self, item: int, k: int, epoch: int, rank: int, worker: int,
                    arrays: dict[int, np.ndarray | None],
                    in_buffer: dict[int, None]) -> tuple[int, np.ndarray] | None:
        good = [i for i in in_buffer if i != item and arrays.get(i) is not None]
        if not good:
            return None
        rng = np.random.default_rng([self.seed, epoch, rank, worker, k, 0x5B])
        j = good[int(rng.integers(len(good)))]
        return j, arrays[j]  # type: ignore[return-value]

    def _fallback(self, last_good: tuple[int, np.ndarray] | None, left: list[int],
                  status: dict[int, bool], shard: np.ndarray) -> tuple[int, np.ndarray] | None:
        """The most recent good field to leave the buffer (re-read if a resume never fetched it)."""
        for item in reversed(left):
            if status.get(item) is False:
                continue
            if last_good is not None and last_good[0] == item:
                return last_good
            if item in status and last_good is not None:
                continue  # fetched and good, but older than last_good: unreachable
            rec = self.source.records[int(shard[item])]
            try:
                arr = self.source.load(rec)
            except DataError:
                status[item] = False
                continue
            status[item] = True
            return item, arr
        return last_good

    def _make_sample(self, arr: np.ndarray, rec_index: int, epoch: int, rank: int, worker: int,
                     k: int) -> dict[str, Any]:
        x = torch.from_numpy(np.ascontiguousarray(arr))
        if self.transform is None:
            sample: dict[str, Any] = {"image": x}
        else:
            g = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, rank, worker, k))
            sample = self.transform(x, generator=g)
        sample["index"] = rec_index
        if self._labels is not None and self._labels[rec_index] >= 0:
            sample["label"] = int(self._labels[rec_index])
        self.counters.add(samples=1)
        return sample

    def metrics(self) -> dict[str, float]:
        """Stream counters (summed over workers) plus the source's own metrics, if any."""
        tot = self.counters.totals()
        out = {f"stream/{k}": v for k, v in tot.items()}
        src_metrics = getattr(self.source, "metrics", None)
        if callable(src_metrics):
            out.update(src_metrics())
        return out

    def make_loader(self, batch_size: int, collate_fn: Callable[[list[Any]], Any] | None = None,
                    num_workers: int = 0, **kwargs: Any) -> StreamingDataLoader:
        """A :class:`StreamingDataLoader` over this dataset."""
        return StreamingDataLoader(self, batch_size=batch_size, collate_fn=collate_fn,
                                   num_workers=num_workers, **kwargs)


class _Counted(NamedTuple):
    n: int
    batch: Any


class _CountingCollate:
    """Wrap a collate function so the main process learns each batch's sample count."""

    def __init__(self, fn: Callable[[list[Any]], Any] | None) -> None:
        self.fn = fn

    def __call__(self, samples: list[Any]) -> _Counted:
        from torch.utils.data import default_collate

        fn = self.fn if self.fn is not None else default_collate
        return _Counted(len(samples), fn(samples))


class StreamingDataLoader(DataLoader):
    """DataLoader that tracks the stream position of a :class:`StreamingFieldDataset`.

    It counts the samples of every batch it hands out (so ``state_dict()`` is exact for a loop that
    checkpoints after training on the batches it received), and advances the epoch after a full pass.
    Lightning saves/restores it automatically (it has ``state_dict``/``load_state_dict``) -- but
    Lightning's fit loop fetches one batch ahead, so pass ``lookahead_batches=1`` there.
    ``persistent_workers`` is not supported (workers would keep a stale position).
    """

    def __init__(self, dataset: StreamingFieldDataset, batch_size: int = 1,
                 collate_fn: Callable[[list[Any]], Any] | None = None, num_workers: int = 0,
                 lookahead_batches: int = 0, **kwargs: Any) -> None:
        if kwargs.pop("persistent_workers", False):
            log.warning("StreamingDataLoader ignores persistent_workers=True (resume needs fresh workers)")
        dataset.num_workers = int(num_workers)
        dataset.batch_size = int(batch_size)
        self.lookahead_batches = int(lookahead_batches)
        self._handed: deque[int] = deque()
        super().__init__(dataset, batch_size=batch_size, collate_fn=_CountingCollate(collate_fn),
                         num_workers=num_workers, **kwargs)

    def __len__(self) -> int:
        """Batches per epoch: each worker's quota is batched separately."""
        ds: StreamingFieldDataset = self.dataset  # type: ignore[assignment]
        w = max(1, self.num_workers)
        quota = ds.fields_per_worker(w) * ds.repeats
        per_worker = quota // self.batch_size if self.drop_last else math.ceil(quota / self.batch_size)
        return w * per_worker

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        ds: StreamingFieldDataset = self.dataset  # type: ignore[assignment]
        self._handed.clear()
        workers = self.num_workers > 0
        finished = False
        try:
            for counted in super().__iter__():
                if workers:
                    ds.position += counted.n
                self._handed.append(counted.n)
                while len(self._handed) > self.lookahead_batches + 1:
                    self._handed.popleft()
                yield counted.batch
            finished = True
        finally:
            if finished and workers:
                ds.epoch += 1
                ds.position = 0
                ds._resume_workers = None
            if finished:
                self._handed.clear()

    def state_dict(self) -> dict[str, Any]:
        ds: StreamingFieldDataset = self.dataset  # type: ignore[assignment]
        ahead = sum(list(self._handed)[-self.lookahead_batches:]) if self.lookahead_batches else 0
        return ds.state_dict(samples_consumed=max(0, ds.position - ahead))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)  # type: ignore[attr-defined]


def field_stream(source: FieldSource, records: Iterable[FieldRecord],
                 prefetch: int = 8) -> Iterator[tuple[FieldRecord, np.ndarray | None]]:
    """Loaded fields in order, concurrently when the source supports it (extraction, evaluation)."""
    recs = list(records)
    if hasattr(source, "iter_loaded"):
        return source.iter_loaded(recs)
    return _threaded_loader(source, recs, prefetch)
