"""Which fields `evaluate` / `embed` score by default: the run's held-out wells, never its training fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinocell.data.holdout import read_holdout_file, well_key
from dinocell.evaluate.embed import eval_source
from dinocell.models.loading import load_model
from dinocell.train.run import pretrain
from tests_tiny import TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dinocell.config import load_config

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY, "data.synthetic.n_fields=64", "track.logger=none", "train.eval_fields=0"])
    pretrain(cfg, out, max_steps=2)
    return out


def test_default_is_the_runs_heldout_wells(run_dir: Path) -> None:
    m = load_model(run_dir)
    src, desc, n = eval_source(m, None)
    wells = set(read_holdout_file(run_dir) or [])
    assert wells and n == len(src.records) > 0
    assert {well_key(r) for r in src.records} <= wells  # nothing the training stream read
    assert "held-out wells" in desc


def test_explicit_data_wins(run_dir: Path) -> None:
    m = load_model(run_dir)
    src, desc, n = eval_source(m, "synthetic")
    assert n is None and desc.startswith("synthetic")
    assert len(src.records) > 0
