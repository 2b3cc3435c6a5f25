"""Field sources: where Cell Painting fields come from, and the map-style dataset over them.

:func:`open_source` dispatches ``data.source`` through the source registry
(:mod:`dinocell.data.registry`): ``synthetic`` (:mod:`~dinocell.data.synth_source`), an ``s3://``
prefix (:mod:`dinocell.data.s3`), a load_data CSV/Parquet or a local folder
(:mod:`~dinocell.data.local`).  Each kind registers itself when its module is imported; this module
imports them all and is the one entry point.  :class:`FieldDataset` turns a source into multi-view
samples, skipping (and counting) bad fields.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dinocell.data import local, s3, synth_source  # noqa: F401  (each registers its source kind)
from dinocell.data.field import FieldRecord, FieldSource, field_labels, select_channels
from dinocell.data.local import IndexSource, folder_source, load_data_source
from dinocell.data.registry import open_registered, register_source, source_kinds
from dinocell.data.synth_source import SyntheticSource
from dinocell.errors import DataError, UserError

__all__ = ["FieldDataset", "FieldRecord", "FieldSource", "IndexSource", "SyntheticSource", "folder_source",
           "load_data_source", "load_resized_fields", "open_source", "register_source", "select_channels",
           "source_kinds"]

log = logging.getLogger(__name__)


def open_source(data_cfg: Any, source: str | None = None) -> FieldSource:
    """Open ``source`` (default ``data_cfg.source``): synthetic, folder, load_data file or s3:// prefix."""
    return open_registered(str(source if source is not None else data_cfg.source), data_cfg)


# --------------------------------------------------------------------------------------------------
# Torch datasets
# --------------------------------------------------------------------------------------------------


class FieldDataset(Dataset):
    """Map-style dataset of multi-view samples; index ``i`` is field ``i // repeats``.

    The repeats of a field (``repeats`` > 1) land in different batches (the trainer's
    :class:`dinocell.train.datamodule.StreamSampler` spreads them); a small cache of decoded fields lets
    them reuse one decode where the loader allows.  A corrupt or missing field is skipped
    (logged once, counted in ``skipped``) and the next field is used instead; if every field fails the
    dataset raises :class:`DataError`.
    """

    def __init__(self, source: FieldSource, transform: Callable[..., dict[str, Any]] | None,
                 repeats: int = 1, seed: int = 0) -> None:
        self.source = source
        self.transform = transform
        self.repeats = max(1, int(repeats))
        self.seed = seed
        self.skipped: dict[str, str] = {}
        self._failed: set[int] = set()  # field indices (no per-field key dict over the whole source)
        self._labels = field_labels(source.records)
        self._cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    def load_field(self, field_idx: int) -> torch.Tensor:
        """Decoded, scaled field as a float tensor (C,H,W); cached for repeated draws."""
        if self._cache is not None and self._cache[0] == field_idx:
            return self._cache[1]
        x = torch.from_numpy(np.ascontiguousarray(self.source.load(self.source.records[field_idx])))
        self._cache = (field_idx, x)
        return x

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """``idx`` may exceed ``len(self)``: :class:`dinocell.train.datamodule.StreamSampler` adds ``stream_pos * len`` so that the
        augmentation seed is a pure function of (seed, epoch, sample), which makes resumed runs
        bit-identical to uninterrupted ones."""
        n = len(self.source)
        field_idx = (idx // self.repeats) % n
        for attempt in range(n):
            fi = (field_idx + attempt) % n
            if fi in self._failed:
                continue
            try:
                x = self.load_field(fi)
            except DataError as e:
                key = self.source.records[fi].key
                self._failed.add(fi)
                self.skipped[key] = str(e)
                self.field_failed(fi)
                log.warning("skipping field %s: %s", key, e)
                continue
            return self._make_sample(x, fi, idx)
        raise DataError(f"every field of {self.source.name} failed to load; first error: "
                        f"{next(iter(self.skipped.values()), 'unknown')}")

    def field_failed(self, field_idx: int) -> None:
        """Hook: field ``field_idx`` failed to load (subclasses count it across workers)."""

    def _make_sample(self, x: torch.Tensor, field_idx: int, idx: int) -> dict[str, Any]:
        if self.transform is None:
            sample: dict[str, Any] = {"image": x}
        else:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + idx) % (2**63 - 1))
            sample = self.transform(x, generator=g)
        sample["index"] = field_idx
        if self._labels is not None and self._labels[field_idx] >= 0:
            sample["label"] = int(self._labels[field_idx])
        return sample


def load_resized_fields(source: FieldSource, n: int, size: int) -> tuple[list[torch.Tensor], list[int]]:
    """Up to ``n`` fields spread evenly over ``source``, resized to ``size``, with their labels (-1 if
    none).  Spread, because neighbouring records are sites of one well (one phenotype); fields that
    fail to load are left out.  Used for diagnostics examples and held-out evaluation."""
    if n < 1 or len(source) == 0:
        return [], []
    picks = np.unique(np.linspace(0, len(source) - 1, min(n, len(source))).astype(int))
    fields, labels = [], []
    for i in picks:
        rec = source.records[i]
        try:
            x = torch.from_numpy(source.load(rec)).float()
        except UserError:  # DataError, or an S3 error surfaced to the user
            continue
        fields.append(F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False)[0])
        labels.append(int(rec.metadata.get("label", -1)))
    return fields, labels
