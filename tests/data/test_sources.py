from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dinocell.config import load_config
from dinocell.data.sources import FieldDataset, open_source
from dinocell.errors import DataError


def _write_field(folder: Path, well: tuple[int, int], site: int, channels=(1, 2, 3, 4, 5), size=32,
                 plate="P1") -> None:
    from dinocell.data.jump import format_name

    d = folder / f"{plate}__2024-01-01T00_00_00-Measurement1" / "Images"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(site)
    for c in channels:
        tifffile.imwrite(d / format_name(*well, site, c),
                         rng.integers(0, 60000, (size, size)).astype(np.uint16), compression="lzw")


def test_real_site_folder(cpg0000_site: Path) -> None:
    cfg = load_config()
    src = open_source(cfg.data, str(cpg0000_site))
    info = src.describe()
    assert info["fields"] == 1
    assert info["channels"] == ["RNA", "AGP", "DNA"] or sorted(info["channels"]) == ["AGP", "DNA", "RNA"]
    assert set(info["channels"]) == {"AGP", "RNA", "DNA"}
    x = src.load(src.records[0])
    assert x.shape == (3, 1080, 1080) and x.dtype == np.float32


def test_channel_selection_and_unknown(tmp_path: Path) -> None:
    _write_field(tmp_path, (1, 1), 1)
    cfg = load_config(None, ["data.channels=[dna,RNA]"])
    src = open_source(cfg.data, str(tmp_path))
    assert src.channels == ["DNA", "RNA"] and src.fluorescent == [True, True]
    assert src.load_raw(src.records[0]).shape == (2, 32, 32)
    with pytest.raises(DataError, match="unknown channel 'Actin'; available: DNA, RNA, ER, AGP, Mito"):
        open_source(load_config(None, ["data.channels=[Actin]"]).data, str(tmp_path))


def test_brightfield_not_fluorescent(tmp_path: Path) -> None:
    _write_field(tmp_path, (1, 1), 1, channels=(5, 6))
    src = open_source(load_config().data, str(tmp_path))
    assert dict(zip(src.channels, src.fluorescent, strict=True)) == {"DNA": True, "Brightfield_1": False}


def test_bad_inputs(tmp_path: Path) -> None:
    cfg = load_config()
    with pytest.raises(DataError, match="path not found"):
        open_source(cfg.data, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_source(cfg.data, str(tmp_path / "empty"))
    (tmp_path / "odd").mkdir()
    tifffile.imwrite(tmp_path / "odd" / "img_1.tif", np.zeros((4, 4), np.uint16))
    with pytest.raises(DataError, match="use --pattern"):
        open_source(cfg.data, str(tmp_path / "odd"))


def test_pattern_source(tmp_path: Path) -> None:
    for w in ("A01", "B02"):
        for ch in ("dapi", "actin"):
            tifffile.imwrite(tmp_path / f"{w}_s1_{ch}.tif", np.ones((8, 8), np.uint16))
    cfg = load_config(None, [r"data.pattern=(?P<well>[A-Z]\d+)_s(?P<site>\d+)_(?P<channel>\w+)\.tif"])
    src = open_source(cfg.data, str(tmp_path))
    assert len(src) == 2 and src.channels == ["actin", "dapi"]
    bad = load_config(None, ["data.pattern=(?P<well>.*)"])
    with pytest.raises(DataError, match="named group"):
        open_source(bad.data, str(tmp_path))


def test_load_data_wins_channel_names(tmp_path: Path, cpg0016_load_data: Path) -> None:
    _write_field(tmp_path, (1, 1), 1)
    _write_field(tmp_path, (1, 1), 2)
    cfg = load_config(None, [f"data.load_data={cpg0016_load_data}"])
    src = open_source(cfg.data, str(tmp_path))
    assert len(src) == 2
    assert src.records[0].plate == "BR00126114"
    assert src.records[0].metadata["Metadata_Batch"] == "2021_08_23_Batch12"


def test_dataset_skips_corrupt_fields(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for s in (1, 2, 3):
        _write_field(tmp_path, (1, 1), s, channels=(5,))
    bad = next(tmp_path.rglob("r01c01f02p01-ch5sk1fk1fl1.tiff"))
    bad.write_bytes(b"II*\x00broken")
    src = open_source(load_config().data, str(tmp_path))
    ds = FieldDataset(src, None, repeats=2)
    assert len(ds) == 6
    items = [ds[i]["index"] for i in range(6)]
    assert 1 not in items and set(items) == {0, 2}
    assert list(ds.skipped) == ["P1/A01/2"]
    for p in tmp_path.rglob("*.tiff"):
        p.write_bytes(b"junk")
    ds2 = FieldDataset(open_source(load_config().data, str(tmp_path)), None)
    with pytest.raises(DataError, match="every field .* failed to load"):
        ds2[0]


def test_missing_copy_of_fixture_is_counted(tmp_path: Path, cpg0000_site: Path) -> None:
    dst = tmp_path / "BR00117006__x-Measurement1" / "Images"
    shutil.copytree(cpg0000_site, dst)
    (dst / "r01c01f01p01-ch3sk1fk1fl1.tiff").unlink()
    _write_field(tmp_path, (1, 2), 1, channels=(2, 3, 5), plate="BR00117006")
    src = open_source(load_config().data, str(tmp_path))
    info = src.describe()
    assert info["fields"] == 1 and len(info["skipped"]) == 1 and "missing channel(s) RNA" in info["skipped"][0]


def test_stain_normalisation_runs_before_scaling(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for ch, base in (("R", 200), ("G", 120), ("B", 180)):
        img = np.clip(rng.normal(base, 20, (32, 32)), 0, 255).astype(np.uint8)
        tifffile.imwrite(tmp_path / f"A01_s1_{ch}.tif", img)
    pattern = r"data.pattern=(?P<well>[A-Z]\d+)_s(?P<site>\d+)_(?P<channel>[RGB])\.tif"
    plain = open_source(load_config(None, [pattern, "data.channels=[R,G,B]"]).data, str(tmp_path))
    stained = open_source(load_config(None, [pattern, "data.channels=[R,G,B]", "data.stain.use_stain_norm=true",
                                             "data.scaling.low_percentile=0", "data.scaling.high_percentile=100"]).data,
                          str(tmp_path))
    a, b = plain.load(plain.records[0]), stained.load(stained.records[0])
    assert a.shape == b.shape == (3, 32, 32) and b.dtype == np.float32
    assert 0.0 <= b.min() and b.max() <= 1.0 and not np.allclose(a, b)
    two = open_source(load_config(None, [pattern, "data.channels=[R,G]", "data.stain.use_stain_norm=true"]).data,
                      str(tmp_path))
    with pytest.raises(DataError, match="needs RGB"):
        two.load(two.records[0])
