"""Issue #14 wired into the sources: channel-map origins, illumination correction, scaling modes,
CytoTable tables and 8-bit images (local folders, load_data tables, S3 on a local moto server)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from dinocell.cli import main
from dinocell.config import load_config
from dinocell.data import channels as channels_mod
from dinocell.data.decode import scale_field
from dinocell.data.sources import open_source

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
CPG0000 = SHARED / "jump_cpg0000_BR00117006"
ILLUM_TABLE = SHARED / "jump_cpg0016_load_data" / "BR00126114_load_data_with_illum.parquet"
STAINS = ("AGP", "DNA", "ER", "Mito", "RNA")


def cfg(*overrides: str):
    return load_config(None, list(overrides)).data


# -------------------------------------------------------------------------------------------------
# Channel maps
# -------------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_real_cpg0000_folder_is_assumed_with_one_loud_warning(capsys: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    if not CPG0000.is_dir():
        pytest.skip("needs ../shared/data")
    channels_mod._warned.clear()
    with caplog.at_level(logging.WARNING, logger="dinocell.data.channels"):
        assert main(["data", "ls", str(CPG0000), "--json"]) == 0
        assert main(["data", "ls", str(CPG0000)]) == 0
    info = json.loads(capsys.readouterr().out.splitlines()[0])
    assert info["channel_map_origin"] == "assumed"
    assert info["channel_map"]["1"] == "Mito" and info["channel_map"]["5"] == "DNA"
    assert info["channel_numbers"] == {"DNA": 5, "RNA": 3, "AGP": 2}  # what the files hold
    warnings = [r.getMessage() for r in caplog.records if "CHANNEL MAP ASSUMED" in r.getMessage()]
    assert len(warnings) == 1
    for needle in ("source_4", "data.source_map", "data.channel_map", "data.load_data"):
        assert needle in warnings[0]


def _jump_folder(root: Path, n: int = 2, size: int = 32) -> Path:
    from dinocell.data.synthetic import write_jump_folder

    write_jump_folder(root, n_fields=n, size=size, masks=False)
    return root


def test_origins_channel_map_phenix_index_source_map_load_data(tmp_path: Path) -> None:
    root = _jump_folder(tmp_path / "plain")
    src = open_source(cfg("data.channel_map={1: A, 2: B, 3: C, 4: D, 5: E}"), str(root))
    assert src.channel_map_origin == "channel_map" and src.channels == ["A", "B", "C", "D", "E"]
    src = open_source(cfg("data.source_map=source_4"), str(root))
    assert (src.channel_map_origin, src.channel_map[5]) == ("source_map", "DNA")
    src = open_source(cfg(f"data.load_data={root / 'load_data.csv'}"), str(root))
    assert src.channel_map_origin == "load_data"
    ld = open_source(cfg(), str(root / "load_data.csv"))
    assert ld.describe()["channel_map_origin"] == "load_data"
    # A Harmony index next to the images names the dyes
    images = next(root.glob("*/Images"))
    (images / "Index.idx.xml").write_text(
        '<EvaluationInputData xmlns="http://www.perkinelmer.com/PEHH/HarmonyV5"><Maps><Map>'
        + "".join(f'<Entry ChannelID="{k}"><ChannelName>{d}</ChannelName></Entry>'
                  for k, d in ((1, "Alexa 647"), (2, "Alexa 568"), (3, "488 long"), (4, "Alexa 488"),
                               (5, "HOECHST 33342")))
        + "</Map></Maps></EvaluationInputData>")
    src = open_source(cfg(), str(images))
    assert src.channel_map_origin == "phenix_index" and src.channel_map == {
        1: "Mito", 2: "AGP", 3: "RNA", 4: "ER", 5: "DNA"}


# -------------------------------------------------------------------------------------------------
# Illumination correction
# -------------------------------------------------------------------------------------------------


def _illum_table(tmp_path: Path, illum_dir: str, size: int = 24) -> tuple[Path, dict[str, np.ndarray]]:
    """The real cpg0016 load_data_with_illum rows, rewritten to local images and generated .npy files."""
    df = pd.read_parquet(ILLUM_TABLE)
    img_dir = tmp_path / "images"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for _, row in df.iterrows():
        for s in STAINS:
            tifffile.imwrite(img_dir / row[f"FileName_Orig{s}"],
                             rng.integers(100, 4000, (size, size), dtype=np.uint16))
    funcs = {}
    yy, xx = np.mgrid[0:size, 0:size]
    for i, s in enumerate(STAINS):  # brighter in the centre, like a real illumination function
        funcs[s] = (1.0 + 0.1 * i + np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / size ** 2)).astype(
            np.float32)
    for s in STAINS:
        df[f"PathName_Orig{s}"] = str(img_dir)
        df[f"PathName_Illum{s}"] = illum_dir
    table = tmp_path / "load_data_with_illum.parquet"
    df.to_parquet(table, index=False)
    return table, funcs


@pytest.mark.shared
def test_illumination_correction_before_scaling_local(tmp_path: Path) -> None:
    if not ILLUM_TABLE.is_file():
        pytest.skip("needs ../shared/data")
    table, funcs = _illum_table(tmp_path, "illum")  # relative: resolved against the table's folder
    (tmp_path / "illum").mkdir()
    for s, f in funcs.items():
        np.save(tmp_path / "illum" / f"BR00126114_Illum{s}.npy", f)
    src = open_source(cfg("data.illum=required"), str(table))
    rec = src.records[0]
    raw = src.load_raw(rec)
    want = scale_field(raw / np.stack([funcs[c] for c in src.channels]), src.scaling)
    np.testing.assert_allclose(src.load(rec), want, atol=1e-6)
    assert not np.allclose(src.load(rec), scale_field(raw, src.scaling))
    src.load(src.records[1])
    assert src.illum.cache.reads == len(STAINS)  # once per plate and channel, not per field
    off = open_source(cfg("data.illum=off"), str(table))
    np.testing.assert_allclose(off.load(rec), scale_field(raw, off.scaling), atol=1e-6)
    assert open_source(cfg(), str(table)).describe()["illum"] == "on"


@pytest.mark.shared
def test_missing_illum_file_required_is_one_line_exit_2(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    if not ILLUM_TABLE.is_file():
        pytest.skip("needs ../shared/data")
    table, _ = _illum_table(tmp_path, str(tmp_path / "nowhere"))
    rc = main(["data", "check", str(table), "data.illum=required"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "illumination function not found" in err
    assert "nowhere/BR00126114_Illum" in err


@pytest.mark.shared
def test_illumination_functions_from_s3(moto_url: str, tmp_path: Path) -> None:
    if not ILLUM_TABLE.is_file():
        pytest.skip("needs ../shared/data")
    from s3_fixtures import admin_client, make_public_bucket

    bucket = "illum-test"
    admin = admin_client(moto_url)
    make_public_bucket(admin, bucket)
    table, funcs = _illum_table(tmp_path, f"s3://{bucket}/illum/BR00126114")
    for s, f in funcs.items():
        path = tmp_path / f"{s}.npy"
        np.save(path, f)
        admin.put_object(Bucket=bucket, Key=f"illum/BR00126114/BR00126114_Illum{s}.npy", Body=path.read_bytes())
    df = pd.read_parquet(table)  # images stay local here; the S3 source needs s3:// image folders too
    for s in STAINS:
        for _, row in df.iterrows():
            admin.put_object(Bucket=bucket, Key=f"img/{row[f'FileName_Orig{s}']}",
                             Body=(tmp_path / "images" / row[f"FileName_Orig{s}"]).read_bytes())
        df[f"PathName_Orig{s}"] = f"s3://{bucket}/img/"
    df.to_parquet(table, index=False)
    src = open_source(cfg(f"data.s3.endpoint_url={moto_url}", f"data.load_data={table}", "data.illum=required",
                          f"data.s3.index_cache={tmp_path / 'idx.parquet'}"), f"s3://{bucket}/img/")
    rec = src.records[0]
    raw = src.load_raw(rec)
    want = scale_field(raw / np.stack([funcs[c] for c in src.channels]), src.scaling)
    np.testing.assert_allclose(src.load(rec), want, atol=1e-6)
    assert src.illum.cache.reads == len(STAINS)


# -------------------------------------------------------------------------------------------------
# Scaling modes
# -------------------------------------------------------------------------------------------------


def _two_brightness_folder(root: Path) -> Path:
    """One plate, two fields: the second is the first at half the brightness."""
    img = root / "P1__2024-01-01T00_00_00-Measurement1" / "Images"
    img.mkdir(parents=True)
    rng = np.random.default_rng(1)
    base = rng.integers(200, 3000, (5, 32, 32)).astype(np.uint16)
    for site, arr in ((1, base), (2, base // 2)):
        for ch in range(5):
            tifffile.imwrite(img / f"r01c01f{site:02d}p01-ch{ch + 1}sk1fk1fl1.tiff", arr[ch])
    return root


def test_plate_scaling_keeps_brightness_differences_and_is_cached(tmp_path: Path) -> None:
    root = _two_brightness_folder(tmp_path / "f")
    per_field = open_source(cfg("data.source_map=source_4"), str(root))
    a, b = (per_field.load(r) for r in per_field.records)
    np.testing.assert_allclose(a.mean(), b.mean(), atol=0.02)  # per field: the difference is gone
    stats_file = tmp_path / "stats.json"
    plate = open_source(cfg("data.source_map=source_4", "data.scaling.mode=plate"), str(root))
    plate.stats_path = str(stats_file)
    a, b = (plate.load(r) for r in plate.records)
    assert b.mean() < 0.7 * a.mean()  # per plate: the dim field stays dim
    cached = json.loads(stats_file.read_text())
    assert len(cached) == 1 and next(iter(cached.values()))["n_fields"] == 2
    again = open_source(cfg("data.source_map=source_4", "data.scaling.mode=plate"), str(root))
    again.stats_path = str(stats_file)
    again._compute_plate_stats = None  # type: ignore[assignment]  # must come from the file
    np.testing.assert_allclose(again.load(again.records[0]), a)


def test_fixed_scaling(tmp_path: Path) -> None:
    root = _two_brightness_folder(tmp_path / "f")
    fixed = "{DNA: [0, 4000], RNA: [0, 4000], ER: [0, 4000], AGP: [0, 4000], Mito: [0, 4000]}"
    src = open_source(cfg("data.source_map=source_4", "data.scaling.mode=fixed", f"data.scaling.fixed={fixed}"),
                      str(root))
    raw = src.load_raw(src.records[0])
    np.testing.assert_allclose(src.load(src.records[0]), raw.astype(np.float32) / 4000.0, atol=1e-6)


# -------------------------------------------------------------------------------------------------
# Inputs people have: CytoTable tables, relative folders, 8-bit PNG/JPEG
# -------------------------------------------------------------------------------------------------


def test_cytotable_parquet_with_relative_folders_and_png(tmp_path: Path) -> None:
    img = tmp_path / "images"
    img.mkdir()
    rows = []
    for site in (1, 2):
        row = {"Image_Metadata_Plate": "P1", "Image_Metadata_Well": "B03", "Image_Metadata_Site": str(site)}
        for ch, name in ((5, "DNA"), (3, "RNA")):
            fname = f"r02c03f{site:02d}p01-ch{ch}sk1fk1fl1.png"
            cv2.imwrite(str(img / fname), np.full((16, 16), 20 * ch + site, dtype=np.uint8))
            row[f"Image_FileName_Orig{name}"] = fname
            row[f"Image_PathName_Orig{name}"] = "images"
        rows.append(row)
    table = tmp_path / "cytotable.parquet"
    pd.DataFrame(rows).to_parquet(table, index=False)
    src = open_source(cfg(), str(table))
    assert len(src) == 2 and src.channels == ["DNA", "RNA"] and src.records[0].well == "B03"
    assert src.load_raw(src.records[0]).dtype == np.uint8
    # the same PNGs as a folder: JUMP names ending in .png are recognised
    folder = open_source(cfg("data.source_map=source_4"), str(img))
    assert len(folder) == 2 and folder.channels == ["DNA", "RNA"]
    # a wrong relative folder shows the full path tried
    df = pd.DataFrame(rows)
    df["Image_PathName_OrigDNA"] = "elsewhere"
    df.to_parquet(table, index=False)
    with pytest.raises(Exception, match=str(tmp_path / "elsewhere")):
        open_source(cfg(), str(table))


def test_illum_required_without_a_table_is_a_user_error(tmp_path: Path) -> None:
    from dinocell.errors import UserError

    root = _jump_folder(tmp_path / "plain")
    with pytest.raises(UserError, match="data.illum=required needs a load_data table"):
        open_source(cfg("data.illum=required", "data.source_map=source_4"), str(root))
    assert open_source(cfg("data.source_map=source_4"), str(root)).illum is None  # auto: nothing to do
