"""JUMP / Cell Painting Gallery conventions: file names, channel maps and load_data files.

Phenix (Harmony) exports name images ``rRRcCCfFFp01-chKsk1fk1fl1.tiff`` (row, column, field, plane,
channel).  Which stain sits in channel K depends on the source; the plate's load_data file
(``FileName_Orig<Name>`` / ``PathName_Orig<Name>``) is the ground truth and wins when given.

Grouping files into fields works one plate folder at a time and straight into the columnar
:class:`~dinocell.data.index.FieldIndex`: the plate is derived once per folder (not per key), names
are parsed with one compiled regex on the base name (no ``Path`` objects), and no list of millions of
key strings is kept.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dinocell.data.field import STANDARD_CHANNELS, format_name, well_name
from dinocell.data.index import FieldIndex, IndexBuilder, sort_unique
from dinocell.errors import DataError

__all__ = ["CHANNEL_MAPS", "STANDARD_CHANNELS", "format_name", "well_name", "parse_name", "channel_map",
           "plate_from_path", "group_folder", "group_files", "read_load_data", "load_data_channels",
           "fields_from_load_data", "channel_map_from_load_data", "attach_load_data"]

JUMP_NAME = re.compile(
    r"^r(?P<row>\d{2})c(?P<col>\d{2})f(?P<site>\d{2})p(?P<plane>\d{2})-ch(?P<channel>\d+)"
    r"sk\d+fk\d+fl\d+\.(?:tiff?|png|jpe?g)$",
    re.IGNORECASE,
)

#: Channel number -> stain name per JUMP source (read-only: a load_data map is passed, never stored).
CHANNEL_MAPS: dict[str, dict[int, str]] = {
    "source_4": {1: "Mito", 2: "AGP", 3: "RNA", 4: "ER", 5: "DNA",
                 6: "Brightfield_1", 7: "Brightfield_2", 8: "Brightfield_3"},
}
#: cpg0000 (the JUMP pilot) was imaged like source_4.
CHANNEL_MAPS["cpg0000"] = CHANNEL_MAPS["source_4"]


def parse_name(name: str) -> dict[str, Any] | None:
    """Parse a JUMP image file name (or path); None if it is not one."""
    m = JUMP_NAME.match(name.rsplit("/", 1)[-1])
    if not m:
        return None
    row, col = int(m["row"]), int(m["col"])
    return {"row": row, "col": col, "well": well_name(row, col), "site": int(m["site"]),
            "plane": int(m["plane"]), "channel": int(m["channel"])}


def channel_map(source: str | Mapping[int, str]) -> dict[int, str]:
    """The channel-number -> name map of a JUMP source (``source_4``...), or ``source`` itself."""
    if not isinstance(source, str):
        return dict(source)
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


#: The common Phenix name, ``rRRcCCfFFp01-chKsk1fk1fl1.tiff`` (one-digit channel), parsed as bytes.
_FAST_LEN = 30
_FAST_FIXED = {0: "r", 3: "c", 6: "f", 9: "p", 12: "-", 13: "c", 14: "h"}
_FAST_DIGITS = [1, 2, 4, 5, 7, 8, 10, 11, 15]
_FAST_TAIL = np.frombuffer(b"sk1fk1fl1.tiff", dtype=np.uint8)


def _parse_fixed(names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised parse of the common fixed-width Phenix name: (ok mask, field keys, channel numbers).

    The names of the right length are joined into one byte string and read as an (n, 30) uint8
    array; a name that is not exactly ``rRRcCCfFFp01-chKsk1fk1fl1.tiff`` is left to the regex.
    """
    n = len(names)
    ok = np.zeros(n, dtype=bool)
    keys = np.zeros(n, dtype=np.int64)
    chans = np.zeros(n, dtype=np.int64)
    if n == 0:
        return ok, keys, chans
    sel = np.fromiter(map(len, names), dtype=np.int64, count=n) == _FAST_LEN
    rows = np.flatnonzero(sel)
    if len(rows) == 0:
        return ok, keys, chans
    chosen = names if len(rows) == n else [names[i] for i in rows]
    cp = np.frombuffer("".join(chosen).encode("ascii", "replace"), dtype=np.uint8).reshape(len(rows), _FAST_LEN)
    good = np.ones(len(rows), dtype=bool)
    for pos, ch in _FAST_FIXED.items():
        good &= cp[:, pos] == ord(ch)
    d = cp[:, _FAST_DIGITS].astype(np.int64) - ord("0")
    good &= ((d >= 0) & (d <= 9)).all(axis=1)
    good &= (cp[:, 16:] == _FAST_TAIL).all(axis=1)
    good &= (d[:, 6] == 0) & (d[:, 7] == 1)  # plane 01
    ok[rows] = good
    keys[rows] = ((d[:, 0] * 10 + d[:, 1]) << 24) | ((d[:, 2] * 10 + d[:, 3]) << 16) | (d[:, 4] * 10 + d[:, 5])
    chans[rows] = d[:, 8]
    return ok, keys, chans


def group_folder(names: Iterable[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Base names of one folder -> (field keys ``row<<24 | col<<16 | site``, channel-number bit masks,
    names that are not plane-1 Phenix images).  The hot loop of discovery: the common fixed-width
    names are parsed as one numpy array, the rest with one regex per name."""
    names = list(names)
    ok, fast_keys, fast_ch = _parse_fixed(names)
    key_parts, ch_parts = [fast_keys[ok]], [fast_ch[ok]]
    unparsed: list[str] = []
    slow_keys, slow_ch = [], []
    match = JUMP_NAME.match
    for i in np.flatnonzero(~ok):
        n = names[i]
        m = match(n)
        if m is None:
            unparsed.append(n)
            continue
        row, col, site, plane, ch = m.group("row", "col", "site", "plane", "channel")
        chn = int(ch)
        if int(plane) != 1 or chn >= 62:
            unparsed.append(n)
            continue
        slow_keys.append((int(row) << 24) | (int(col) << 16) | int(site))
        slow_ch.append(chn)
    key_parts.append(np.asarray(slow_keys, dtype=np.int64))
    ch_parts.append(np.asarray(slow_ch, dtype=np.int64))
    keys_all = np.concatenate(key_parts)
    ch_all = np.concatenate(ch_parts)
    keys, inv = np.unique(keys_all, return_inverse=True)
    masks = np.zeros(len(keys), dtype=np.int64)
    np.bitwise_or.at(masks, inv, np.left_shift(1, ch_all))
    return keys, masks, unparsed


def add_phenix_folder(builder: IndexBuilder, folder: str, plate: str, names: Iterable[str],
                      cmap: Mapping[int, str], metadata: dict[str, str] | None = None) -> list[str]:
    """Group one Phenix folder's base names into ``builder``; returns the names that did not parse."""
    keys, masks, unparsed = group_folder(names)
    if len(keys) == 0:
        return unparsed
    numbers = [n for n in range(62) if np.any(masks >> n & 1)]
    bits = np.zeros(len(masks), dtype=np.int64)
    for n in numbers:
        name = cmap.get(n, f"ch{n}")
        builder.naming[name] = n  # type: ignore[index]
        bits |= (masks >> n & 1) << builder.bit(name)
    builder.add_fields(folder, plate, (keys >> 24) & 0xFF, (keys >> 16) & 0xFF, keys & 0xFFFF, bits, metadata)
    return unparsed


def group_files(paths: Iterable[str], source: str | Mapping[int, str] = "source_4",
                plate_of: Callable[[str], str] | None = None) -> tuple[FieldIndex, list[str]]:
    """Group JUMP-named image files into fields.  Returns (fields, paths that did not parse).

    ``plate_of(folder)`` names the plate of a folder (default: :func:`plate_from_path`).
    """
    cmap = channel_map(source)
    by_folder: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        folder, _, name = p.rpartition("/")
        by_folder[folder].append(name)
    builder = IndexBuilder(naming={})
    unparsed: list[str] = []
    for folder, names in by_folder.items():
        plate = plate_of(folder) if plate_of is not None else plate_from_path(folder)
        prefix = folder + "/" if folder else ""
        unparsed += [prefix + n for n in add_phenix_folder(builder, prefix, plate, names, cmap)]
    return builder.build(), unparsed


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


def _folder(values: pd.Series) -> pd.Series:
    v = values.fillna("").astype(str)
    v = v.where(~v.str.lower().isin(["nan", "none"]), "")
    return v.where(v.eq("") | v.str.endswith("/"), v + "/")


#: Columns ``dinocell embed`` writes into its profile tables: a load_data column of that name would clash.
RESERVED_METADATA = ("Metadata_FieldIndex", "Metadata_PatchIndex")
_MISSING = ("", "nan", "none", "<na>")


def _text(values: pd.Series) -> pd.Series:
    """A column as plain strings, missing cells (NaN, None, <NA>, "nan") as ``""``.

    Why: pandas 3 reads text as a nullable string dtype, whose missing cells ``factorize`` codes as -1;
    an all-empty ``Metadata_*`` column then indexed an empty category list (IndexError in every command)."""
    v = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    return v.where(~v.str.lower().isin(_MISSING), "")


def _row_list(mask: np.ndarray, limit: int = 3) -> str:
    """``row 5`` / ``rows 2, 3, 9 and 4 more`` (table line numbers: 1-based, after the header line)."""
    rows = np.flatnonzero(mask)[:limit] + 2
    more = int(mask.sum()) - len(rows)
    return ("row " if mask.sum() == 1 else "rows ") + ", ".join(str(r) for r in rows) + \
        (f" and {more} more" if more > 0 else "")


def fields_from_load_data(df: pd.DataFrame, root: str | None = None) -> FieldIndex:
    """Fields of a load_data table (vectorised); ``root`` replaces the PathName folders.

    Refused with one line: a row without plate or well, a site that is not a whole number >= 0, two rows
    with the same (plate, well, site) that name different images (they would collapse into one field
    silently), and the columns ``dinocell embed`` writes.  Identical repeated rows (a CytoTable
    single-cell table repeats its image row per cell) collapse into one field."""
    names = load_data_channels(df)
    n = len(df)
    clash = [c for c in RESERVED_METADATA if c in df.columns]
    if clash:
        raise DataError(f"load_data column {clash[0]} is reserved (dinocell embed writes it into profiles); "
                        "rename or drop it")

    def col(name: str, default: str) -> pd.Series:
        return _text(df[name]) if name in df.columns else pd.Series([default] * n, index=df.index)

    plate_s, well_s, site_s = col("Metadata_Plate", "plate"), col("Metadata_Well", "A01"), col("Metadata_Site", "1")
    for what, s in (("Metadata_Plate", plate_s), ("Metadata_Well", well_s), ("Metadata_Site", site_s)):
        empty = (s == "").to_numpy()
        if empty.any():
            raise DataError(f"load_data {_row_list(empty)}: empty {what}; every field needs a "
                            "plate, a well and a site (fill them in or drop those rows)")
    site_f = pd.to_numeric(site_s, errors="coerce").to_numpy(dtype=float)
    bad_site = ~np.isfinite(site_f) | (site_f < 0) | (site_f != np.round(site_f))
    if bad_site.any():
        first = site_s.to_numpy()[np.flatnonzero(bad_site)[0]]
        raise DataError(f"load_data {_row_list(bad_site)}: Metadata_Site {first!r}; sites are whole "
                        "numbers >= 0")
    plate_codes, plates = pd.factorize(plate_s)
    well_codes, wells = pd.factorize(well_s)
    site = site_f.astype(np.int64)
    folders = pd.concat([_folder(pd.Series([root] * n, index=df.index)) if root is not None
                         else _folder(col(f"PathName_Orig{c}", "")) for c in names])
    folder_codes, folder_names = pd.factorize(folders)
    cols: dict[str, np.ndarray] = {"plate": plate_codes, "well": well_codes, "site": site,
                                   "folder": np.zeros(n, np.int64), "row": np.zeros(n, np.int64),
                                   "col": np.zeros(n, np.int64)}
    present = np.zeros(n, dtype=np.int64)
    files: dict[str, pa.Array] = {}
    fnames: list[pd.Series] = []
    for b, c in enumerate(names):
        fname = col(f"FileName_Orig{c}", "")
        ok = (fname != "").to_numpy()
        present |= ok.astype(np.int64) << b
        files[c] = pa.array(fname.tolist(), type=pa.string())
        cols[f"d:{c}"] = folder_codes[b * n:(b + 1) * n]
        fnames.append(fname)
    _refuse_collapsing_rows(plate_s, well_s, site, fnames)
    cols["present"] = present
    cats = {"plate": list(plates), "well": list(wells), "folder": list(folder_names)}
    meta = [c for c in df.columns if c.startswith("Metadata_") and
            c not in ("Metadata_Plate", "Metadata_Well", "Metadata_Site")]
    for m in meta:
        codes, values = pd.factorize(_text(df[m]))
        cols[f"m:{m}"] = codes
        cats[m] = [str(v) for v in values]
    from_index = FieldIndex({k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}, cats, names,
                            None, files, meta)
    return sort_unique(from_index)


def _refuse_collapsing_rows(plate: pd.Series, well: pd.Series, site: np.ndarray, fnames: list[pd.Series]) -> None:
    """Two rows with one (plate, well, site) must name the same images, else one would vanish."""
    keys = pd.DataFrame({"p": plate.to_numpy(), "w": well.to_numpy(), "s": site})
    dup = keys.duplicated(keep=False).to_numpy()
    if not dup.any():
        return
    files = pd.concat([keys] + [f.reset_index(drop=True).rename(f"f{i}") for i, f in enumerate(fnames)], axis=1)
    sub = files[dup]
    differ = sub.groupby(["p", "w", "s"], sort=False).nunique().max(axis=1) > 1
    if differ.any():
        p, w, s = differ[differ].index[0]
        rows = np.flatnonzero(dup & (keys["p"] == p).to_numpy() & (keys["w"] == w).to_numpy()
                              & (keys["s"] == s).to_numpy())
        raise DataError(f"load_data rows {', '.join(str(r + 2) for r in rows[:3])} are all plate {p} well {w} "
                        f"site {s} but name different images; they would collapse into one field (is "
                        "Metadata_Site right?)")


def attach_load_data(idx: FieldIndex, table: FieldIndex) -> FieldIndex:
    """Copy the ``Metadata_*`` columns of load_data rows onto a folder's fields, keyed by
    (plate, well, site).  A folder whose plate the table does not name matches on (well, site) only
    when the table holds a single plate (a copy of one plate under another folder name)."""
    t_plates = table.cats["plate"]
    t_plate_code = {p: i for i, p in enumerate(t_plates)}
    t_well_code = {w: i for i, w in enumerate(table.cats["well"])}
    plate_map = np.array([t_plate_code.get(p, 0 if len(t_plates) == 1 else -1) for p in idx.cats["plate"]],
                         dtype=np.int64)
    well_map = np.array([t_well_code.get(w, -1) for w in idx.cats["well"]], dtype=np.int64)
    key_t = (table.cols["plate"].astype(np.int64) << 40) | (table.cols["well"].astype(np.int64) << 20) \
        | table.cols["site"].astype(np.int64)
    tp = plate_map[idx.cols["plate"]]
    tw = well_map[idx.cols["well"]]
    key_i = (tp << 40) | (tw << 20) | idx.cols["site"].astype(np.int64)
    order = np.argsort(key_t, kind="stable")
    pos = np.searchsorted(key_t[order], key_i)
    pos = np.minimum(pos, max(0, len(order) - 1))
    hit = (tp >= 0) & (tw >= 0)
    hit &= (key_t[order][pos] == key_i) if len(order) else np.zeros(len(idx), dtype=bool)
    row = np.where(hit, order[pos], -1)
    cols = dict(idx.cols)
    cats = dict(idx.cats)
    plate_cats = list(idx.cats["plate"])
    new_plate = idx.cols["plate"].astype(np.int64).copy()
    # Plates take the table's name where a row matched.
    tname_code = {p: plate_cats.index(p) if p in plate_cats else None for p in t_plates}
    for p, c in tname_code.items():
        if c is None:
            tname_code[p] = len(plate_cats)
            plate_cats.append(p)
    t_to_i = np.array([tname_code[p] for p in t_plates], dtype=np.int64)
    new_plate[hit] = t_to_i[table.cols["plate"][row[hit]]]
    cols["plate"] = new_plate
    cats["plate"] = plate_cats
    meta = list(idx.meta)
    for m in table.meta:
        values = list(table.cats[m]) + [""]
        codes = np.full(len(idx), len(values) - 1, dtype=np.int64)
        codes[hit] = table.cols[f"m:{m}"][row[hit]]
        cols[f"m:{m}"] = codes
        cats[m] = values
        if m not in meta:
            meta.append(m)
    return sort_unique(FieldIndex(cols, cats, idx.channels, idx.naming, idx.files, meta))


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
