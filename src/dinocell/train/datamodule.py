"""The training data of a run: a LightningDataModule over a field source.

It owns, in one place, what the rest of the run reads from it:

* the held-out split (``data.holdout``, :mod:`dinocell.data.holdout`): training never reads those wells,
  evaluation (``summary.json``, ``eval/*``) only reads them;
* the run's length: ``steps_per_epoch`` and the schedule horizon ``total_steps = steps_per_epoch x
  epochs`` (``--max-steps`` only stops the Trainer early; it never shortens the cosine schedules);
* the loaders (map-style stream for local/synthetic sources, shuffle-buffered stream for S3).

The whole run is one stream of "virtual epochs": sample ``k`` of the stream belongs to virtual epoch
``k // samples_per_epoch`` and its augmentation seed is a pure function of (seed, k).  A resumed run
starts the stream at ``global_step * global_batch`` and therefore sees exactly the batches the
uninterrupted run would have seen: no mid-epoch guesswork from the training loop is needed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from dinocell.config import Config
from dinocell.data.holdout import resolve_wells, split_source, subset_source
from dinocell.data.masking import collate_multiview
from dinocell.data.sources import FieldDataset, FieldSource
from dinocell.data.views import MultiViewAugmentation, crop_scaled_batch_size
from dinocell.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

#: Decoded fields a map-style dataset keeps for the repeats of a group (see :class:`StreamSampler`).
DECODE_CACHE_BYTES = 512 * 1024**2


class StreamSampler(Sampler[int]):
    """Sample ids for the whole run: per virtual epoch a fresh shuffle of fields, truncated to whole
    batches.

    With ``repeats > 1`` the shuffled fields are taken in groups of one global batch (the last group
    absorbs the remainder) and each group is emitted ``repeats`` times in a row: the repeats of a field
    are a group apart, so they never share a batch (KoLeo would push two views of one field apart),
    yet they come back within a few batches, while the decoded field is still cached.  When the
    source has fewer fields than a batch, duplicates in a batch cannot be avoided.  An epoch longer
    than one pass (``train.steps_per_epoch`` set high) continues with a further shuffle.
    """

    def __init__(self, n_fields: int, repeats: int, samples_per_epoch: int, total_samples: int,
                 seed: int = 0, start: int = 0, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1) -> None:
        if n_fields < 1 or samples_per_epoch < 1:
            raise DataError("the training stream is empty (no fields or no samples per epoch)")
        self.n_fields, self.repeats = n_fields, max(1, repeats)
        self.samples_per_epoch, self.total, self.seed = samples_per_epoch, total_samples, seed
        self.start = start
        # DDP: each global batch of batch_size * world_size stream positions is split into per-rank
        # slices, so ranks never read the same sample and resume needs no extra bookkeeping.
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def _pass(self, epoch: int, k: int) -> np.ndarray:
        """Pass ``k`` of an epoch: one shuffle of the fields, each field ``repeats`` times (numpy: a
        3M-field pass is one int64 array, not millions of Python ints)."""
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

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices (field * repeats + r) of one virtual epoch (the last one is kept)."""
        cached = getattr(self, "_epoch", None)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        parts: list[np.ndarray] = []
        have, k = 0, 0
        while have < self.samples_per_epoch:
            parts.append(self._pass(epoch, k))
            have += len(parts[-1])
            k += 1
        ids = np.concatenate(parts)[: self.samples_per_epoch]
        self._epoch = (epoch, ids)
        return ids

    def __iter__(self) -> Iterator[int]:
        n = self.n_fields * self.repeats
        global_batch = self.batch_size * self.world_size
        spe = self.samples_per_epoch
        k = self.start
        chunk = 1 << 16  # stream positions converted to Python ints at a time
        while k < self.total:
            epoch, pos = divmod(k, spe)
            order = self.epoch_order(epoch)
            end = min(self.total, (epoch + 1) * spe)
            for a in range(k, end, chunk):
                ks = np.arange(a, min(end, a + chunk), dtype=np.int64)
                ks = ks[(ks % global_batch) // self.batch_size == self.rank]
                # the stream position rides along; FieldDataset reduces it mod n
                yield from (ks * n + order[ks - epoch * spe]).tolist()
            k = end

    def __len__(self) -> int:
        # The full per-rank length, also when resuming: the training loop counts batches from the
        # restored step, so the loader must report the run's length while yielding only what is left.
        return self.total // self.world_size


class StreamDataset(FieldDataset):
    """FieldDataset addressed by stream ids (``stream_pos * n + index``).

    ``FieldDataset`` maps an id to its field modulo the dataset size and seeds the augmentation with
    the whole id, so each stream position gets its own, reproducible crops.  The crop sizes switch to
    the high-resolution stage when the stream reaches ``transforms[i][0]``.  Decoded fields stay in a
    small LRU (``DECODE_CACHE_BYTES``) so the repeats of a group reuse their decode; fields that fail
    to load are flagged in shared memory, so the main process can count them across workers.
    """

    def __init__(self, source: FieldSource, transforms: list[tuple[int, MultiViewAugmentation]],
                 repeats: int, seed: int, cache_bytes: int = DECODE_CACHE_BYTES) -> None:
        ordered = sorted(transforms, key=lambda t: t[0])
        super().__init__(source, ordered[0][1], repeats=repeats, seed=seed)
        self.transforms = ordered
        self.cache_bytes = cache_bytes
        self._lru: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.bad = torch.zeros(len(source), dtype=torch.uint8).share_memory_()

    def load_field(self, field_idx: int) -> torch.Tensor:
        x = self._lru.get(field_idx)
        if x is not None:
            self._lru.move_to_end(field_idx)
            return x
        x = torch.from_numpy(np.ascontiguousarray(self.source.load(self.source.records[field_idx])))
        self._lru[field_idx] = x
        used = sum(t.numel() * t.element_size() for t in self._lru.values())
        while len(self._lru) > 1 and used > self.cache_bytes:
            _, old = self._lru.popitem(last=False)
            used -= old.numel() * old.element_size()
        return x

    def __getitem__(self, stream_id: int) -> dict[str, Any]:
        stream_pos = int(stream_id) // len(self)
        for start, tf in self.transforms:
            if stream_pos >= start:
                self.transform = tf
        sample = super().__getitem__(int(stream_id))
        sample["stream_pos"] = stream_pos
        return sample

    def field_failed(self, field_idx: int) -> None:
        self.bad[field_idx] = 1

    def skipped_count(self) -> int:
        """Fields that failed to load so far, over all workers."""
        return int(self.bad.sum())


def _collate_factory(cfg: Config, patch_size: int) -> Any:
    mask_cfg = cfg.data.mask
    seed = cfg.train.seed

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        # masks are seeded by what the batch holds, so they are reproducible in any worker
        key = [int(samples[0].get("stream_pos", 0)), int(samples[0].get("index", 0)), len(samples),
               int(samples[-1].get("index", 0))]
        return collate_multiview(samples, mask_cfg, patch_size, rng=np.random.default_rng([seed, *key]))

    return collate


def build_views(cfg: Config, fluorescent: list[bool], high_res: bool = False) -> MultiViewAugmentation:
    views = cfg.data.views
    if high_res:
        views = replace(views, global_crop_size=cfg.train.high_global_crop_size,
                        local_crop_size=cfg.train.high_local_crop_size)
    for key, size in (("global_crop_size", views.global_crop_size), ("local_crop_size", views.local_crop_size)):
        if size % cfg.model.patch_size:
            raise ConfigError(f"config key 'data.views.{key}' ({size}) must be a multiple of "
                              f"model.patch_size ({cfg.model.patch_size})")
    return MultiViewAugmentation(views, fluorescent)


def steps_per_epoch(cfg: Config, n_fields: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over the fields (``train.steps_per_epoch`` overrides)."""
    if cfg.train.steps_per_epoch:
        return int(cfg.train.steps_per_epoch)
    global_batch = cfg.data.batch_size * world_size
    steps = (n_fields * cfg.data.repeats) // global_batch
    if steps < 1:
        raise ConfigError(f"the data source has {n_fields} field(s) x {cfg.data.repeats} repeat(s), fewer than "
                          f"one global batch ({global_batch}); lower data.batch_size or add data")
    return steps


def build_loader(cfg: Config, source: FieldSource, total_steps: int, spe: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, patch_size: int | None = None,
                 batch_size: int | None = None) -> Any:
    """The training loader from ``start_step`` to ``total_steps`` for this rank (``batch_size``: the
    per-device batch, :attr:`DinoCellDataModule.batch_size`; default ``data.batch_size``)."""
    bs = batch_size or cfg.data.batch_size
    if use_stream(cfg, source):
        return EpochChainLoader(cfg, source, total_steps, spe, start_step, rank, world_size,
                                patch_size or cfg.model.patch_size, batch_size=bs)
    global_batch = bs * world_size
    samples_per_epoch = spe * global_batch
    transforms = [(0, build_views(cfg, list(source.fluorescent)))]
    if cfg.train.run_high_res_stage and cfg.train.high_res_epochs > 0:
        switch_epoch = max(0, cfg.train.epochs - cfg.train.high_res_epochs)
        transforms.append((switch_epoch * samples_per_epoch, build_views(cfg, list(source.fluorescent), True)))
    dataset = StreamDataset(source, transforms, repeats=cfg.data.repeats, seed=cfg.train.seed)
    sampler = StreamSampler(len(source), cfg.data.repeats, samples_per_epoch, total_steps * global_batch,
                            seed=cfg.train.seed, start=start_step * global_batch, batch_size=bs,
                            rank=rank, world_size=world_size)
    workers = cfg.data.num_workers
    return DataLoader(dataset, batch_size=bs, sampler=sampler, drop_last=True, num_workers=workers,
                      collate_fn=_collate_factory(cfg, patch_size or cfg.model.patch_size),
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers > 0 else None)


# --------------------------------------------------------------------------------------------------
# Streaming sources (S3): shuffle buffer + concurrent fetch instead of random access
# --------------------------------------------------------------------------------------------------


def use_stream(cfg: Config, source: FieldSource) -> bool:
    """Remote sources stream through a shuffle buffer: random access over S3 would fetch per sample."""
    return str(cfg.data.source).startswith("s3://") or hasattr(source, "iter_loaded")


def _stream_dataset(cfg: Config, source: FieldSource, rank: int | None = None,
                    world_size: int | None = None) -> Any:
    from dinocell.data.stream import StreamingFieldDataset

    return StreamingFieldDataset(source, build_views(cfg, list(source.fluorescent)), repeats=cfg.data.repeats,
                                 shuffle_buffer=cfg.data.s3.shuffle_buffer, seed=cfg.train.seed,
                                 rank=rank, world_size=world_size)


def stream_steps_per_epoch(cfg: Config, source: FieldSource, world_size: int = 1) -> int:
    """Batches per rank in one pass of the shuffle-buffered stream (``train.steps_per_epoch`` may
    shorten an epoch, never lengthen it: the stream has no more batches to give)."""
    ds = _stream_dataset(cfg, source, rank=0, world_size=world_size)
    w = max(1, cfg.data.num_workers)
    per_worker = (ds.fields_per_worker(w, world_size) * cfg.data.repeats) // cfg.data.batch_size
    if per_worker < 1:
        raise ConfigError(f"each of {w} loader worker(s) x {world_size} rank(s) gets fewer samples than one "
                          f"batch ({cfg.data.batch_size}); lower data.batch_size or data.num_workers")
    natural = w * per_worker
    if cfg.train.steps_per_epoch:
        if cfg.train.steps_per_epoch > natural:
            raise ConfigError(f"config key 'train.steps_per_epoch' ({cfg.train.steps_per_epoch}) exceeds the "
                              f"{natural} batches one pass of the stream holds; lower it or raise data.repeats")
        return int(cfg.train.steps_per_epoch)
    return natural


class EpochChainLoader:
    """Chains epochs of a :class:`StreamingFieldDataset` into one run-long stream of batches.

    The position is derived from the step (epoch = step // steps_per_epoch), so a resumed run
    re-enters the stream exactly where the checkpoint left it without fetching the skipped fields.
    """

    def __init__(self, cfg: Config, source: FieldSource, total_steps: int, spe: int, start_step: int,
                 rank: int, world_size: int, patch_size: int, batch_size: int | None = None) -> None:
        self.cfg, self.total, self.spe, self.start = cfg, total_steps, spe, start_step
        self.dataset = _stream_dataset(cfg, source, rank, world_size)
        self.collate = _collate_factory(cfg, patch_size)
        self.batch_size = batch_size or cfg.data.batch_size

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = self.start
        bs, workers = self.batch_size, self.cfg.data.num_workers
        while step < self.total:
            epoch, pos = divmod(step, self.spe)
            loader = self.dataset.make_loader(bs, self.collate, num_workers=workers, drop_last=True)
            self.dataset.load_state_dict({"epoch": epoch, "samples_yielded": pos * bs,
                                          "num_workers": workers, "batch_size": bs})
            before = step
            for batch in loader:
                yield batch
                step += 1
                if step >= self.total or step % self.spe == 0:
                    break
            if step == before:  # an empty pass would loop forever
                raise DataError(f"the stream of epoch {epoch} yielded no batch at position {pos} "
                                f"(steps per epoch {self.spe}); check the data source")

    def metrics(self) -> dict[str, float]:
        return self.dataset.metrics()


# --------------------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------------------


def held_wells_mask(index: Any, wells: list[str]) -> np.ndarray:
    """Boolean mask of the rows of ``index`` whose ``PLATE/WELL`` is in ``wells``, on integer codes
    (one dict look-up per listed well, none per row; a well name never holds a ``/``)."""
    plate_code = {p: i for i, p in enumerate(index.cats["plate"])}
    well_code = {w: i for i, w in enumerate(index.cats["well"])}
    n_wells = max(1, len(index.cats["well"]))
    want = []
    for key in wells:
        plate, _, well = str(key).rpartition("/")
        if plate in plate_code and well in well_code:
            want.append(plate_code[plate] * n_wells + well_code[well])
    pair = index.cols["plate"].astype(np.int64) * n_wells + index.cols["well"].astype(np.int64)
    return np.isin(pair, np.asarray(want, dtype=np.int64))


def split_heldout(source: FieldSource, holdout: Any,
                  wells: list[str] | None = None) -> tuple[list[str], FieldSource, FieldSource]:
    """(held-out wells, training source, held-out source) with fields grouped by well once.

    A columnar index is grouped into well rows (:meth:`~dinocell.data.index.FieldIndex.well_rows`,
    O(n)); the held-out rule and the split then run on one row per well (~9x fewer than fields) and
    are mapped back to the fields with one integer gather.  Other sources take the generic path."""
    recs = source.records
    if not hasattr(recs, "well_rows"):
        chosen = resolve_wells(recs, holdout) if wells is None else list(wells)
        return (chosen, *split_source(source, chosen))
    first, well_of = recs.well_rows()  # type: ignore[attr-defined]
    per_well = recs.take(first)  # type: ignore[attr-defined]
    chosen = resolve_wells(per_well, holdout) if wells is None else list(wells)
    held = held_wells_mask(per_well, chosen)[well_of]
    train = np.flatnonzero(~held)
    if not len(train):
        raise UserError(f"every field of {source.name} is held out for evaluation; lower "
                        "data.holdout.fraction or list fewer data.holdout.wells")
    return chosen, subset_source(source, train), subset_source(source, np.flatnonzero(held))


class DinoCellDataModule(L.LightningDataModule):
    """Sources, held-out split, run length and loaders of one run (see module doc).

    ``source`` is the whole source; ``wells`` the held-out ``PLATE/WELL`` keys (``None``: decided here
    from ``data.holdout``).  ``world_size`` is the Trainer's (devices x nodes): the run length depends on
    it, and the LightningModule's schedules are built from :attr:`steps_per_epoch` / :attr:`total_steps`.
    """

    def __init__(self, cfg: Config, source: FieldSource, world_size: int = 1,
                 wells: list[str] | None = None) -> None:
        super().__init__()
        self.cfg, self.full_source = cfg, source
        self.heldout_wells, self.train_source, self.heldout = split_heldout(source, cfg.data.holdout, wells)
        self.world_size = max(1, int(world_size))
        if use_stream(cfg, self.train_source):
            self.steps_per_epoch = stream_steps_per_epoch(cfg, self.train_source, self.world_size)
        else:
            self.steps_per_epoch = steps_per_epoch(cfg, len(self.train_source), self.world_size)
        #: the per-device batch the loader yields: ``data.batch_size``, or with ``scale_batch_to_crops`` the
        #: batch of the same global-crop count (epochs keep the configured batch's step count); the config
        #: itself is never changed, so what it records and what the module logs is what the user set
        self.batch_size = cfg.data.batch_size
        if cfg.data.views.scale_batch_to_crops:
            n_global = build_views(cfg, list(source.fluorescent)).n_global_crops
            self.batch_size = crop_scaled_batch_size(cfg.data.batch_size, n_global)
        self.global_batch = self.batch_size * self.world_size
        #: the schedule horizon; ``train.max_steps`` stops the Trainer earlier without changing it
        self.total_steps = self.steps_per_epoch * max(1, cfg.train.epochs)
        #: where this invocation stops (the loader's length, so progress bars show it)
        self.stop_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self._loader: Any = None

    def train_dataloader(self) -> Any:
        """Built when fitting starts, so the restored ``global_step`` and the DDP rank are known: a
        resumed run continues the exact sample stream of the uninterrupted one."""
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        self._loader = build_loader(self.cfg, self.train_source, self.stop_step, self.steps_per_epoch,
                                    start_step=start, rank=rank, world_size=self.world_size,
                                    patch_size=self.cfg.model.patch_size, batch_size=self.batch_size)
        return self._loader

    def skipped_fields(self) -> int:
        """Fields left out: unreadable at listing/verification, plus those that failed while training."""
        listed = sum(1 for s in self.full_source.skipped if not str(s).endswith("name not recognised"))
        loader = self._loader
        if loader is None:
            return listed
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "skipped_count"):
            return listed + dataset.skipped_count()
        if hasattr(loader, "metrics"):
            return listed + int(loader.metrics().get("stream/skipped", 0))
        return listed
