"""Intensity scaling that keeps differences between wells: per-plate and fixed ranges.

Per-field percentile scaling (``data.scaling.mode=field``, the default, :func:`dinocell.data.decode.scale_field`)
maps every field to [0, 1] on its own, which is what pretraining wants, but it erases the thing a
profiling scientist often measures: a compound that doubles the DNA stain looks the same as DMSO.
Two alternatives keep that difference:

* ``plate``: the [low, high] percentiles of each channel are taken once from a sample of the plate's
  fields (``plate_sample_fields``, spread over the plate) and used for every field of the plate.
  :class:`PlateStats` is plain data (``to_dict``/``from_dict``) so the index can cache it.
* ``fixed``: the user gives [low, high] raw levels per channel name (``data.scaling.fixed``), the
  same for every plate — comparable across plates and runs.

Inputs are raw (C,H,W) fields, after illumination correction if any (:mod:`dinocell.data.illum`), so
they are uint8/uint16 or float32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dinocell.data.decode import scale_field, scale_range
from dinocell.errors import DataError
from dinocell.paths import write_text_atomic
from dinocell.scaling import fixed_ranges  # the one implementation (models.loading applies it too)

#: Pixels kept per channel per sampled field when pooling a plate's statistics (every k-th pixel):
#: 16 fields x 65k pixels estimate the 0.1/99.9 percentiles of a plate to well under a grey level.
SAMPLE_PIXELS = 65536


@dataclass
class PlateStats:
    """[low, high] raw levels per channel of one plate, and how they were obtained."""

    plate: str
    channels: list[str]
    low: list[float]
    high: list[float]
    low_percentile: float
    high_percentile: float
    n_fields: int

    def range_of(self, channel: str) -> tuple[float, float]:
        if channel not in self.channels:
            raise DataError(f"plate statistics of {self.plate} have no channel {channel} "
                            f"(have {', '.join(self.channels)})")
        i = self.channels.index(channel)
        return self.low[i], self.high[i]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlateStats:
        return cls(plate=str(d["plate"]), channels=[str(c) for c in d["channels"]],
                   low=[float(v) for v in d["low"]], high=[float(v) for v in d["high"]],
                   low_percentile=float(d["low_percentile"]), high_percentile=float(d["high_percentile"]),
                   n_fields=int(d["n_fields"]))


def sample_indices(n_fields: int, k: int) -> np.ndarray:
    """``k`` field indices spread evenly over ``n_fields`` (neighbouring fields are sites of one well)."""
    if n_fields < 1:
        return np.zeros(0, dtype=int)
    return np.unique(np.linspace(0, n_fields - 1, min(k, n_fields)).round().astype(int))


def _subsample(channel: np.ndarray) -> np.ndarray:
    step = max(1, int(np.sqrt(channel.size / SAMPLE_PIXELS)))
    return channel[::step, ::step].ravel()


def plate_statistics(fields: Iterable[np.ndarray], channels: Sequence[str], plate: str,
                     low_percentile: float = 0.1, high_percentile: float = 99.9) -> PlateStats:
    """Percentiles of each channel pooled over ``fields`` (raw (C,H,W) arrays of one plate).

    Computed once per plate, so ``np.percentile`` on the pooled sample is cheap enough; the
    per-field path keeps its histogram shortcut in :mod:`dinocell.data.decode`.
    """
    pooled: list[list[np.ndarray]] = [[] for _ in channels]
    n = 0
    for f in fields:
        if f.ndim != 3 or f.shape[0] != len(channels):
            raise DataError(f"plate {plate}: expected ({len(channels)},H,W) fields, got {f.shape}")
        for c in range(len(channels)):
            pooled[c].append(_subsample(f[c]).astype(np.float32))
        n += 1
    if n == 0:
        raise DataError(f"plate {plate}: no field to compute intensity statistics from")
    lows, highs = [], []
    for c in range(len(channels)):
        lo, hi = np.percentile(np.concatenate(pooled[c]), [low_percentile, high_percentile])
        lows.append(float(lo))
        highs.append(float(hi))
    return PlateStats(plate, list(channels), lows, highs, low_percentile, high_percentile, n)


def scale_with_ranges(raw: np.ndarray, ranges: Sequence[tuple[float, float]], cfg: Any) -> np.ndarray:
    """Scale a (C,H,W) field channel by channel with the given ranges (+ CLAHE when configured)."""
    return scale_field(raw, cfg, ranges)


def field_ranges(cfg: Any, channels: Sequence[str],
                 stats: PlateStats | None = None) -> list[tuple[float, float]] | None:
    """The [low, high] levels ``cfg.mode`` gives each channel; None for ``field`` (own percentiles)."""
    mode = getattr(cfg, "mode", "field")
    if mode == "field":
        return None
    if mode == "plate":
        if stats is None:
            raise DataError("data.scaling.mode=plate needs the plate's intensity statistics")
        return [stats.range_of(c) for c in channels]
    if mode == "fixed":
        return fixed_ranges(cfg.fixed, channels)
    raise DataError(f"data.scaling.mode must be field, plate or fixed; got '{mode}'")


def scale(raw: np.ndarray, channels: Sequence[str], cfg: Any, stats: PlateStats | None = None) -> np.ndarray:
    """Scale a raw field by ``cfg.mode`` (a :class:`dinocell.config.ScalingConfig`).

    ``field`` calls the per-field percentile scaling unchanged; ``plate`` needs the plate's
    :class:`PlateStats`; ``fixed`` reads ``cfg.fixed``.
    """
    return scale_field(raw, cfg, field_ranges(cfg, channels, stats))


def stats_key(plate: str, channels: Sequence[str], cfg: Any, illum: bool) -> str:
    """What a cached :class:`PlateStats` was computed for (a changed setting recomputes it)."""
    return (f"{plate}|{','.join(channels)}|{cfg.low_percentile}|{cfg.high_percentile}|"
            f"n={cfg.plate_sample_fields}|illum={int(bool(illum))}")


def read_stats_file(path: str | os.PathLike[str] | None) -> dict[str, PlateStats]:
    """The ``{key: PlateStats}`` of a JSON stats file (missing or unreadable: empty; it is only a cache)."""
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            raw = json.load(f)
        return {k: PlateStats.from_dict(v) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_stats_file(path: str | os.PathLike[str], stats: Mapping[str, PlateStats]) -> None:
    """Merge ``stats`` into the JSON file at ``path`` (atomically: temp file + ``os.replace``)."""
    merged = {k: v.to_dict() for k, v in read_stats_file(path).items()}
    merged.update({k: v.to_dict() for k, v in stats.items()})
    write_text_atomic(path, json.dumps(merged, indent=1, sort_keys=True), unique=True)


__all__ = ["PlateStats", "field_ranges", "fixed_ranges", "plate_statistics", "read_stats_file", "sample_indices",
           "scale", "scale_range", "scale_with_ranges", "stats_key", "write_stats_file"]
