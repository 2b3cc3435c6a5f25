"""Image tables as people have them: CellProfiler load_data, CytoTable exports, relative folders.

Three shapes of the same information reach us:

* CellProfiler ``load_data`` CSVs: ``FileName_Orig<Name>``, ``PathName_Orig<Name>``, ``Metadata_*``;
* CytoTable / CellProfiler per-image tables (CSV or Parquet): the same columns prefixed with ``Image_``
  (``Image_FileName_OrigDNA``, ``Image_Metadata_Well``);
* CytoTable exports whose channels are named without CellProfiler's ``Orig`` (``Image_FileName_DNA``):
  when a table has no ``FileName_Orig*`` column at all, every ``FileName_<Name>`` / ``PathName_<Name>``
  that is not an illumination function or a mask (``Illum*``, ``Mask*``) is an original image;
* tables written next to the images, whose ``PathName_*`` folders are relative (``images/``) and mean
  "relative to this table", not to wherever the command happens to run.

:func:`read_table` turns all of them into plain load_data columns with absolute (or ``s3://``) folders,
so :func:`dinocell.data.jump.fields_from_load_data` can read them.  Images may be 16-bit TIFF or
8-bit PNG/JPEG (:func:`dinocell.data.decode.read_image` decodes both).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from dinocell.data.field import IMAGE_SUFFIXES
from dinocell.data.jump import read_load_data
from dinocell.errors import DataError

PREFIX = "Image_"
NORMALISED = ("FileName_", "PathName_", "Metadata_", "URL_")


def normalise_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Drop the ``Image_`` prefix of ``Image_FileName_*``, ``Image_PathName_*``, ``Image_Metadata_*``
    (and ``Image_URL_*``) columns.  Where both forms exist, the plain column is kept.  Channels named
    without ``Orig`` get it (:func:`add_orig`)."""
    rename: dict[str, str] = {}
    drop: list[str] = []
    for c in df.columns:
        if c.startswith(PREFIX) and c[len(PREFIX):].startswith(NORMALISED):
            plain = c[len(PREFIX):]
            (drop.append(c) if plain in df.columns else rename.__setitem__(c, plain))
    return add_orig(df.drop(columns=drop).rename(columns=rename))


NOT_ORIG = ("Orig", "Illum", "Mask", "Outlines")


def add_orig(df: pd.DataFrame) -> pd.DataFrame:
    """``FileName_<Name>`` -> ``FileName_Orig<Name>`` (and its ``PathName_``) when the table has no
    ``FileName_Orig*`` column: channels named without ``Orig`` (CytoTable, custom NamesAndTypes)."""
    if any(c.startswith("FileName_Orig") for c in df.columns):
        return df
    rename: dict[str, str] = {}
    for c in df.columns:
        for kind in ("FileName_", "PathName_", "URL_"):
            name = c[len(kind):] if c.startswith(kind) else ""
            if name and not name.startswith(NOT_ORIG) and f"{kind}Orig{name}" not in df.columns:
                rename[c] = f"{kind}Orig{name}"
    return df.rename(columns=rename)


def _is_remote(folder: str) -> bool:
    return "://" in folder and not folder.startswith("file://")


def resolve_folder(folder: Any, base: str | os.PathLike[str]) -> str:
    """An absolute folder or URI: ``file://`` URLs become paths; relative folders are joined to ``base``."""
    f = "" if folder is None else str(folder)
    if f.lower() in ("", "nan", "none"):
        return os.fspath(base)
    if f.startswith("file://"):
        f = f[len("file://"):]
    if _is_remote(f) or os.path.isabs(f):
        return f
    return os.path.normpath(os.path.join(os.fspath(base), f))


def resolve_paths(df: pd.DataFrame, base: str | os.PathLike[str]) -> pd.DataFrame:
    """Every ``PathName_*`` column with relative folders resolved against ``base`` (the table's folder)."""
    out = df.copy()
    for c in out.columns:
        if c.startswith("PathName_"):
            out[c] = [resolve_folder(v, base) for v in out[c]]
    return out


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A load_data / CytoTable / CellProfiler image table (CSV, CSV.gz, Parquet) as plain load_data
    columns (strings), its relative folders resolved against the table's own folder."""
    p = Path(path)
    df = normalise_columns(read_load_data(p))
    if not any(c.startswith("FileName_") for c in df.columns):
        raise DataError(f"table {p} has no FileName_<Name> or Image_FileName_<Name> columns")
    return resolve_paths(df, p.resolve().parent)


def check_suffixes(df: pd.DataFrame) -> None:
    """Every ``FileName_Orig*`` names a TIFF, PNG or JPEG; anything else fails with its name."""
    for c in df.columns:
        if not c.startswith("FileName_Orig"):
            continue
        bad = [v for v in df[c].astype(str) if not v.lower().endswith(IMAGE_SUFFIXES)]
        if bad:
            raise DataError(f"column {c} names a file that is not an image ({', '.join(IMAGE_SUFFIXES)}): {bad[0]}")


def image_paths(df: pd.DataFrame) -> Iterable[tuple[str, str]]:
    """``(column, full path)`` of every ``FileName_Orig*`` cell, joined with its ``PathName_Orig*`` folder."""
    for c in df.columns:
        if not c.startswith("FileName_Orig"):
            continue
        pcol = "PathName_" + c[len("FileName_"):]
        folders = df[pcol] if pcol in df.columns else [""] * len(df)
        for folder, name in zip(folders, df[c], strict=True):
            f = str(folder)
            yield c, (f.rstrip("/") + "/" + str(name)) if f and f.lower() != "nan" else str(name)


def verify_images(df: pd.DataFrame, limit: int | None = None) -> None:
    """Check that the table's local images exist (``limit`` rows at most); the first missing one is a
    :class:`DataError` that shows the full path tried."""
    check_suffixes(df)
    rows = df if limit is None else df.head(limit)
    for col, path in image_paths(rows):
        if not _is_remote(path) and not os.path.isfile(path):
            raise DataError(f"image not found: {path} (from {col} and its PathName folder)")


__all__ = ["IMAGE_SUFFIXES", "add_orig", "check_suffixes", "image_paths", "normalise_columns",
           "read_table", "resolve_folder", "resolve_paths", "verify_images"]
