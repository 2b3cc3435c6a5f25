"""Tests for the synthetic Cell Painting generator and its JUMP-layout export."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from dinocell.config import SyntheticConfig
from dinocell.data.jump import CHANNEL_MAPS, group_files, parse_name
from dinocell.data.synthetic import (
    PHENOTYPES,
    SYNTH_CHANNELS,
    SyntheticCellPainting,
    label_name,
    write_jump_folder,
)
from dinocell.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# determinism, shape, dtype
# --------------------------------------------------------------------------------------------------


def test_channels_order() -> None:
    assert SYNTH_CHANNELS == ("DNA", "ER", "RNA", "AGP", "Mito")


@pytest.mark.parametrize("size", [32, 64, 100])
def test_shape_dtype(size: int) -> None:
    ds = SyntheticCellPainting(n_fields=4, size=size)
    img = ds.field(1)
    assert img.shape == (5, size, size)
    assert img.dtype == np.uint16


def test_deterministic_and_random_access() -> None:
    a = SyntheticCellPainting(n_fields=16, size=64, seed=3)
    b = SyntheticCellPainting(n_fields=16, size=64, seed=3)
    # render in a different order: field i depends only on (seed, i)
    later = b.field(7)
    _ = b.field(2)
    np.testing.assert_array_equal(a.field(7), later)
    np.testing.assert_array_equal(a.field(7), b.field(7))
    assert not np.array_equal(a.field(7), a.field(8))


def test_different_seed_differs() -> None:
    a = SyntheticCellPainting(n_fields=4, size=64, seed=0).field(0)
    b = SyntheticCellPainting(n_fields=4, size=64, seed=1).field(0)
    assert not np.array_equal(a, b)
    # same class (index 0 is control in both), genuinely different layouts
    assert np.mean(a.astype(np.int64) == b.astype(np.int64)) < 0.1


def test_channels_non_trivial() -> None:
    ds = SyntheticCellPainting(n_fields=8, size=96, seed=0)
    for i in range(len(ds)):
        img = ds.field(i).astype(np.float64)
        for c, name in enumerate(SYNTH_CHANNELS):
            ch = img[c]
            lo, hi = np.percentile(ch, [1, 99.9])
            assert hi > 3 * lo, f"field {i} {name}: weak signal ({lo:.0f}..{hi:.0f})"
            assert ch.min() > 0, f"field {i} {name}: clipped at 0 (no camera offset)"
            assert np.mean(ch >= 65535) < 1e-4, f"field {i} {name}: saturated"
            assert ch.max() < 40000
            assert ch.std() > 20


def test_out_of_range_index() -> None:
    ds = SyntheticCellPainting(n_fields=4, size=32)
    with pytest.raises(IndexError, match="out of range"):
        ds.field(4)
    with pytest.raises(IndexError, match="out of range"):
        ds.metadata(-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_classes": 1}, "n_classes"),
        ({"n_classes": 99}, "n_classes"),
        ({"size": 8}, "size"),
        ({"n_fields": 0}, "n_fields"),
        ({"wells_per_plate": 3, "n_classes": 4}, "wells_per_plate"),
        ({"sites_per_well": 0}, "sites_per_well"),
        ({"n_plates": 0}, "n_plates"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SyntheticCellPainting(**kwargs)


def test_from_config() -> None:
    cfg = SyntheticConfig(n_fields=10, size=48, seed=5, n_plates=3, wells_per_plate=6, sites_per_well=2,
                          n_classes=3)
    ds = SyntheticCellPainting.from_config(cfg)
    assert len(ds) == 10
    assert (ds.size, ds.seed, ds.n_plates, ds.wells_per_plate, ds.sites_per_well, ds.n_classes) == (
        48, 5, 3, 6, 2, 3)
    np.testing.assert_array_equal(ds.field(3), SyntheticCellPainting(n_fields=10, size=48, seed=5,
                                                                     n_plates=3, wells_per_plate=6,
                                                                     sites_per_well=2, n_classes=3).field(3))


# --------------------------------------------------------------------------------------------------
# metadata, labels, plate layout
# --------------------------------------------------------------------------------------------------


def test_metadata_keys_and_values() -> None:
    ds = SyntheticCellPainting(n_fields=64, size=64, n_plates=2, wells_per_plate=8, sites_per_well=4)
    md = ds.metadata(0)
    assert md["Metadata_Plate"] == "SYNTH-P01"
    assert md["Metadata_Well"] == "A01"
    assert md["Metadata_Site"] == 1
    assert md["Metadata_Label"] == "control"
    assert md["label"] == 0
    assert md["Metadata_Control"] is True
    # sites fastest, then plates, then wells
    assert ds.metadata(3)["Metadata_Site"] == 4
    assert ds.metadata(4)["Metadata_Plate"] == "SYNTH-P02"
    assert ds.metadata(4)["Metadata_Well"] == "A01"
    md9 = ds.metadata(9)
    assert (md9["Metadata_Plate"], md9["Metadata_Well"], md9["Metadata_Site"]) == ("SYNTH-P01", "A02", 2)
    assert md9["Metadata_Label"] == "pheno1" and md9["label"] == 1 and md9["Metadata_Control"] is False
    # every (plate, well, site) of the nominal layout exactly once
    keys = {(m["Metadata_Plate"], m["Metadata_Well"], m["Metadata_Site"])
            for m in (ds.metadata(i) for i in range(64))}
    assert len(keys) == 64


def test_wells_wrap_rows_and_extra_plates() -> None:
    ds = SyntheticCellPainting(n_fields=60, size=32, n_plates=1, wells_per_plate=26, sites_per_well=1,
                               n_classes=4)
    assert ds.metadata(23)["Metadata_Well"] == "A24"
    assert ds.metadata(24)["Metadata_Well"] == "B01"
    # past the nominal layout: a further plate with the same wells and labels
    assert ds.metadata(26)["Metadata_Plate"] == "SYNTH-P02"
    assert ds.metadata(26)["Metadata_Well"] == "A01"
    assert ds.metadata(26 + 5)["label"] == ds.metadata(5)["label"]


def test_labels_match_metadata_and_are_balanced() -> None:
    ds = SyntheticCellPainting(n_fields=256, size=64)
    labels = ds.labels()
    assert labels.shape == (256,)
    assert [ds.metadata(i)["label"] for i in range(256)] == labels.tolist()
    counts = Counter(labels.tolist())
    assert sorted(counts) == [0, 1, 2, 3]
    assert max(counts.values()) - min(counts.values()) <= 0.05 * len(ds)
    for i in range(0, 256, 17):
        md = ds.metadata(i)
        assert md["Metadata_Label"] == label_name(md["label"])
        assert md["Metadata_Control"] == (md["label"] == 0)


def test_replicate_wells_share_labels_and_controls_present() -> None:
    ds = SyntheticCellPainting(n_fields=64, size=64, n_plates=2, wells_per_plate=8, sites_per_well=4)
    by_well: dict[str, set[int]] = defaultdict(set)
    plates_of_well: dict[str, set[str]] = defaultdict(set)
    control_wells: dict[str, set[str]] = defaultdict(set)
    for i in range(len(ds)):
        md = ds.metadata(i)
        by_well[md["Metadata_Well"]].add(md["label"])
        plates_of_well[md["Metadata_Well"]].add(md["Metadata_Plate"])
        if md["Metadata_Control"]:
            control_wells[md["Metadata_Plate"]].add(md["Metadata_Well"])
    assert all(len(v) == 1 for v in by_well.values())  # one phenotype per well, on every plate
    assert all(len(v) == 2 for v in plates_of_well.values())  # every well replicated on both plates
    assert set(control_wells) == {"SYNTH-P01", "SYNTH-P02"}
    assert all(len(v) >= 2 for v in control_wells.values())


def test_metadata_does_not_render(monkeypatch: pytest.MonkeyPatch) -> None:
    import dinocell.data.synthetic.generator as synth

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendered")

    monkeypatch.setattr(synth, "render_field", boom)
    ds = SyntheticCellPainting(n_fields=32, size=1080)
    assert ds.metadata(5)["label"] == ds.labels()[5]
    from dinocell.config import DataConfig, SyntheticConfig
    from dinocell.data.synth_source import SyntheticSource

    src = SyntheticSource(DataConfig(synthetic=SyntheticConfig(n_fields=32, size=1080)))  # records: no render
    assert src.records[5].metadata["index"] == "5"


def test_records() -> None:
    """The synthetic source's records, one per generator field (the generator itself keeps none)."""
    from dinocell.config import DataConfig, SyntheticConfig
    from dinocell.data.synth_source import SyntheticSource

    recs = SyntheticSource(DataConfig(synthetic=SyntheticConfig(n_fields=8, size=32))).records
    assert len(recs) == 8
    assert len({r.key for r in recs}) == 8
    assert recs[1].plate == "SYNTH-P01" and recs[1].site == 2 and recs[1].channels == {}
    assert recs[1].metadata["Metadata_Label"] == "control"


# --------------------------------------------------------------------------------------------------
# phenotypes are learnable from every single channel
# --------------------------------------------------------------------------------------------------


def _channel_features(ch: np.ndarray) -> np.ndarray:
    """A few handcrafted statistics of one channel after per-field percentile scaling."""
    lo, hi = np.percentile(ch, [1, 99.5])
    x = np.clip((ch - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    u8 = (x * 255).astype(np.uint8)
    thr, fg = cv2.threshold(u8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    n_blobs = cv2.connectedComponents(fg)[0] - 1
    gx, gy = cv2.Sobel(x, cv2.CV_32F, 1, 0), cv2.Sobel(x, cv2.CV_32F, 0, 1)
    fine = x - cv2.GaussianBlur(x, (0, 0), 1.5)
    # structure tensor: local and field-wide orientation coherence (elongated, aligned cells)
    jxx, jxy, jyy = (cv2.GaussianBlur(g, (0, 0), 2.0) for g in (gx * gx, gx * gy, gy * gy))
    local = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-6)
    glob = np.hypot(jxx.mean() - jyy.mean(), 2 * jxy.mean()) / (jxx.mean() + jyy.mean() + 1e-6)
    return np.array([x.mean(), x.std(), fg.mean(), np.log1p(n_blobs), np.abs(gx).mean() + np.abs(gy).mean(),
                     np.abs(fine).mean(), thr / 255.0, local.mean(), glob])


def test_classes_distinguishable_in_every_channel() -> None:
    """Nearest-centroid on per-channel handcrafted features must be far above chance (0.25); observed 0.8-0.95."""
    ds = SyntheticCellPainting(n_fields=160, size=64, seed=11, n_plates=2, wells_per_plate=8,
                               sites_per_well=10)
    labels = ds.labels()
    feats = np.stack([[_channel_features(c) for c in ds.field(i).astype(np.float32)] for i in range(len(ds))])
    plate = np.array([ds.metadata(i)["Metadata_Plate"] for i in range(len(ds))])
    train, test = plate == "SYNTH-P01", plate == "SYNTH-P02"  # train on one plate, test on the other
    for c, name in enumerate(SYNTH_CHANNELS):
        f = feats[:, c]
        mu, sd = f[train].mean(0), f[train].std(0) + 1e-9
        z = (f - mu) / sd
        centroids = np.stack([z[train & (labels == k)].mean(0) for k in range(4)])
        pred = np.argmin(((z[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
        acc = float(np.mean(pred == labels[test]))
        assert acc >= 0.7, f"{name}: nearest-centroid accuracy {acc:.2f}"


def test_phenotype_table() -> None:
    assert PHENOTYPES[0].name == "control"
    assert len({p.name for p in PHENOTYPES}) == len(PHENOTYPES) >= 4
    # the first four classes differ in size, elongation and density
    assert len({p.radius for p in PHENOTYPES[:4]}) == 4
    assert max(p.elongation for p in PHENOTYPES[:4]) > 2 * min(p.elongation for p in PHENOTYPES[:4])


def test_all_classes_render() -> None:
    ds = SyntheticCellPainting(n_fields=8, size=48, n_classes=len(PHENOTYPES), n_plates=1,
                               wells_per_plate=len(PHENOTYPES), sites_per_well=1)
    assert sorted(ds.labels().tolist()) == list(range(len(PHENOTYPES)))
    for i in range(len(ds)):
        assert ds.field(i).std(axis=(1, 2)).min() > 10


# --------------------------------------------------------------------------------------------------
# JUMP export
# --------------------------------------------------------------------------------------------------


def test_write_jump_folder(tmp_path: Path) -> None:
    out = tmp_path / "jump"
    paths = write_jump_folder(out, n_fields=6, size=40, seed=2, n_plates=2, wells_per_plate=4,
                              sites_per_well=2)
    assert len(paths) == 6 * 5
    assert all(p.exists() and p.is_absolute() for p in paths)
    assert not list(out.rglob("*.tmp"))
    names = {p.name for p in paths}
    assert "r01c01f01p01-ch5sk1fk1fl1.tiff" in names  # DNA is ch5 in source_4
    assert paths[0].parent.name == "Images"
    assert paths[0].parent.parent.name == "SYNTH-P01__2024-01-01T00_00_00-Measurement1"

    fields, unparsed = group_files([str(p) for p in paths], source="source_4")
    assert unparsed == []
    assert len(fields) == 6
    ds = SyntheticCellPainting(n_fields=6, size=40, seed=2, n_plates=2, wells_per_plate=4, sites_per_well=2)
    expected = {(m["Metadata_Plate"], m["Metadata_Well"], m["Metadata_Site"]): i
                for i, m in ((i, ds.metadata(i)) for i in range(6))}
    assert {(f.plate, f.well, f.site) for f in fields} == set(expected)
    for rec in fields:
        assert sorted(rec.channels) == sorted(SYNTH_CHANNELS)
        img = ds.field(expected[(rec.plate, rec.well, rec.site)])
        for c, name in enumerate(SYNTH_CHANNELS):
            info = parse_name(rec.channels[name])
            assert info is not None and CHANNEL_MAPS["source_4"][info["channel"]] == name
            with tifffile.TiffFile(rec.channels[name]) as tif:
                page = tif.pages[0]
                assert page.compression == tifffile.COMPRESSION.LZW
                np.testing.assert_array_equal(page.asarray(), img[c])


def test_write_jump_folder_load_data(tmp_path: Path) -> None:
    out = tmp_path / "jump"
    paths = write_jump_folder(out, n_fields=4, size=32, n_plates=2, wells_per_plate=4, sites_per_well=1,
                              workers=2, progress=False)
    with open(out / "load_data.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    for name in SYNTH_CHANNELS:
        assert f"FileName_Orig{name}" in rows[0] and f"PathName_Orig{name}" in rows[0]
    ds = SyntheticCellPainting(n_fields=4, size=32, n_plates=2, wells_per_plate=4, sites_per_well=1)
    for i, row in enumerate(rows):
        md = ds.metadata(i)
        assert row["Metadata_Plate"] == md["Metadata_Plate"]
        assert row["Metadata_Well"] == md["Metadata_Well"]
        assert row["Metadata_Site"] == str(md["Metadata_Site"])
        assert row["Metadata_Label"] == md["Metadata_Label"]
        for name in SYNTH_CHANNELS:
            p = Path(row[f"PathName_Orig{name}"]) / row[f"FileName_Orig{name}"]
            assert Path(row[f"PathName_Orig{name}"]).is_absolute()
            assert p in paths
            np.testing.assert_array_equal(tifffile.imread(p), ds.field(i)[SYNTH_CHANNELS.index(name)])


def test_write_jump_folder_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_jump_folder(tmp_path, n_fields=2, size=32, progress=True)
    assert "synthetic fields" in capsys.readouterr().err


def test_write_jump_folder_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="channel map"):
        write_jump_folder(tmp_path, n_fields=1, size=32, source="source_99")


@pytest.mark.slow
def test_full_size_field(tmp_path: Path) -> None:
    """A JUMP-sized field: realistic cell count, readable back from an LZW TIFF."""
    ds = SyntheticCellPainting(n_fields=4, size=1080, seed=0)
    img = ds.field(0)
    assert img.shape == (5, 1080, 1080) and img.dtype == np.uint16
    dna = img[0].astype(np.float32)
    lo, hi = np.percentile(dna, [1, 99.5])
    fg = ((dna - lo) / (hi - lo) > 0.3).astype(np.uint8)
    n_nuclei = cv2.connectedComponents(fg)[0] - 1
    assert 60 <= n_nuclei <= 600
    paths = write_jump_folder(tmp_path, n_fields=1, size=1080)
    assert len(paths) == 5
    np.testing.assert_array_equal(tifffile.imread(paths[4]), img[4])  # Mito


def test_field_without_cells_renders_background(monkeypatch: pytest.MonkeyPatch) -> None:
    import dinocell.data.synthetic.render as synth

    monkeypatch.setattr(synth, "_place_cells", lambda *a, **k: np.zeros((0, 2)))
    img = SyntheticCellPainting(n_fields=2, size=32).field(0).astype(np.float64)
    assert img.shape == (5, 32, 32)
    # only offset + background photons + noise: no structure above a few hundred counts
    assert 100 < img.mean() < 400 and img.max() < 600


# --------------------------------------------------------------------------------------------------
# instance masks
# --------------------------------------------------------------------------------------------------


def test_masks_do_not_change_the_image() -> None:
    ds = SyntheticCellPainting(n_fields=6, size=64, seed=3)
    for i in range(6):
        img, masks = ds.field_and_masks(i)
        np.testing.assert_array_equal(img, ds.field(i))
        assert set(masks) == {"nuclei", "cells"}
        for m in masks.values():
            assert m.shape == (64, 64) and m.dtype == np.uint16


def test_masks_are_instances_consistent_with_the_stains() -> None:
    ds = SyntheticCellPainting(n_fields=4, size=128, seed=1)
    img, masks = ds.field_and_masks(0)
    cells, nuclei = masks["cells"], masks["nuclei"]
    ids = np.unique(cells[cells > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # consecutive from 1
    assert ids.size >= 10
    # every nucleus lies inside the cell with its number
    assert np.all(cells[nuclei > 0] == nuclei[nuclei > 0])
    # DNA is bright on nuclei, AGP marks cells: foreground brighter than background
    dna, agp = img[0].astype(float), img[3].astype(float)
    assert dna[nuclei > 0].mean() > 2 * dna[cells == 0].mean()
    assert agp[cells > 0].mean() > agp[cells == 0].mean()


def test_write_jump_folder_masks(tmp_path: Path) -> None:
    out = tmp_path / "jump"
    paths = write_jump_folder(out, n_fields=2, size=32, n_plates=1, wells_per_plate=4, sites_per_well=2,
                              masks=True)
    ds = SyntheticCellPainting(n_fields=2, size=32, n_plates=1, wells_per_plate=4, sites_per_well=2)
    with open(out / "load_data.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        _, masks = ds.field_and_masks(i)
        for objects in ("Nuclei", "Cells"):
            p = Path(row[f"PathName_Mask{objects}"]) / row[f"FileName_Mask{objects}"]
            assert p.name == f"r01c01f{i + 1:02d}p01_{objects.lower()}_masks.tif"
            assert p.parent == paths[0].parent
            np.testing.assert_array_equal(tifffile.imread(p), masks[objects.lower()])
    assert len(paths) == 2 * 5  # images only


def test_data_synth_cli_writes_masks(tmp_path: Path) -> None:
    from dinocell.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--fields", "1", "--size", "32"]) == 0
    assert len(list(tmp_path.rglob("*_nuclei_masks.tif"))) == 1
    assert len(list(tmp_path.rglob("*_cells_masks.tif"))) == 1


def test_write_jump_folder_writes_through_the_one_atomic_writer(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from dinocell.paths import DiskFullError

    out = tmp_path / "jump"
    paths = write_jump_folder(out, n_fields=2, size=32, masks=True)
    table = (out / "load_data.csv").read_bytes()
    assert table.count(b"\r\n") == 3 and table.startswith(b"Metadata_Plate,")  # csv's line ends, header + 2 rows
    first = {p: p.read_bytes() for p in out.rglob("*.tif*")}

    def full_disk(path: object, *args: object, **kwargs: object) -> None:
        Path(str(path)).write_bytes(b"half a tiff")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", full_disk)
    with pytest.raises(DiskFullError, match=r"no space left on the disk to write .*\.tif"):
        write_jump_folder(out, n_fields=2, size=32, seed=1, masks=True)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # hidden temp names included
    assert (out / "load_data.csv").read_bytes() == table  # the earlier complete folder is untouched
    assert {p: p.read_bytes() for p in out.rglob("*.tif*")} == first and len(first) == len(paths) + 4
