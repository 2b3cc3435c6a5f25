"""The training sample stream: one order, one seeding, one cache, for every kind of field source.

The whole run is one stream of "virtual epochs".  Sample ``k`` of the stream belongs to virtual epoch
``k // samples_per_epoch``; which field it shows comes from that epoch's order, one integer array
(:class:`StreamSampler`), and its augmentation seed is a pure function of ``(seed, stream id)``.  A
resumed run starts the stream at ``global_step * global_batch`` and sees exactly the batches the
uninterrupted run would have seen, whatever the source.

What differs between sources is only how a batch's fields are fetched, and that is a capability the
source declares (:class:`SupportsPrefetch`), never guessed from the URI or ``hasattr``: a remote
source fetches the fields of a batch concurrently, a local one reads them in turn.  Decoded fields
stay in one small byte-bounded LRU per process (:class:`FieldDataset`), which holds at least one
batch's fields; the sampler hands each DataLoader worker all repeats of the fields it decodes, so a
field is fetched once per epoch (see :meth:`StreamSampler.epoch_order`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinocell.data.counters import SharedCounters
from dinocell.data.field import FieldRecord, FieldSource, field_labels, take_records
from dinocell.errors import DataError

log = logging.getLogger(__name__)

#: Decoded fields a dataset keeps (bytes; it always keeps at least one batch's fields).
DECODE_CACHE_BYTES = 512 * 1024**2
_STREAM_COUNTERS = ("samples", "fields", "substituted")

Transform = Callable[..., dict[str, Any]]


@runtime_checkable
class SupportsPrefetch(Protocol):
    """A source on remote storage: it fetches many fields concurrently and reports its own metrics.

    Sources declare it by subclassing (``class S3FieldSource(FieldSource, SupportsPrefetch)``)."""

    def iter_loaded(self, records: Iterable[FieldRecord], ordered: bool = True, window: int | None = None,
                    cache: bool = True) -> Iterator[tuple[FieldRecord, np.ndarray | None]]:
        """``(record, scaled field or None when it failed)`` in input order, fetched concurrently."""
        ...

    def metrics(self) -> dict[str, float]:
        """Counters of the remote traffic (``s3/*``)."""
        ...


def load_fields(source: FieldSource, records: Iterable[FieldRecord]) -> Iterator[tuple[FieldRecord, np.ndarray | None]]:
    """Loaded fields in order (``None`` for a field that failed): concurrently when the source
    :class:`SupportsPrefetch`, one after another otherwise."""
    if isinstance(source, SupportsPrefetch):
        # cache=False: the stream's own LRU holds what is reused; a second cache would only hold memory
        yield from source.iter_loaded(records, cache=False)
        return
    for rec in records:
        try:
            yield rec, source.load(rec)
        except DataError as e:
            log.warning("skipping field %s: %s", rec.key, e)
            yield rec, None


class StreamSampler(Sampler[int]):
    """Stream ids for the whole run: per virtual epoch a fresh shuffle of fields, truncated to whole
    batches; an id is ``stream_pos * n_fields * repeats + field * repeats + r``.

    With ``repeats > 1`` the shuffled fields are taken in groups of one global batch (the last group
    absorbs the remainder) and each group is emitted ``repeats`` times in a row: the repeats of a field
    are a group apart, so they never share a batch (KoLeo would push two views of one field apart).
    When the source has fewer fields than a batch, duplicates in a batch cannot be avoided.  An epoch
    longer than one pass (``train.steps_per_epoch`` set high) continues with a further shuffle.

    DDP: each global batch of ``batch_size * world_size`` positions is split into per-rank slices, so
    ranks never read the same sample and resume needs no bookkeeping.
    """

    def __init__(self, n_fields: int, repeats: int, samples_per_epoch: int, total_samples: int,
                 seed: int = 0, start: int = 0, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1, workers: int = 1) -> None:
        if n_fields < 1 or samples_per_epoch < 1:
            raise DataError("the training stream is empty (no fields or no samples per epoch)")
        self.n_fields, self.repeats = n_fields, max(1, repeats)
        self.samples_per_epoch, self.total, self.seed = samples_per_epoch, total_samples, seed
        self.start = start
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers = max(1, workers)
        self._epoch: tuple[int, np.ndarray] | None = None

    def _pass(self, epoch: int, k: int) -> np.ndarray:
        """Pass ``k`` of an epoch: one shuffle of the fields, each field ``repeats`` times (one int64
        array: a 3M-field pass is 24 MB, not millions of Python ints)."""
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch + 1_000_003 * k)
        order = torch.randperm(self.n_fields, generator=g).numpy().astype(np.int64)
        if self.repeats == 1:
            return order
        group = self.batch_size * self.world_size
        n_groups = max(1, len(order) // group)  # the last group absorbs the remainder
        reps = np.arange(self.repeats, dtype=np.int64)
        head = order[:(n_groups - 1) * group].reshape(n_groups - 1, 1, group)
        tail = order[(n_groups - 1) * group:].reshape(1, -1)
        return np.concatenate([(head * self.repeats + reps[None, :, None]).reshape(-1),
                               (tail * self.repeats + reps[:, None]).reshape(-1)])

    def _by_worker(self, ids: np.ndarray) -> np.ndarray:
        """Reorder the global batches so that DataLoader worker ``i`` (batches ``i, i + w, ...``) gets
        all ``repeats`` batches of a group back to back: blocks of ``w x repeats`` batches, read as a
        (group, repeat) grid, are emitted repeat-major.  Each worker then decodes a field once and
        serves its repeats from its LRU.  One worker (or one repeat): the order is unchanged."""
        w, r, gb = self.workers, self.repeats, self.batch_size * self.world_size
        block = w * r * gb
        full = (len(ids) // block) * block
        if w == 1 or r == 1 or full == 0:
            return ids
        grid = ids[:full].reshape(-1, w, r, gb).transpose(0, 2, 1, 3).reshape(-1)
        return np.concatenate([grid, ids[full:]])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices (field * repeats + r) of one virtual epoch (the last one is kept)."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        parts: list[np.ndarray] = []
        have, k = 0, 0
        while have < self.samples_per_epoch:
            parts.append(self._pass(epoch, k))
            have += len(parts[-1])
            k += 1
        ids = self._by_worker(np.concatenate(parts)[: self.samples_per_epoch])
        self._epoch = (epoch, ids)
        return ids

    def __iter__(self) -> Iterator[int]:
        n = self.n_fields * self.repeats
        global_batch = self.batch_size * self.world_size
        spe = self.samples_per_epoch
        k = self.start
        chunk = 1 << 16  # stream positions converted to Python ints at a time
        while k < self.total:
            epoch = k // spe
            order = self.epoch_order(epoch)
            end = min(self.total, (epoch + 1) * spe)
            for a in range(k, end, chunk):
                ks = np.arange(a, min(end, a + chunk), dtype=np.int64)
                ks = ks[(ks % global_batch) // self.batch_size == self.rank]
                yield from (ks * n + order[ks - epoch * spe]).tolist()  # the position rides along
            k = end

    def __len__(self) -> int:
        # The full per-rank length, also when resuming: the training loop counts batches from the
        # restored step, so the loader must report the run's length while yielding only what is left.
        return self.total // self.world_size


class FieldDataset(Dataset):
    """Multi-view samples addressed by stream id (``stream_pos * len + field * repeats + r``).

    An id maps to field ``(id // repeats) % n_fields``; the augmentation is seeded by the whole id, so
    each stream position gets its own reproducible crops.  ``transform`` is one transform or a list
    of ``(first stream position, transform)`` stages (the high-resolution stage).  A batch's missing
    fields are fetched together (:func:`load_fields`) into the LRU.  A field that fails to load is
    skipped (counted; flagged in shared memory so every worker skips it) and the next loadable field
    is shown instead; if every field fails the dataset raises :class:`DataError`.
    """

    def __init__(self, source: FieldSource, transform: Transform | Sequence[tuple[int, Transform]] | None,
                 repeats: int = 1, seed: int = 0, cache_bytes: int = DECODE_CACHE_BYTES,
                 cache_fields: int = 1) -> None:
        if len(source) == 0:
            raise DataError(f"source {source.name} has no fields")
        self.source = source
        stages = sorted(transform, key=lambda t: t[0]) if isinstance(transform, Sequence) else [(0, transform)]
        self.stages: list[tuple[int, Transform | None]] = list(stages)
        self.repeats = max(1, int(repeats))
        self.seed = seed
        self.cache_bytes, self.cache_fields = int(cache_bytes), max(1, int(cache_fields))
        self._lru: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lru_bytes = 0
        self._keep = self.cache_fields
        self._labels = field_labels(source.records)  # once: a sample never builds a record for it
        self.skipped: dict[str, str] = {}
        self.bad = torch.zeros(len(source), dtype=torch.uint8).share_memory_()
        self.counters = SharedCounters(_STREAM_COUNTERS)

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    # -- the cache ---------------------------------------------------------------------------------
    def _put(self, field_idx: int, x: torch.Tensor) -> None:
        self._lru[field_idx] = x
        self._lru_bytes += x.numel() * x.element_size()
        while len(self._lru) > self._keep and self._lru_bytes > self.cache_bytes:
            _, old = self._lru.popitem(last=False)
            self._lru_bytes -= old.numel() * old.element_size()

    def _fetch(self, fields: Sequence[int]) -> None:
        """Load ``fields`` (not cached, not known bad) into the LRU, together."""
        recs = take_records(self.source.records, np.asarray(fields, dtype=np.int64))
        for fi, (rec, arr) in zip(fields, load_fields(self.source, recs), strict=True):
            if arr is None:
                self._failed(fi, rec.key, "failed to load")
                continue
            self.counters.add(fields=1)
            self._put(fi, torch.from_numpy(np.ascontiguousarray(arr)))

    def _failed(self, field_idx: int, key: str, why: str) -> None:
        self.bad[field_idx] = 1
        self.skipped[key] = why

    def load_field(self, field_idx: int) -> torch.Tensor | None:
        """The decoded, scaled field (C,H,W) from the LRU or the source; ``None`` if it fails."""
        x = self._lru.get(field_idx)
        if x is None and not self.bad[field_idx]:
            self._fetch([field_idx])
            x = self._lru.get(field_idx)
        if x is not None:
            self._lru.move_to_end(field_idx)
        return x

    # -- samples -----------------------------------------------------------------------------------
    def __getitems__(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """One batch: its fields are fetched together (concurrently for a remote source)."""
        ids = [int(i) for i in ids]
        n = len(self.source)
        fields = list(dict.fromkeys((i // self.repeats) % n for i in ids))
        self._keep = max(self.cache_fields, len(fields))
        need = [f for f in fields if f not in self._lru and not self.bad[f]]
        if need:
            self._fetch(need)
        return [self[i] for i in ids]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """``idx`` may exceed ``len(self)``: the sampler adds ``stream_pos * len`` so that the
        augmentation seed is a pure function of (seed, stream position), which makes resumed runs
        bit-identical to uninterrupted ones."""
        idx = int(idx)
        n = len(self.source)
        field_idx = (idx // self.repeats) % n
        for attempt in range(n):
            fi = (field_idx + attempt) % n
            if self.bad[fi]:
                continue
            x = self.load_field(fi)
            if x is None:
                continue
            if attempt:
                self.counters.add(substituted=1)
            return self._make_sample(x, fi, idx)
        raise DataError(f"every field of {self.source.name} failed to load; first error: "
                        f"{next(iter(self.skipped.items()), 'unknown')}")

    def _make_sample(self, x: torch.Tensor, field_idx: int, idx: int) -> dict[str, Any]:
        stream_pos = idx // len(self)
        transform = self.stages[0][1]
        for start, tf in self.stages:
            if stream_pos >= start:
                transform = tf
        if transform is None:
            sample: dict[str, Any] = {"image": x}
        else:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + idx) % (2**63 - 1))
            sample = transform(x, generator=g)
        sample["index"] = field_idx
        sample["stream_pos"] = stream_pos
        if self._labels is not None and self._labels[field_idx] >= 0:
            sample["label"] = int(self._labels[field_idx])
        self.counters.add(samples=1)
        return sample

    # -- reporting ---------------------------------------------------------------------------------
    def skipped_count(self) -> int:
        """Fields that failed to load so far, over all workers."""
        return int(self.bad.sum())

    def metrics(self) -> dict[str, float]:
        """Stream counters (summed over workers) plus a remote source's own counters."""
        out = {f"stream/{k}": v for k, v in self.counters.totals().items()}
        out["stream/skipped"] = float(self.skipped_count())
        if isinstance(self.source, SupportsPrefetch):
            out.update(self.source.metrics())
        return out


class StreamLoader(DataLoader):
    """The training DataLoader over a :class:`FieldDataset`; ``metrics()`` for the trainer's logs."""

    def metrics(self) -> dict[str, float]:
        return self.dataset.metrics()  # type: ignore[attr-defined,no-any-return]
