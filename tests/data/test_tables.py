"""CytoTable / CellProfiler tables, relative folders and 8-bit images become plain load_data input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from dinocell.data.decode import read_image
from dinocell.data.jump import fields_from_load_data, parse_name
from dinocell.data.tables import (
    normalise_columns,
    read_table,
    resolve_folder,
    verify_images,
)
from dinocell.errors import DataError


def _images(folder: Path, suffix: str = ".png") -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for ch, name in ((5, "DNA"), (3, "RNA")):
        fname = f"r01c02f01p01-ch{ch}sk1fk1fl1{suffix}"
        img = np.full((8, 8), 40 * ch, dtype=np.uint8)
        if suffix == ".jpg":
            img = np.stack([img] * 3, axis=-1)  # an RGB JPEG, as exported by viewers
        assert cv2.imwrite(str(folder / fname), img)
        names[name] = fname
    return names


def _cytotable(names: dict[str, str], folder: str) -> pd.DataFrame:
    data: dict[str, list[str]] = {"Image_Metadata_Plate": ["P1"], "Image_Metadata_Well": ["A02"],
                                  "Image_Metadata_Site": ["1"], "Image_Count_Cells": ["12"]}
    for name, fname in names.items():
        data[f"Image_FileName_Orig{name}"] = [fname]
        data[f"Image_PathName_Orig{name}"] = [folder]
    return pd.DataFrame(data)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_cytotable_with_relative_folders(tmp_path: Path, fmt: str) -> None:
    names = _images(tmp_path / "plate" / "images")
    df = _cytotable(names, "images")
    table = tmp_path / "plate" / f"image.{fmt}"
    df.to_csv(table, index=False) if fmt == "csv" else df.to_parquet(table)
    out = read_table(table)
    assert "FileName_OrigDNA" in out.columns and "Metadata_Well" in out.columns
    assert "Image_Count_Cells" in out.columns  # measurements are not metadata: left alone
    assert out["PathName_OrigDNA"].iloc[0] == str(tmp_path / "plate" / "images")
    verify_images(out)
    (field,) = fields_from_load_data(out)
    assert (field.plate, field.well, field.site) == ("P1", "A02", 1)
    img = read_image(field.channels["DNA"])
    assert img.dtype == np.uint8 and img.shape == (8, 8) and int(img[0, 0]) == 200


def test_missing_image_shows_the_full_path(tmp_path: Path) -> None:
    names = _images(tmp_path / "elsewhere")
    table = tmp_path / "t" / "load_data.csv"
    table.parent.mkdir()
    _cytotable(names, "../images").to_csv(table, index=False)
    out = read_table(table)
    with pytest.raises(DataError, match=rf"image not found: {tmp_path}/images/r01c02f01p01-ch\dsk1fk1fl1\.png"):
        verify_images(out)


def test_jpeg_and_name_parsing(tmp_path: Path) -> None:
    names = _images(tmp_path, ".jpg")
    img = read_image(tmp_path / names["RNA"])
    assert img.ndim == 2 and img.dtype == np.uint8 and abs(int(img[0, 0]) - 120) <= 2
    info = parse_name("r01c02f03p01-ch4sk1fk1fl1.png")  # JUMP names saved as 8-bit PNG/JPEG parse too
    assert info is not None and (info["well"], info["site"], info["channel"]) == ("A02", 3, 4)
    assert parse_name("r01c02f03p01-ch4sk1fk1fl1.JPEG") is not None
    assert parse_name("r01c02f03p01-ch4sk1fk1fl1.tif") is not None
    assert parse_name("notes.txt") is None


def test_normalisation_rules(tmp_path: Path) -> None:
    df = pd.DataFrame({"Image_FileName_OrigDNA": ["a.tif"], "FileName_OrigDNA": ["b.tif"],
                       "Image_URL_OrigDNA": ["file:///x/a.tif"], "Metadata_Plate": ["P"]})
    out = normalise_columns(df)
    assert list(out.columns) == ["FileName_OrigDNA", "URL_OrigDNA", "Metadata_Plate"]
    assert out["FileName_OrigDNA"].iloc[0] == "b.tif"  # the plain column wins
    assert resolve_folder("s3://bucket/p/", tmp_path) == "s3://bucket/p/"
    assert resolve_folder("file:///data/x", tmp_path) == "/data/x"
    assert resolve_folder("nan", tmp_path) == str(tmp_path)
    bad = pd.DataFrame({"FileName_OrigDNA": ["a.czi"], "PathName_OrigDNA": [str(tmp_path)]})
    with pytest.raises(DataError, match="not an image.*a.czi"):
        verify_images(bad)
    (tmp_path / "m.csv").write_text("Metadata_Plate\nP\n")
    with pytest.raises(DataError, match="no FileName_"):
        read_table(tmp_path / "m.csv")


def test_cytotable_channels_without_orig(tmp_path: Path) -> None:
    names = _images(tmp_path / "plate" / "images")
    df = _cytotable(names, "images")
    df = df.rename(columns=lambda c: c.replace("_Orig", "_"))  # Image_FileName_DNA, Image_PathName_DNA
    df["Image_FileName_IllumDNA"] = ["P1_IllumDNA.npy"]
    df["Image_FileName_MaskNuclei"] = ["m.tif"]
    table = tmp_path / "plate" / "image.parquet"
    df.to_parquet(table)
    out = read_table(table)
    assert {"FileName_OrigDNA", "PathName_OrigDNA", "FileName_OrigRNA", "FileName_IllumDNA",
            "FileName_MaskNuclei"} <= set(out.columns)
    assert "FileName_DNA" not in out.columns
    assert out["PathName_OrigDNA"].iloc[0] == str(tmp_path / "plate" / "images")
    (field,) = fields_from_load_data(out)
    assert set(field.channels) == {"DNA", "RNA"}
    # with Orig columns present nothing is renamed
    both = normalise_columns(pd.DataFrame({"FileName_OrigDNA": ["a.tif"], "FileName_Extra": ["b.tif"]}))
    assert list(both.columns) == ["FileName_OrigDNA", "FileName_Extra"]
