"""Field sources: where Cell Painting fields come from, and the map-style dataset over them.

:func:`open_source` dispatches ``data.source`` through the source registry
(:mod:`dinocell.data.registry`): ``synthetic`` (:mod:`~dinocell.data.synth_source`), an ``s3://``
prefix (:mod:`dinocell.data.s3`), a load_data CSV/Parquet or a local folder
(:mod:`~dinocell.data.local`).  Each kind registers itself when its module is imported; this module
imports them all and is the one entry point.  :class:`~dinocell.data.stream.FieldDataset` (re-exported
here) turns a source into multi-view samples, skipping (and counting) bad fields.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.data import local, s3, synth_source  # noqa: F401  (each registers its source kind)
from dinocell.data.field import FieldRecord, FieldSource, select_channels
from dinocell.data.local import IndexSource, folder_source, load_data_source
from dinocell.data.registry import open_registered, register_source, source_kinds
from dinocell.data.stream import FieldDataset
from dinocell.data.synth_source import SyntheticSource
from dinocell.errors import UserError

__all__ = ["FieldDataset", "FieldRecord", "FieldSource", "IndexSource", "SyntheticSource", "folder_source",
           "load_data_source", "load_resized_fields", "open_source", "register_source", "select_channels",
           "source_kinds"]

log = logging.getLogger(__name__)


def open_source(data_cfg: Any, source: str | None = None) -> FieldSource:
    """Open ``source`` (default ``data_cfg.source``): synthetic, folder, load_data file or s3:// prefix."""
    return open_registered(str(source if source is not None else data_cfg.source), data_cfg)


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
