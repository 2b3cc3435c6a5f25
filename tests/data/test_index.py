"""The columnar field index, the source registry and the data-correctness fixes of issue #10."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from dinocell.config import load_config
from dinocell.data import jump
from dinocell.data.field import format_name
from dinocell.data.index import IndexBuilder, read_index, write_index
from dinocell.data.registry import register_source, source_kinds
from dinocell.data.sources import FieldDataset, open_source
from dinocell.errors import DataError


def _keys(n_plates: int, wells: int = 4, sites: int = 2, channels: int = 5) -> list[str]:
    out = []
    for p in range(n_plates):
        folder = f"s3://b/cpg0016-jump/source_4/images/B1/images/P{p:03d}__2021-Measurement1/Images"
        for w in range(wells):
            for s in range(1, sites + 1):
                out += [f"{folder}/{format_name(1 + w // 24, 1 + w % 24, s, c)}" for c in range(1, channels + 1)]
    return out


def test_index_is_lazy_columnar_and_round_trips(tmp_path: Path) -> None:
    idx, unparsed = jump.group_files(_keys(3), "source_4")
    assert len(idx) == 3 * 4 * 2 and unparsed == []
    rec = idx[5]
    assert (rec.plate, rec.well, rec.site) == ("P000", "A03", 2)
    assert rec.channels["DNA"].endswith("/Images/r01c03f02p01-ch5sk1fk1fl1.tiff")
    assert [r.key for r in idx] == sorted(r.key for r in idx)
    assert idx.nbytes / len(idx) < 32  # a few small integers per field
    assert all(v.dtype.itemsize <= 4 for v in idx.cols.values())
    sel = idx.take(idx.isin("plate", ["P001"]) & idx.isin("well", ["A02"]))
    assert {(r.plate, r.well) for r in sel} == {("P001", "A02")} and len(sel) == 2
    assert idx.has_channels(["DNA", "Mito"]).all()
    write_index(tmp_path / "i.parquet", idx, {"ident": {"x": 1}})
    back, info = read_index(tmp_path / "i.parquet")
    assert info["ident"] == {"x": 1} and [r for r in back] == [r for r in idx]


def test_builder_with_arbitrary_file_names() -> None:
    b = IndexBuilder()
    b.add_record("P1", "B02", 1, {"R": "/d/x_R.tif", "G": "/d/x_G.tif"}, {"Metadata_Batch": "b1"})
    b.add_record("P1", "A01", 1, {"R": "/e/y_R.tif"})
    idx = b.build()
    assert [r.well for r in idx] == ["A01", "B02"]
    assert idx[0].channels == {"R": "/e/y_R.tif"} and idx[0].metadata["Metadata_Batch"] == ""
    assert idx[1].channels == {"G": "/d/x_G.tif", "R": "/d/x_R.tif"} and idx[1].metadata["Metadata_Batch"] == "b1"
    assert idx.has_channels(["R", "G"]).tolist() == [False, True]


def _write_field(root: Path, plate: str, well: tuple[int, int], site: int, value: int = 100) -> None:
    d = root / f"{plate}__2024-01-01T00_00_00-Measurement1" / "Images"
    d.mkdir(parents=True, exist_ok=True)
    for c in range(1, 6):
        tifffile.imwrite(d / format_name(*well, site, c), np.full((16, 16), value + c, np.uint16))


def test_load_data_metadata_is_keyed_by_plate_well_site(tmp_path: Path) -> None:
    img = tmp_path / "img"
    for plate in ("PA", "PB"):
        _write_field(img, plate, (1, 1), 1)
    names = {"Mito": 1, "AGP": 2, "RNA": 3, "ER": 4, "DNA": 5}
    rows = [{"Metadata_Plate": p, "Metadata_Well": "A01", "Metadata_Site": "1", "Metadata_Compound": cpd,
             **{f"FileName_Orig{n}": format_name(1, 1, 1, c) for n, c in names.items()}}
            for p, cpd in (("PA", "DMSO"), ("PB", "taxol"))]
    table = tmp_path / "load_data.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    before = {k: dict(v) for k, v in jump.CHANNEL_MAPS.items()}
    src = open_source(load_config(None, [f"data.load_data={table}"]).data, str(img))
    got = {r.plate: r.metadata["Metadata_Compound"] for r in src.records}
    assert got == {"PA": "DMSO", "PB": "taxol"}
    assert jump.CHANNEL_MAPS == before  # no run-time mutation of the module's channel maps


def test_nan_field_is_skipped_and_counted(tmp_path: Path) -> None:
    for site, bad in ((1, False), (2, True), (3, False)):
        for ch in ("DNA", "RNA"):
            img = np.random.default_rng(site).random((16, 16)).astype(np.float32)
            if bad and ch == "RNA":
                img[3, 4] = np.nan
            tifffile.imwrite(tmp_path / f"A01_s{site}_{ch}.tif", img)
    cfg = load_config(None, [r"data.pattern=(?P<well>[A-Z]\d+)_s(?P<site>\d+)_(?P<channel>\w+)\.tif"]).data
    src = open_source(cfg, str(tmp_path))
    with pytest.raises(DataError, match="NaN or infinite"):
        src.load(src.records[1])
    ds = FieldDataset(src, None)
    sample = ds[1]
    assert sample["index"] == 2 and len(ds.skipped) == 1
    assert np.isfinite(sample["image"].numpy()).all()


def test_registry_dispatch_and_custom_kind(tmp_path: Path) -> None:
    names = [k.name for k in source_kinds()]
    assert names[0] == "synthetic" and names[-1] == "folder" and {"s3", "load_data"} <= set(names)
    register_source("memo", lambda uri: uri.startswith("memo://"), lambda uri, cfg: ("memo", uri), priority=5)
    try:
        assert open_source(load_config().data, "memo://x") == ("memo", "memo://x")
    finally:
        from dinocell.data import registry

        registry._KINDS.pop("memo")


def test_data_package_imports_without_boto3_and_says_how_to_get_it() -> None:
    code = ("import sys; sys.modules['boto3'] = None; sys.modules['botocore'] = None\n"
            "import dinocell.data.sources, dinocell.data.stream\n"
            "assert 'boto3' not in [m for m, v in sys.modules.items() if v is not None]\n"
            "from dinocell.config import load_config\n"
            "from dinocell.data.s3.config import make_client\n"
            "from dinocell.errors import UserError\n"
            "try:\n    make_client(load_config().data.s3)\nexcept UserError as e:\n    print(e)\n"
            "else:\n    raise SystemExit('make_client without boto3 raised nothing')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr
    assert "pip install 'dinocell[s3]'" in out.stdout and out.stdout.count("\n") == 1  # one line, a UserError


def test_index_is_built_once_under_a_lock_and_reused(tmp_path: Path) -> None:
    """Concurrent processes (threads here: flock locks per open file) build the index once."""
    import threading
    import time

    from dinocell.data.s3.discovery import cached_index

    idx, _ = jump.group_files(_keys(2), "source_4")
    calls: list[list[str] | None] = []

    def build(plates: list[str] | None):
        calls.append(plates)
        time.sleep(0.3)
        return idx, ["one skipped"]

    path = tmp_path / "index.parquet"
    ident = {"uri": "s3://b/p/"}
    out: list[int] = []
    threads = [threading.Thread(target=lambda: out.append(len(cached_index(path, ident, None, build)[0])))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [None] and out == [len(idx)] * 4
    # A plate-pruned index is reused for a subset of its plates and extended for other plates.
    path2 = tmp_path / "pruned.parquet"
    sub = idx.take(idx.isin("plate", ["P000"]))
    calls.clear()
    cached_index(path2, ident, ["P000"], lambda plates: (calls.append(plates), (sub, []))[1])
    cached_index(path2, ident, ["P000"], lambda plates: (calls.append(plates), (sub, []))[1])
    cached_index(path2, ident, ["P001"], lambda plates: (calls.append(plates), (idx, []))[1])
    assert calls == [["P000"], ["P000", "P001"]]
    got, skipped = cached_index(path2, ident, None, lambda plates: (calls.append(plates), (idx, []))[1])
    assert calls[-1] is None and len(got) == len(idx)


# -- issue 24: O(n) builders and a cheap verify ------------------------------------------------------


def test_add_record_is_linear() -> None:
    """A default argument re-allocated per call made ``add_record`` O(n^2): 8x the fields took 60x."""
    import time

    def build(n: int) -> float:
        b = IndexBuilder()
        t0 = time.perf_counter()
        for i in range(n):
            b.add_record(f"P{i // 3456}", f"W{i // 9 % 384}", i % 9 + 1,
                         {c: f"/d/P{i // 3456}/x{i}_{c}.tif" for c in ("A", "B", "C")})
        b.build(sort=False)
        return time.perf_counter() - t0

    build(2000)  # warm-up
    small = min(build(5000) for _ in range(2))
    big = build(40000)
    assert big / small < 24, (small, big)  # linear: ~8; quadratic: ~64


def test_verify_leaves_remote_fields_alone_and_copies_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from dinocell.data.local import IndexSource

    idx, _ = jump.group_files(_keys(4), "source_4")
    src = IndexSource(idx, None, "s3://b/x")
    before = src.records
    with caplog.at_level("INFO"):
        assert src.verify() == []
    assert src.records is before  # no copy of the index
    assert "remote storage are not checked" in caplog.text


def test_verify_drops_fields_of_missing_folders_and_unreadable_files(tmp_path: Path) -> None:
    from dinocell.data.local import IndexSource

    b = IndexBuilder()
    good = tmp_path / "good"
    good.mkdir()
    for s in (1, 2, 3):
        for c in ("A", "B"):
            tifffile.imwrite(good / f"s{s}_{c}.tif", np.ones((8, 8), np.uint16))
        b.add_record("P1", "A01", s, {c: str(good / f"s{s}_{c}.tif") for c in ("A", "B")})
    (good / "s2_B.tif").write_bytes(b"II*\x00broken")
    b.add_record("P1", "A02", 1, {c: str(tmp_path / "gone" / f"x_{c}.tif") for c in ("A", "B")})
    src = IndexSource(b.build(), None, "local")
    bad = src.verify()
    assert [line.split(":")[0] for line in bad] == ["P1/A01/2", "P1/A02/1"]
    assert "folder not found" in bad[1] and "s2_B.tif" in bad[0]
    assert [r.key for r in src.records] == ["P1/A01/1", "P1/A01/3"] and src.skipped == bad
    src.records = src.records.take(np.array([0]))
    (good / "s1_A.tif").write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable field in local"):
        src.verify()


def test_verify_reads_a_spread_sample_of_headers_at_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinocell.data import field
    from dinocell.data.local import IndexSource

    b = IndexBuilder()
    for s in range(1, 41):
        path = tmp_path / f"s{s}.tif"
        tifffile.imwrite(path, np.ones((8, 8), np.uint16))
        b.add_record("P1", "A01", s, {"A": str(path)})
    src = IndexSource(b.build(), None, "local")
    seen: list[str] = []
    monkeypatch.setattr(field, "check_image", lambda p: seen.append(p))
    monkeypatch.setattr(field, "VERIFY_ALL_FILES", 10)
    monkeypatch.setattr(field, "VERIFY_SAMPLE_FIELDS", 5)
    assert src.verify() == [] and len(seen) == 5 and seen[0].endswith("s1.tif") and seen[-1].endswith("s40.tif")


def test_labels_come_from_one_column_not_from_records() -> None:
    from dinocell.data.field import field_labels

    b = IndexBuilder()
    for i, lab in enumerate(["2", "0", "x"]):
        b.add_record("P", "A01", i + 1, {"A": f"/d/{i}.tif"}, {"label": lab})
    idx = b.build()
    assert field_labels(idx).tolist() == [2, 0, -1]
    assert field_labels(jump.group_files(_keys(1), "source_4")[0]) is None
