"""The training data of a run: a LightningDataModule over a field source.

It owns, in one place, what the rest of the run reads from it:

* the held-out split (``data.holdout``, :mod:`dinocell.data.holdout`): training never reads those wells,
  evaluation (``summary.json``, ``eval/*``) only reads them;
* the run's length: ``steps_per_epoch`` and the schedule horizon ``total_steps = steps_per_epoch x
  epochs`` (``--max-steps`` only stops the Trainer early; it never shortens the cosine schedules);
* the loader: the one sample stream of :mod:`dinocell.data.stream` for every kind of source.

The whole run is one stream of "virtual epochs": sample ``k`` of the stream belongs to virtual epoch
``k // samples_per_epoch`` and its augmentation seed is a pure function of (seed, k).  A resumed run
starts the stream at ``global_step * global_batch`` and therefore sees exactly the batches the
uninterrupted run would have seen: no mid-epoch guesswork from the training loop is needed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import lightning as L
import numpy as np
import torch

from dinocell.config import Config, S3Config
from dinocell.data.field import FieldSource
from dinocell.data.holdout import resolve_wells, split_source
from dinocell.data.masking import collate_multiview
from dinocell.data.stream import FieldDataset, StreamLoader, StreamSampler
from dinocell.data.views import MultiViewAugmentation, crop_scaled_batch_size, gram_crop_size
from dinocell.errors import ConfigError

log = logging.getLogger(__name__)

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
    gram = gram_crop_size(views, cfg.loss)
    for key, size in (("global_crop_size", views.global_crop_size), ("local_crop_size", views.local_crop_size),
                      ("gram_teacher_crop_size", gram or 0)):
        if size % cfg.model.patch_size:
            raise ConfigError(f"config key 'data.views.{key}' ({size}) must be a multiple of "
                              f"model.patch_size ({cfg.model.patch_size})")
    return MultiViewAugmentation(views, fluorescent, gram_crop_size=gram)


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
                 batch_size: int | None = None) -> StreamLoader:
    """The training loader from ``start_step`` to ``total_steps`` for this rank: the one sample stream
    (:mod:`dinocell.data.stream`) for every kind of source (``batch_size``: the per-device batch,
    :attr:`DinoCellDataModule.batch_size`; default ``data.batch_size``)."""
    bs = batch_size or cfg.data.batch_size
    global_batch = bs * world_size
    samples_per_epoch = spe * global_batch
    transforms = [(0, build_views(cfg, list(source.fluorescent)))]
    if cfg.train.run_high_res_stage and cfg.train.high_res_epochs > 0:
        switch_epoch = max(0, cfg.train.epochs - cfg.train.high_res_epochs)
        transforms.append((switch_epoch * samples_per_epoch, build_views(cfg, list(source.fluorescent), True)))
    workers = cfg.data.num_workers
    dataset = FieldDataset(source, transforms, repeats=cfg.data.repeats, seed=cfg.train.seed, cache_fields=bs)
    sampler = StreamSampler(len(source), cfg.data.repeats, samples_per_epoch, total_steps * global_batch,
                            seed=cfg.train.seed, start=start_step * global_batch, batch_size=bs,
                            rank=rank, world_size=world_size, workers=workers)
    return StreamLoader(dataset, batch_size=bs, sampler=sampler, drop_last=True, num_workers=workers,
                        collate_fn=_collate_factory(cfg, patch_size or cfg.model.patch_size),
                        persistent_workers=False, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=4 if workers > 0 else None)


# --------------------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------------------


class DinoCellDataModule(L.LightningDataModule):
    """Sources, held-out split, run length and loaders of one run (see module doc).

    ``source`` is the whole source; ``wells`` the held-out ``PLATE/WELL`` keys (``None``: decided here
    from ``data.holdout``).  ``world_size`` is the Trainer's (devices x nodes): the run length depends on
    it, and the LightningModule's schedules are built from :attr:`steps_per_epoch` / :attr:`total_steps`.
    """

    def __init__(self, cfg: Config, source: FieldSource, world_size: int = 1,
                 wells: list[str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # the whole source is not kept: its index is the largest object of a rank, and once split only
        # the two subsets are read (one copy of the index per rank when the caller lets go of it too)
        self._listed_skipped = sum(1 for s in source.skipped if not str(s).endswith("name not recognised"))
        if wells is None:  # sources with an index file (S3) share the rule's result between ranks
            wells = resolve_wells(source.records, cfg.data.holdout, cache=getattr(source, "index_path", None))
        self.heldout_wells = list(wells)
        self.train_source, self.heldout = split_source(source, self.heldout_wells)
        self.world_size = max(1, int(world_size))
        self.steps_per_epoch = steps_per_epoch(cfg, len(self.train_source), self.world_size)
        if cfg.data.s3.shuffle_buffer != S3Config().shuffle_buffer:
            log.warning("data.s3.shuffle_buffer is no longer used: every source trains on one sample stream "
                        "whose sampler shuffles (docs/streaming.md)")
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
        self._loader: StreamLoader | None = None

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
        if self._loader is None:
            return self._listed_skipped
        return self._listed_skipped + self._loader.dataset.skipped_count()  # type: ignore[attr-defined]
