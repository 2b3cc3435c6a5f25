"""Per-plate and fixed intensity scaling keep differences between wells that per-field scaling erases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinocell.config import ScalingConfig, load_config
from dinocell.data.intensity import (
    PlateStats,
    fixed_ranges,
    plate_statistics,
    sample_indices,
    scale,
    scale_range,
)
from dinocell.errors import ConfigError, DataError


def _field(level: int, rng: np.random.Generator) -> np.ndarray:
    """Two channels of noise around ``level`` (uint16)."""
    return np.clip(rng.normal(level, 20, (2, 64, 64)), 0, 65535).astype(np.uint16)


def test_plate_mode_keeps_a_brighter_well_brighter() -> None:
    rng = np.random.default_rng(0)
    dim, bright = _field(1000, rng), _field(2000, rng)
    cfg = ScalingConfig(mode="plate")
    stats = plate_statistics([dim, bright, _field(1500, rng)], ["DNA", "RNA"], "P1")
    a, b = scale(dim, ["DNA", "RNA"], cfg, stats), scale(bright, ["DNA", "RNA"], cfg, stats)
    assert b.mean() - a.mean() > 0.3  # the doubling survives
    per_field = ScalingConfig()
    assert abs(scale(bright, ["DNA", "RNA"], per_field).mean()
               - scale(dim, ["DNA", "RNA"], per_field).mean()) < 0.05  # ... and per-field scaling erases it
    assert a.dtype == np.float32 and 0.0 <= a.min() and b.max() <= 1.0


def test_stats_round_trip_and_lookup() -> None:
    rng = np.random.default_rng(1)
    stats = plate_statistics([_field(500, rng) for _ in range(3)], ["DNA", "RNA"], "P1", 1.0, 99.0)
    assert stats.n_fields == 3 and stats.low[0] < 500 < stats.high[0]
    back = PlateStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert back == stats
    with pytest.raises(DataError, match="no channel Mito"):
        stats.range_of("Mito")
    with pytest.raises(DataError, match="no field"):
        plate_statistics([], ["DNA"], "P2")
    with pytest.raises(DataError, match="expected"):
        plate_statistics([np.zeros((3, 4, 4))], ["DNA"], "P2")
    with pytest.raises(DataError, match="needs the plate"):
        scale(_field(1, rng), ["DNA", "RNA"], ScalingConfig(mode="plate"))


def test_fixed_ranges_and_scale_range() -> None:
    raw = np.array([[[0, 100, 200, 300]], [[0, 50, 100, 150]]], dtype=np.uint16)
    cfg = ScalingConfig(mode="fixed", fixed={"dna": [100.0, 300.0], "RNA": [0.0, 100.0]})
    out = scale(raw, ["DNA", "RNA"], cfg)
    assert out[0, 0].tolist() == [0.0, 0.0, 0.5, 1.0] and out[1, 0].tolist() == [0.0, 0.5, 1.0, 1.0]
    # float input (after illumination correction) takes the arithmetic path to the same numbers
    assert np.allclose(scale(raw.astype(np.float32), ["DNA", "RNA"], cfg), out)
    assert scale_range(np.arange(4, dtype=np.uint8).reshape(2, 2), 3, 3).max() == 0.0
    with pytest.raises(DataError, match="no range for channel Mito"):
        fixed_ranges({"DNA": [0, 1]}, ["DNA", "Mito"])
    with pytest.raises(DataError, match="low < high"):
        fixed_ranges({"DNA": [5, 1]}, ["DNA"])
    assert sample_indices(100, 4).tolist() == [0, 33, 66, 99] and sample_indices(2, 16).tolist() == [0, 1]


def test_config_keys() -> None:
    cfg = load_config(None, ["data.scaling.mode=fixed", "data.scaling.fixed={DNA: [100, 4000]}"])
    assert cfg.data.scaling.fixed == {"DNA": [100.0, 4000.0]} and cfg.data.scaling.plate_sample_fields == 16
    with pytest.raises(ConfigError, match="needs data.scaling.fixed"):
        load_config(None, ["data.scaling.mode=fixed"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["data.scaling.mode=well"])
    with pytest.raises(ConfigError, match="low < high"):
        load_config(None, ["data.scaling.fixed={DNA: [5, 1]}"])
