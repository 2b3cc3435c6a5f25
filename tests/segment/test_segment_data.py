"""Annotated fields: masks from the synthetic source, beside images, in load_data columns."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dinocell.config import DataConfig, SyntheticConfig
from dinocell.data.sources import open_source
from dinocell.data.synthetic import SyntheticCellPainting, write_jump_folder
from dinocell.errors import DataError
from dinocell.segment.data import CropDataset, MaskFinder, as_instances, input_plane, iter_annotated
from dinocell.segment.targets import flow_field, make_targets

GEN = dict(n_fields=4, size=32, n_plates=1, wells_per_plate=4, sites_per_well=1)


@pytest.fixture(scope="module")
def jump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("jump")
    write_jump_folder(out, masks=True, **GEN)
    return out


def _truth(i: int, objects: str) -> np.ndarray:
    return SyntheticCellPainting(**GEN).field_and_masks(i)[1][objects]


def test_synthetic_source_gives_masks() -> None:
    cfg = DataConfig(synthetic=SyntheticConfig(**GEN))
    src = open_source(cfg)
    got = list(iter_annotated(src, MaskFinder.for_source(src, "cells", "synthetic")))
    assert len(got) == 4
    rec, planes, labels = got[2]
    assert planes.shape == (5, 32, 32) and planes.dtype == np.float32
    np.testing.assert_array_equal(labels, _truth(2, "cells"))


@pytest.mark.parametrize("objects", ["nuclei", "cells"])
def test_masks_beside_jump_images(jump: Path, objects: str) -> None:
    src = open_source(DataConfig(), str(jump))
    got = list(iter_annotated(src, MaskFinder.for_source(src, objects, str(jump))))
    assert len(got) == 4
    ds = SyntheticCellPainting(**GEN)
    index = {(m["Metadata_Well"], m["Metadata_Site"]): i for i, m in ((i, ds.metadata(i)) for i in range(4))}
    for rec, _, labels in got:
        np.testing.assert_array_equal(labels, _truth(index[(rec.well, rec.site)], objects))


def test_masks_from_load_data_columns(jump: Path, tmp_path: Path) -> None:
    # move the masks elsewhere: only the load_data columns can find them now
    rows = list(csv.DictReader(open(jump / "load_data.csv", newline="")))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for row in rows:
        src = Path(row["PathName_MaskNuclei"]) / row["FileName_MaskNuclei"]
        (moved / ("x_" + src.name)).write_bytes(src.read_bytes())
        row["PathName_MaskNuclei"], row["FileName_MaskNuclei"] = str(moved), "x_" + src.name
    table = tmp_path / "load_data.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    src = open_source(DataConfig(), str(table))
    finder = MaskFinder.for_source(src, "nuclei", str(table))
    got = list(iter_annotated(src, finder))
    assert len(got) == 4
    assert all(finder.find(rec).startswith(str(moved)) for rec, _, _ in got)  # type: ignore[union-attr]


def test_no_masks_is_a_data_error(tmp_path: Path) -> None:
    write_jump_folder(tmp_path, **GEN)  # images only
    src = open_source(DataConfig(), str(tmp_path))
    with pytest.raises(DataError, match="no nuclei masks found"):
        list(iter_annotated(src, MaskFinder.for_source(src, "nuclei", str(tmp_path))))


def test_mask_shape_mismatch_is_a_data_error(tmp_path: Path) -> None:
    write_jump_folder(tmp_path, masks=True, **GEN)
    for p in tmp_path.rglob("*_nuclei_masks.tif"):
        tifffile.imwrite(p, np.zeros((16, 16), np.uint16))
    src = open_source(DataConfig(), str(tmp_path))
    with pytest.raises(DataError, match="shape"):
        list(iter_annotated(src, MaskFinder.for_source(src, "nuclei", str(tmp_path))))


def test_binary_mask_becomes_components(caplog: pytest.LogCaptureFixture) -> None:
    m = np.zeros((10, 10), np.uint8)
    m[1:3, 1:3] = 255
    m[6:9, 5:9] = 255
    with caplog.at_level(logging.WARNING):
        lab = as_instances(m, "x.png")
    assert lab.max() == 2 and "binary" in caplog.text
    multi = np.array([[0, 1], [2, 2]], np.uint16)
    np.testing.assert_array_equal(as_instances(multi, "y"), multi)


def test_input_plane() -> None:
    planes = np.stack([np.full((4, 4), v, np.float32) for v in (0.1, 0.2, 0.3)])
    assert input_plane(planes, ["DNA", "AGP", "Brightfield"], [True, True, False], "agp")[0, 0] == pytest.approx(0.2)
    assert input_plane(planes, ["DNA", "AGP", "Brightfield"], [True, True, False], "mean")[0, 0] == pytest.approx(0.15)
    with pytest.raises(DataError, match="unknown channel 'RNA'"):
        input_plane(planes, ["DNA", "AGP", "Brightfield"], [True, True, False], "RNA")


def test_crop_dataset_flows_follow_flips_and_turns() -> None:
    yy, xx = np.mgrid[:24, :24]
    lab = (((yy - 9) / 6.0) ** 2 + ((xx - 13) / 4.0) ** 2 <= 1).astype(np.uint16)
    t = make_targets(lab, flows=True)
    ds = CropDataset([lab.astype(np.float32)], [t], crop=24, length=16, seed=0)
    for i in range(16):
        s = ds[i]
        img, tgt = s["image"][0].numpy(), s["target"].numpy()
        np.testing.assert_array_equal(tgt[1], img)  # image and targets moved together
        expected = flow_field(tgt[0])
        inside = tgt[1] > 0
        assert np.abs(tgt[2:][:, inside] - expected[:, inside]).max() < 1e-4


def _index() -> dict[tuple[str, int], int]:
    ds = SyntheticCellPainting(**GEN)
    return {(m["Metadata_Well"], int(m["Metadata_Site"])): i for i, m in ((i, ds.metadata(i)) for i in range(4))}


@pytest.mark.parametrize("folder", ["masks", "Images_masks", "Images/masks"])
def test_cellprofiler_mask_names_in_sibling_folders(tmp_path: Path, folder: str) -> None:
    write_jump_folder(tmp_path, masks=True, **GEN)
    for p in list(tmp_path.rglob("*_nuclei_masks.tif")):
        # CellProfiler's SaveImages: <DNA image stem>_MaskNuclei.tiff, here in a sibling folder
        dest = p.parent.parent / folder / p.name.replace("_nuclei_masks.tif", "-ch5sk1fk1fl1_MaskNuclei.tiff")
        dest.parent.mkdir(parents=True, exist_ok=True)
        p.rename(dest)
    src = open_source(DataConfig(), str(tmp_path))
    finder = MaskFinder.for_source(src, "nuclei", str(tmp_path))
    got = list(iter_annotated(src, finder))
    assert len(got) == 4
    index = _index()
    for rec, _, labels in got:
        assert finder.find(rec).endswith("_MaskNuclei.tiff")  # type: ignore[union-attr]
        np.testing.assert_array_equal(labels, _truth(index[(rec.well, rec.site)], "nuclei"))


def test_relative_mask_paths_resolve_against_the_table(jump: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rows = list(csv.DictReader(open(jump / "load_data.csv", newline="")))
    home = tmp_path / "project"
    (home / "labels").mkdir(parents=True)
    for row in rows:
        src = Path(row["PathName_MaskNuclei"]) / row["FileName_MaskNuclei"]
        (home / "labels" / src.name).write_bytes(src.read_bytes())
        row["PathName_MaskNuclei"] = "labels"  # relative: to the table's folder (CellProfiler convention)
        row["FileName_MaskCells"] = "labels/none.tif"
        row["PathName_MaskCells"] = ""
    table = home / "load_data.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # not the table's folder
    src = open_source(DataConfig(), str(table))
    finder = MaskFinder.for_source(src, "nuclei", str(table))
    assert len(list(iter_annotated(src, finder))) == 4
    rec = src.records[0]
    assert finder.find(rec) == str(home / "labels" / f"{Path(rows[0]['FileName_MaskNuclei']).name}")
    cells = MaskFinder.for_source(src, "cells", str(table))
    assert cells.candidates(rec)[0] == str(home / "labels" / "none.tif")  # bare names too


def test_binary_masks_are_reported_once_per_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_jump_folder(tmp_path, masks=True, **GEN)
    for p in tmp_path.rglob("*_nuclei_masks.tif"):
        tifffile.imwrite(p, (tifffile.imread(p) > 0).astype(np.uint8) * 255)
    src = open_source(DataConfig(), str(tmp_path))
    finder = MaskFinder.for_source(src, "nuclei", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two passes (fit reads fields more than once): still one line
            assert len(list(iter_annotated(src, finder))) == 4
    assert sum("binary" in r.getMessage() for r in caplog.records) == 1
    assert finder.binary == 8
