from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from dinocell.config import HoldoutConfig, load_config, save_config
from dinocell.data.field import FieldRecord
from dinocell.data.holdout import (
    heldout_source,
    heldout_wells,
    read_holdout_file,
    resolve_wells,
    split_indices,
    split_source,
    well_key,
    well_score,
    write_holdout_file,
)
from dinocell.data.sources import open_source
from dinocell.errors import ConfigError, UserError
from tests_tiny import TINY


def _records(plates: int, wells: int, sites: int = 2) -> list[FieldRecord]:
    return [FieldRecord(plate=f"P{p}", well=f"A{w:02d}", site=s)
            for p in range(plates) for w in range(1, wells + 1) for s in range(1, sites + 1)]


def test_fraction_of_wells_per_plate_deterministic_and_order_free() -> None:
    recs = _records(plates=3, wells=20)
    held = heldout_wells(recs, 0.1)
    assert len(held) == 3 * 2
    assert all(sum(w.startswith(f"P{p}/") for w in held) == 2 for p in range(3))
    shuffled = list(recs)
    random.Random(1).shuffle(shuffled)
    assert heldout_wells(shuffled, 0.1) == held  # order of the listing does not matter
    # a plate added later does not move the others' wells
    assert set(held) <= set(heldout_wells(_records(plates=4, wells=20), 0.1))
    # the score is the well's name alone (sha256), the same on every machine
    assert well_score("P0/A01") == well_score("P0/A01") != well_score("P0/A02")
    assert 0.0 <= well_score("P0/A01") < 1.0


def test_edge_cases_never_hold_out_a_whole_plate() -> None:
    assert heldout_wells(_records(plates=2, wells=1), 0.5) == []  # one-well plates stay in training
    assert len(heldout_wells(_records(plates=1, wells=4), 0.1)) == 1  # at least one well
    assert len(heldout_wells(_records(plates=1, wells=2), 0.9)) == 1  # never all of them
    assert heldout_wells(_records(plates=2, wells=8), 0.0) == []
    with pytest.raises(ConfigError, match="data.holdout.fraction"):
        heldout_wells(_records(1, 4), 1.0)


def test_explicit_wells_and_split() -> None:
    recs = _records(plates=2, wells=4)
    wells = resolve_wells(recs, HoldoutConfig(wells=["P1/A03", "P0/A01"]))
    assert wells == ["P0/A01", "P1/A03"]
    train, test = split_indices(recs, wells)
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(len(recs)))
    assert {well_key(recs[i]) for i in test} == set(wells)
    with pytest.raises(ConfigError, match="names no well"):
        resolve_wells(recs, HoldoutConfig(wells=["X/A01"]))


def test_split_source_on_the_synthetic_generator() -> None:
    cfg = load_config(None, TINY + ["data.synthetic.n_fields=64"])
    src = open_source(cfg.data)
    wells = resolve_wells(src.records, cfg.data.holdout)
    train, held = split_source(src, wells)
    assert len(train) + len(held) == len(src) and len(held) > 0
    assert {well_key(r) for r in train.records}.isdisjoint({well_key(r) for r in held.records})
    # held-out fields come from the same generator (same seed), not another one
    rec = held.records[0]
    assert (held.load(rec) == src.load(rec)).all()
    assert held.channels == src.channels and len(src) == 64  # the original is untouched
    with pytest.raises(UserError, match="every field"):
        split_source(src, sorted({well_key(r) for r in src.records}))


def test_heldout_source_of_a_run_folder(tmp_path: Path) -> None:
    cfg = load_config(None, TINY + ["data.synthetic.n_fields=64"])
    save_config(cfg, tmp_path)
    with pytest.raises(UserError, match="holds out no field"):
        write_holdout_file(tmp_path, ["NOPE/A01"])
        heldout_source(tmp_path)
    src = open_source(cfg.data)
    wells = resolve_wells(src.records, cfg.data.holdout)
    write_holdout_file(tmp_path, wells)
    assert read_holdout_file(tmp_path) == wells
    held = heldout_source(tmp_path)
    assert {well_key(r) for r in held.records} == set(wells)
    (tmp_path / "holdout.txt").unlink()  # older run folders: the config's rule decides
    assert [r.key for r in heldout_source(tmp_path).records] == [r.key for r in held.records]
    with pytest.raises(UserError, match="not a run folder"):
        heldout_source(tmp_path / "nothing")


def test_columnar_index_split_matches_the_record_list_and_stays_columnar() -> None:
    """A FieldIndex is split with integer codes (no per-field objects) into the same wells as a list."""
    from dinocell.data.index import FieldIndex, IndexBuilder

    b = IndexBuilder(channels=["DNA"])
    for plate in ("P1", "P2"):
        for well in ("A01", "A02", "B01", "B02", "C01"):
            for site in (1, 2):
                b.add_record(plate, well, site, {"DNA": f"/x/{plate}_{well}_{site}.tif"})
    idx = b.build()
    as_list = list(idx)
    wells = heldout_wells(idx, 0.4)
    assert wells == heldout_wells(as_list, 0.4)
    train, test = split_indices(idx, wells)
    train_l, test_l = split_indices(as_list, wells)
    assert list(train) == list(train_l) and list(test) == list(test_l)

    class Src:
        name, records = "fake", idx

    tr, te = split_source(Src(), wells)
    assert isinstance(tr.records, FieldIndex) and isinstance(te.records, FieldIndex)
    assert {well_key(r) for r in te.records} == set(wells)
    assert len(tr.records) + len(te.records) == len(idx)


def test_one_well_grouping_for_index_and_list() -> None:
    """Issue 22/24: ``well_groups`` is ``FieldIndex.well_rows`` on an index (sorted or not) and groups
    exactly like the generic path over plain records, so the split is the same either way."""
    import numpy as np

    from dinocell.data import jump
    from dinocell.data.field import format_name
    from dinocell.data.holdout import resolve_wells, split_source, well_groups
    from dinocell.data.local import IndexSource

    keys = [f"/d/P{p}__x-Measurement1/Images/{format_name(1 + w // 24, 1 + w % 24, s, c)}"
            for p in range(3) for w in range(20) for s in (1, 2, 3) for c in (1, 5)]
    idx, _ = jump.group_files(keys, "source_4")
    cfg = load_config(None, ["data.holdout.fraction=0.25"])
    for records in (idx, idx.take(np.random.default_rng(1).permutation(len(idx)))):  # sorted, shuffled
        ids, plates, names = well_groups(records)
        as_list = list(records)
        lids, lplates, lnames = well_groups(as_list)
        assert sorted(names) == lnames and len(names) == 60 and sorted(plates) == sorted(lplates)
        assert [names[i] for i in ids] == [lnames[i] for i in lids] == [f"{r.plate}/{r.well}" for r in as_list]
        wells = resolve_wells(records, cfg.data.holdout)
        assert wells == resolve_wells(as_list, cfg.data.holdout) and len(wells) == 15
        train, held = split_source(IndexSource(records, None, "x"), wells)
        assert {f"{r.plate}/{r.well}" for r in held.records} == set(wells)
        assert len(train) + len(held) == len(records)
        assert not {f"{r.plate}/{r.well}" for r in train.records} & set(wells)


def _reference_rule(recs: list[FieldRecord], fraction: float) -> list[str]:
    """The rule as the module doc states it, one plate at a time (the pre-vectorisation code)."""
    by_plate: dict[str, set[str]] = {}
    for r in recs:
        by_plate.setdefault(r.plate, set()).add(f"{r.plate}/{r.well}")
    out: list[str] = []
    for wells in by_plate.values():
        n = len(wells)
        if fraction > 0 and n >= 2:
            out += sorted(wells, key=lambda w: (well_score(w), w))[:min(n - 1, max(1, round(fraction * n)))]
    return sorted(out)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 0.95])
def test_vectorised_rule_equals_the_per_plate_definition(fraction: float) -> None:
    rng = random.Random(7)
    recs = [FieldRecord(plate=f"BR{p:03d}", well=f"{chr(65 + w // 24)}{w % 24 + 1:02d}", site=1)
            for p in range(12) for w in rng.sample(range(384), rng.choice([1, 2, 3, 7, 40, 384]))]
    assert heldout_wells(recs, fraction) == _reference_rule(recs, fraction)


def test_equal_scores_break_ties_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import dinocell.data.holdout as holdout

    monkeypatch.setattr(holdout, "well_hashes", lambda keys, salt="dinocell": np.zeros(len(keys), dtype=np.uint64))
    recs = _records(plates=2, wells=10)
    assert heldout_wells(recs, 0.2) == ["P0/A01", "P0/A02", "P1/A01", "P1/A02"]


def test_the_ranks_of_a_job_share_one_decision_beside_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    import dinocell.data.holdout as holdout
    from dinocell.data.holdout import shared_heldout_wells

    recs, cache = _records(plates=3, wells=20), tmp_path / "index.parquet"
    first = shared_heldout_wells(recs, 0.1, "dinocell", cache)
    assert first == heldout_wells(recs, 0.1) and len(list(tmp_path.glob("index.parquet.holdout-*.txt"))) == 1

    def not_again(*a: object, **k: object) -> list[str]:
        raise AssertionError("the rule ran again although another process decided it")

    monkeypatch.setattr(holdout, "heldout_wells", not_again)
    assert shared_heldout_wells(list(reversed(recs)), 0.1, "dinocell", cache) == first  # read, not recomputed
    with pytest.raises(AssertionError):  # another fraction, salt or set of wells is another decision
        shared_heldout_wells(recs[:-2], 0.1, "dinocell", cache)
    monkeypatch.undo()
    assert shared_heldout_wells(recs, 0.2, "dinocell", cache) == heldout_wells(recs, 0.2)
    assert shared_heldout_wells(recs, 0.1, "other", cache) == heldout_wells(recs, 0.1, "other")
    # an unwritable place computes in the process instead of failing
    assert shared_heldout_wells(recs, 0.1, "dinocell", tmp_path / "missing" / "index.parquet") == first
