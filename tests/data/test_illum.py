"""Illumination correction: the real cpg0016 load_data_with_illum table, generated .npy functions."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinocell.data.illum import IllumCache, IllumCorrection, apply_illum, illum_channels, illum_paths
from dinocell.errors import DataError, UserError

TABLE = Path(__file__).resolve().parents[2] / "../shared/data/jump_cpg0016_load_data/BR00126114_load_data_with_illum.parquet"
STAINS = ["AGP", "DNA", "ER", "Mito", "RNA"]


@pytest.fixture
def table() -> pd.DataFrame:
    if not TABLE.exists():
        pytest.skip("../shared fixture data not present")
    return pd.read_parquet(TABLE)


def _write_functions(df: pd.DataFrame, folder: Path, shape: tuple[int, int] = (4, 6)) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    funcs = {}
    for i, name in enumerate(STAINS):
        f = np.linspace(1.0, 2.0 + i, shape[0] * shape[1]).reshape(shape)  # float64, as CellProfiler saves
        np.save(folder / df[f"FileName_Illum{name}"].iloc[0], f)
        funcs[name] = f
    return funcs


def test_real_table_paths(table: pd.DataFrame) -> None:
    assert sorted(illum_channels(table)) == STAINS
    paths = illum_paths(table)
    assert set(paths) == {("BR00126114", n) for n in STAINS}
    assert paths["BR00126114", "DNA"] == ("s3://cellpainting-gallery/cpg0016-jump/source_4/images/"
                                          "2021_08_23_Batch12/illum/BR00126114/BR00126114_IllumDNA.npy")
    # CytoTable's Image_-prefixed form names the same files
    prefixed = table.rename(columns={c: "Image_" + c for c in table.columns})
    assert illum_paths(prefixed) == paths


def test_correction_reads_each_function_once(table: pd.DataFrame, tmp_path: Path) -> None:
    funcs = _write_functions(table, tmp_path / "illum")
    df = table.copy()
    for n in STAINS:
        df[f"PathName_Illum{n}"] = str(tmp_path / "illum")
    corr = IllumCorrection.from_table(df, "required")
    raw = np.full((2, 4, 6), 1000, dtype=np.uint16)
    out = corr(raw, "BR00126114", ["DNA", "Mito"])
    assert out.dtype == np.float32
    assert np.allclose(out[0], 1000 / funcs["DNA"]) and np.allclose(out[1], 1000 / funcs["Mito"])
    for _ in range(3):  # every row of the plate reuses the cached functions
        corr(raw, "BR00126114", ["DNA", "Mito"])
    assert corr.cache.reads == 2
    # relative PathName folders resolve against the table's folder
    rel = table.copy()
    for n in STAINS:
        rel[f"PathName_Illum{n}"] = "illum"
    assert IllumCorrection.from_table(rel, "required", base=str(tmp_path)).function("BR00126114", "ER") is not None


def test_modes_when_files_are_missing(table: pd.DataFrame, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    df = table.copy()
    for n in STAINS:
        df[f"PathName_Illum{n}"] = str(tmp_path / "nowhere")
    raw = np.ones((1, 4, 6), dtype=np.uint16)
    with pytest.raises(UserError, match=r"not found: .*nowhere/BR00126114_IllumDNA\.npy"):
        IllumCorrection.from_table(df, "required")(raw, "BR00126114", ["DNA"])
    with caplog.at_level(logging.WARNING, logger="dinocell.data.illum"):
        auto = IllumCorrection.from_table(df, "auto")
        assert auto(raw, "BR00126114", ["DNA"]) is raw
        assert auto(raw, "BR00126114", ["RNA"]) is raw
    assert sum("illumination correction skipped" in r.message for r in caplog.records) == 1
    assert not IllumCorrection.from_table(df, "off").active
    no_cols = df[[c for c in df.columns if "Illum" not in c]]
    with pytest.raises(UserError, match="no FileName_Illum"):
        IllumCorrection.from_table(no_cols, "required")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinocell.data.illum"):
        assert not IllumCorrection.from_table(no_cols, "auto").active  # a plain table is not a problem
    assert not caplog.records
    with pytest.raises(UserError, match="data.illum"):
        IllumCorrection({}, "sometimes")


def test_apply_illum_guards_bad_values() -> None:
    raw = np.full((2, 3), 100, dtype=np.uint16)
    illum = np.array([[2.0, 0.0, np.nan], [np.inf, -1.0, 4.0]])
    out = apply_illum(raw, illum)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert out.tolist() == [[50.0, 100.0, 100.0], [100.0, 100.0, 25.0]]
    with pytest.raises(DataError, match="shape"):
        apply_illum(raw, np.ones((3, 2)))


def test_cache_is_bounded_by_bytes(tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"f{i}.npy", np.full((16, 16), i + 1.0))
    cache = IllumCache(max_bytes=2 * 16 * 16 * 4)  # room for two float32 functions
    for i in (0, 1, 0, 2, 0):
        assert cache.get(str(tmp_path / f"f{i}.npy"))[0, 0] == i + 1
    assert cache.nbytes <= cache.max_bytes and cache.reads == 3  # f0 stayed hot, f1 was evicted
    np.save(tmp_path / "bad.npy", np.ones(3))
    with pytest.raises(DataError, match="2-D"):
        cache.get(str(tmp_path / "bad.npy"))
    seen = []
    custom = IllumCache(read_bytes=lambda p: (seen.append(p), (tmp_path / "f0.npy").read_bytes())[1])
    custom.get("s3://bucket/illum/P/P_IllumDNA.npy")
    assert seen == ["s3://bucket/illum/P/P_IllumDNA.npy"]
