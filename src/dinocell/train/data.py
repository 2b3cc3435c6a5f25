"""Training data pipeline: source -> multi-view samples -> collated batches with iBOT masks.

The whole run is one stream of "virtual epochs": sample ``k`` of the stream belongs to virtual epoch
``k // samples_per_epoch`` and its augmentation seed is a pure function of (seed, k).  A resumed run
starts the stream at ``global_step * global_batch`` and therefore sees exactly the batches the
uninterrupted run would have seen: no mid-epoch guesswork from the training loop is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from dinocell.config import Config
from dinocell.data.masking import collate_multiview
from dinocell.data.sources import FieldDataset, FieldSource
from dinocell.data.views import MultiViewAugmentation
from dinocell.errors import ConfigError


class StreamSampler(Sampler[int]):
    """Sample ids for the whole run: per virtual epoch a fresh shuffle of fields, each field's
    ``repeats`` draws back to back (so its decode is reused), truncated to whole batches."""

    def __init__(self, n_fields: int, repeats: int, samples_per_epoch: int, total_samples: int,
                 seed: int = 0, start: int = 0, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n_fields, self.repeats = n_fields, max(1, repeats)
        self.samples_per_epoch, self.total, self.seed = samples_per_epoch, total_samples, seed
        self.start = start
        # DDP: each global batch of batch_size * world_size stream positions is split into per-rank
        # slices, so ranks never read the same sample and resume needs no extra bookkeeping.
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def epoch_order(self, epoch: int) -> list[int]:
        """Dataset indices (field * repeats + r) of one virtual epoch."""
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        order = torch.randperm(self.n_fields, generator=g).tolist()
        ids = [f * self.repeats + r for f in order for r in range(self.repeats)]
        return ids[: self.samples_per_epoch]

    def __iter__(self) -> Iterator[int]:
        n = self.n_fields * self.repeats
        global_batch = self.batch_size * self.world_size
        k = self.start
        while k < self.total:
            epoch, pos = divmod(k, self.samples_per_epoch)
            for i in self.epoch_order(epoch)[pos:]:
                if k >= self.total:
                    return
                if (k % global_batch) // self.batch_size == self.rank:
                    yield k * n + i  # the stream position rides along; FieldDataset reduces it mod n
                k += 1

    def __len__(self) -> int:
        # The full per-rank length, also when resuming: the training loop counts batches from the
        # restored step, so the loader must report the run's length while yielding only what is left.
        return self.total // self.world_size


class StreamDataset(FieldDataset):
    """FieldDataset addressed by stream ids (``stream_pos * n + index``).

    ``FieldDataset`` maps an id to its field modulo the dataset size and seeds the augmentation with
    the whole id, so each stream position gets its own, reproducible crops.  The crop sizes switch to
    the high-resolution stage when the stream reaches ``transforms[i][0]``.
    """

    def __init__(self, source: FieldSource, transforms: list[tuple[int, MultiViewAugmentation]],
                 repeats: int, seed: int) -> None:
        ordered = sorted(transforms, key=lambda t: t[0])
        super().__init__(source, ordered[0][1], repeats=repeats, seed=seed)
        self.transforms = ordered

    def __getitem__(self, stream_id: int) -> dict[str, Any]:
        stream_pos = int(stream_id) // len(self)
        for start, tf in self.transforms:
            if stream_pos >= start:
                self.transform = tf
        sample = super().__getitem__(int(stream_id))
        sample["stream_pos"] = stream_pos
        return sample


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
                 rank: int = 0, world_size: int = 1, patch_size: int | None = None) -> Any:
    """The training loader from ``start_step`` to ``total_steps`` for this rank."""
    if use_stream(cfg, source):
        return EpochChainLoader(cfg, source, total_steps, spe, start_step, rank, world_size,
                                patch_size or cfg.model.patch_size)
    bs = cfg.data.batch_size
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
    """Batches per rank in one pass of the shuffle-buffered stream."""
    if cfg.train.steps_per_epoch:
        return int(cfg.train.steps_per_epoch)
    ds = _stream_dataset(cfg, source, rank=0, world_size=world_size)
    w = max(1, cfg.data.num_workers)
    per_worker = (ds.fields_per_worker(w, world_size) * cfg.data.repeats) // cfg.data.batch_size
    if per_worker < 1:
        raise ConfigError(f"each of {w} loader worker(s) x {world_size} rank(s) gets fewer samples than one "
                          f"batch ({cfg.data.batch_size}); lower data.batch_size or data.num_workers")
    return w * per_worker


class EpochChainLoader:
    """Chains epochs of a :class:`StreamingFieldDataset` into one run-long stream of batches.

    The position is derived from the step (epoch = step // steps_per_epoch), so a resumed run
    re-enters the stream exactly where the checkpoint left it without fetching the skipped fields.
    """

    def __init__(self, cfg: Config, source: FieldSource, total_steps: int, spe: int, start_step: int,
                 rank: int, world_size: int, patch_size: int) -> None:
        self.cfg, self.total, self.spe, self.start = cfg, total_steps, spe, start_step
        self.dataset = _stream_dataset(cfg, source, rank, world_size)
        self.collate = _collate_factory(cfg, patch_size)
        self.batch_size = cfg.data.batch_size

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
            for batch in loader:
                yield batch
                step += 1
                if step >= self.total or step % self.spe == 0:
                    break

    def metrics(self) -> dict[str, float]:
        return self.dataset.metrics()
