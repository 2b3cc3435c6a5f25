"""JUMP / Cell Painting Gallery conventions: file names, channel maps and load_data files.

Phenix (Harmony) exports name images ``rRRcCCfFFp01-chKsk1fk1fl1.tiff`` (row, column, field, plane,
channel).  Which stain sits in channel K depends on the source; the plate's load_data file
(``FileName_Orig<Name>`` / ``PathName_Orig<Name>``) is the ground truth and wins when given.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from dinocell.data.field import FieldRecord
from dinocell.errors import DataError

JUMP_NAME = re.compile(
    r"^r(?P<row>\d{2})c(?P<col>\d{2})f(?P<site>\d{2})p(?P<plane>\d{2})-ch(?P<channel>\d+)"
    r"sk\d+fk\d+fl\d+\.tiff?$",
    re.IGNORECASE,
)

#: Channel number -> stain name per JUMP source.  Sources not listed here need a load_data file.
CHANNEL_MAPS: dict[str, dict[int, str]] = {
    "source_4": {1: "Mito", 2: "AGP", 3: "RNA", 4: "ER", 5: "DNA",
                 6: "Brightfield_1", 7: "Brightfield_2", 8: "Brightfield_3"},
}
#: cpg0000 (the JUMP pilot) was imaged like source_4.
CHANNEL_MAPS["cpg0000"] = CHANNEL_MAPS["source_4"]

STANDARD_CHANNELS = ("DNA", "RNA", "ER", "AGP", "Mito")


def parse_name(name: str) -> dict[str, Any] | None:
    """Parse a JUMP image file name; None if it is not one."""
    m = JUMP_NAME.match(Path(name).name)
    if not m:
        return None
    row, col = int(m["row"]), int(m["col"])
    return {
        "row": row,
        "col": col,
        "well": well_name(row, col),
        "site": int(m["site"]),
        "plane": int(m["plane"]),
        "channel": int(m["channel"]),
    }


def well_name(row: int, col: int) -> str:
    """Row 1, column 1 -> ``A01``."""
    if not 1 <= row <= 26 * 2:
        raise ValueError(f"row {row} out of range")
    letters = chr(ord("A") + row - 1) if row <= 26 else "A" + chr(ord("A") + row - 27)
    return f"{letters}{col:02d}"


def format_name(row: int, col: int, site: int, channel: int, plane: int = 1) -> str:
    """The Phenix file name of one channel of one site."""
    return f"r{row:02d}c{col:02d}f{site:02d}p{plane:02d}-ch{channel}sk1fk1fl1.tiff"


def channel_map(source: str) -> dict[int, str]:
    """The channel-number -> name map of a JUMP source (``source_4``...)."""
    if source not in CHANNEL_MAPS:
        known = ", ".join(sorted(CHANNEL_MAPS))
        raise DataError(f"no built-in channel map for '{source}' (known: {known}); pass its load_data file")
    return CHANNEL_MAPS[source]


def plate_from_path(path: str) -> str:
    """Guess the plate from a Phenix export folder ``<plate>__<timestamp>-Measurement1/Images``."""
    parts = [p for p in re.split(r"[/\\]", path) if p]
    for p in reversed(parts):
        if "__" in p:
            return p.split("__", 1)[0]
    for p in reversed(parts):
        if p.lower() != "images":
            return p
    return "plate"


def group_files(paths: Iterable[str], source: str = "source_4",
                plate_of: Any = None) -> tuple[list[FieldRecord], list[str]]:
    """Group JUMP-named image files into fields.  Returns (fields, names that did not parse)."""
    cmap = channel_map(source)
    groups: dict[tuple[str, str, int], dict[str, str]] = defaultdict(dict)
    unparsed: list[str] = []
    for p in paths:
        info = parse_name(p)
        if info is None or info["plane"] != 1:
            unparsed.append(p)
            continue
        name = cmap.get(info["channel"], f"ch{info['channel']}")
        plate = plate_of(p) if plate_of is not None else plate_from_path(str(Path(p).parent))
        groups[(plate, info["well"], info["site"])][name] = p
    fields = [
        FieldRecord(plate=pl, well=w, site=s, channels=dict(sorted(ch.items())),
                    metadata={"Metadata_Plate": pl, "Metadata_Well": w, "Metadata_Site": str(s)})
        for (pl, w, s), ch in sorted(groups.items())
    ]
    return fields, unparsed


def read_load_data(path: str | Path) -> pd.DataFrame:
    """Read a load_data file (CSV, CSV.gz or Parquet) into a DataFrame of strings."""
    p = str(path)
    try:
        if p.endswith(".parquet") or p.endswith(".pq"):
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p, dtype=str)  # pandas infers gzip from the suffix
    except FileNotFoundError:
        raise DataError(f"load_data file not found: {p}") from None
    except Exception as e:  # pyarrow / parser errors: one clear line
        raise DataError(f"cannot read load_data file {p}: {type(e).__name__}: {e}") from None
    return df.astype(str)


def load_data_channels(df: pd.DataFrame) -> list[str]:
    """Channel names present as ``FileName_Orig<Name>`` columns."""
    names = [c[len("FileName_Orig"):] for c in df.columns if c.startswith("FileName_Orig")]
    if not names:
        raise DataError("load_data file has no FileName_Orig<Name> columns")
    return names


def _join(folder: str, name: str) -> str:
    if not folder or folder.lower() == "nan":
        return name
    return folder.rstrip("/") + "/" + name


def fields_from_load_data(df: pd.DataFrame, root: str | None = None) -> list[FieldRecord]:
    """Fields of a load_data table; ``root`` replaces the PathName folders (files copied locally)."""
    names = load_data_channels(df)
    meta_cols = [c for c in df.columns if c.startswith("Metadata_")]
    out: list[FieldRecord] = []
    for row in df.to_dict("records"):
        chans = {}
        for n in names:
            folder = root if root is not None else row.get(f"PathName_Orig{n}", "")
            chans[n] = _join(folder, row[f"FileName_Orig{n}"])
        meta = {c: str(row[c]) for c in meta_cols}
        plate = meta.get("Metadata_Plate", "plate")
        well = meta.get("Metadata_Well", "A01")
        try:
            site = int(float(meta.get("Metadata_Site", "1")))
        except ValueError:
            site = 1
        out.append(FieldRecord(plate=plate, well=well, site=site, channels=chans, metadata=meta))
    return out


def channel_map_from_load_data(df: pd.DataFrame) -> dict[int, str]:
    """Infer channel number -> name from JUMP file names in a load_data table."""
    cmap: dict[int, str] = {}
    for n in load_data_channels(df):
        for fname in df[f"FileName_Orig{n}"].head(20):
            info = parse_name(fname)
            if info is not None:
                cmap[info["channel"]] = n
                break
    return cmap
