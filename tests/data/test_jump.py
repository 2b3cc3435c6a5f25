from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dinocell.data import jump
from dinocell.errors import DataError


def test_parse_and_format_roundtrip() -> None:
    info = jump.parse_name("r01c01f01p01-ch2sk1fk1fl1.tiff")
    assert info == {"row": 1, "col": 1, "well": "A01", "site": 1, "plane": 1, "channel": 2}
    assert jump.parse_name("r16c24f09p01-ch5sk1fk1fl1.tiff")["well"] == "P24"
    assert jump.format_name(16, 24, 9, 5) == "r16c24f09p01-ch5sk1fk1fl1.tiff"
    assert jump.parse_name("notes.txt") is None
    assert jump.parse_name("r01c01f01p01-ch2.tiff") is None


def test_group_files_source4() -> None:
    base = "/x/BR001__2021-01-01T00_00_00-Measurement1/Images/"
    paths = [base + jump.format_name(1, 1, s, c) for s in (1, 2) for c in (1, 2, 3, 4, 5, 6)]
    paths.append(base + "junk.tiff")
    fields, unparsed = jump.group_files(paths, "source_4")
    assert len(fields) == 2 and unparsed == [base + "junk.tiff"]
    f = fields[0]
    assert (f.plate, f.well, f.site) == ("BR001", "A01", 1)
    assert set(f.channels) == {"Mito", "AGP", "RNA", "ER", "DNA", "Brightfield_1"}
    assert f.channels["DNA"].endswith("ch5sk1fk1fl1.tiff")


def test_unknown_source_map() -> None:
    with pytest.raises(DataError, match="no built-in channel map for 'source_99'"):
        jump.channel_map("source_99")


def test_read_real_load_data(cpg0016_load_data: Path) -> None:
    df = jump.read_load_data(cpg0016_load_data)
    assert sorted(jump.load_data_channels(df)) == ["AGP", "DNA", "ER", "Mito", "RNA"]
    fields = jump.fields_from_load_data(df)
    assert len(fields) == len(df) == 2
    f = fields[0]
    assert f.plate == "BR00126114" and f.well == "A01" and f.site == 1
    assert f.channels["DNA"].startswith("s3://cellpainting-gallery/cpg0016-jump/source_4/")
    assert f.channels["DNA"].endswith("/Images/r01c01f01p01-ch5sk1fk1fl1.tiff")
    assert f.metadata["Metadata_Source"] == "source_4"
    # the load_data file's channel map agrees with the built-in source_4 map
    assert jump.channel_map_from_load_data(df) == {k: v for k, v in jump.CHANNEL_MAPS["source_4"].items() if k <= 5}


def test_load_data_csv_and_gz(tmp_path: Path, cpg0016_load_data: Path) -> None:
    df = pd.read_parquet(cpg0016_load_data)
    for name in ("ld.csv", "ld.csv.gz"):
        df.to_csv(tmp_path / name, index=False)
        fields = jump.fields_from_load_data(jump.read_load_data(tmp_path / name))
        assert [f.key for f in fields] == ["BR00126114/A01/1", "BR00126114/A01/2"]


def test_bad_load_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="load_data file not found"):
        jump.read_load_data(tmp_path / "missing.csv")
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no FileName_Orig"):
        jump.fields_from_load_data(jump.read_load_data(p))


def test_group_folder_fast_path_agrees_with_the_regex() -> None:
    names = [jump.format_name(r, c, s, ch) for r in (1, 16) for c in (1, 24) for s in (1, 9) for ch in (1, 5)]
    odd = ["R01C02F01P01-CH3SK1FK1FL1.TIFF", "r01c01f01p02-ch1sk1fk1fl1.tiff", "junk.tif",
           "r02c03f04p01-ch12sk1fk1fl1.tiff", "r0xc01f01p01-ch1sk1fk1fl1.tiff", "r01c01f01p01-ch1sk2fk1fl1.tif"]
    keys, masks, unparsed = jump.group_folder(names + odd)
    expected: dict[int, int] = {}
    for n in names + odd:
        info = jump.parse_name(n)
        if info is None or info["plane"] != 1:
            continue
        k = (info["row"] << 24) | (info["col"] << 16) | info["site"]
        expected[k] = expected.get(k, 0) | (1 << info["channel"])
    assert dict(zip(keys.tolist(), masks.tolist(), strict=True)) == expected
    assert unparsed == ["r01c01f01p02-ch1sk1fk1fl1.tiff", "junk.tif", "r0xc01f01p01-ch1sk1fk1fl1.tiff"]
