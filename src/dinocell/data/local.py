"""Local field sources: a folder of images (JUMP names or a ``pattern``) and a load_data table.

Both build a columnar :class:`~dinocell.data.index.FieldIndex`; :class:`IndexSource` selects the
channels and drops fields that lack one with vectorised column operations.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinocell.data import jump, tables
from dinocell.data.channels import resolve_channel_map
from dinocell.data.field import (
    IMAGE_SUFFIXES,
    LOAD_DATA_SUFFIXES,
    MAX_LISTED_SKIPS,
    FieldSource,
    is_fluorescent,
    order_channels,
    select_channels,
)
from dinocell.data.illum import IllumCorrection
from dinocell.data.index import FieldIndex, IndexBuilder
from dinocell.data.registry import register_source
from dinocell.errors import DataError, UserError


def missing_channel_skips(index: FieldIndex, keep: np.ndarray, channels: Sequence[str]) -> list[str]:
    """``skipped`` lines for the fields without every chosen channel (the first ones, then a count)."""
    drop = np.flatnonzero(~keep)
    out = []
    for i in drop[:MAX_LISTED_SKIPS]:
        rec = index[int(i)]
        out.append(f"{rec.key}: missing channel(s) {', '.join(c for c in channels if c not in rec.channels)}")
    if len(drop) > MAX_LISTED_SKIPS:
        out.append(f"... and {len(drop) - MAX_LISTED_SKIPS} more field(s) missing a channel")
    return out


class IndexSource(FieldSource):
    """A source defined by a field index (folder, load_data table, S3 listing)."""

    def __init__(self, index: FieldIndex, channels: Sequence[str] | None, name: str,
                 scaling: Any = None, stain: Any = None, skipped: list[str] | None = None,
                 channel_map: tuple[dict[int, str], str] | None = None, illum: Any = None) -> None:
        super().__init__(scaling, stain)
        self.name = name
        if channel_map is not None:
            self.channel_map, self.channel_map_origin = channel_map
        self.illum = illum
        counts = index.channel_counts()
        self.channels = select_channels(order_channels(c for c, n in counts.items() if n), channels)
        keep = index.has_channels(self.channels)
        self.skipped = list(skipped or []) + missing_channel_skips(index, keep, self.channels)
        if not keep.any():
            raise DataError(f"no field in {name} has all of the channels {', '.join(self.channels)}")
        self.records = index if keep.all() else index.take(keep)
        self.fluorescent = [is_fluorescent(c) for c in self.channels]


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise DataError(f"bad --pattern regex: {e}") from None
    if "channel" not in rx.groupindex:
        raise DataError("--pattern needs a named group (?P<channel>...); optional: plate, well, site")
    return rx


def group_by_pattern(paths: list[str], root: Path, rx: re.Pattern[str]) -> tuple[FieldIndex, list[str]]:
    """Group files whose path (relative to ``root``) matches ``rx`` into fields."""
    groups: dict[tuple[str, str, int], dict[str, str]] = {}
    unmatched = []
    base = str(root).rstrip(os.sep) + os.sep
    folder_plate: dict[str, str] = {}  # plate_from_path once per folder, not per file
    search = rx.search
    for p in paths:
        m = search(p[len(base):] if p.startswith(base) else os.path.relpath(p, root))
        if not m:
            unmatched.append(p)
            continue
        d = m.groupdict()
        plate = d.get("plate")
        if not plate:
            folder = p.rpartition("/")[0]
            plate = folder_plate.get(folder)
            if plate is None:
                plate = folder_plate[folder] = jump.plate_from_path(folder)
        site = int(d["site"]) if d.get("site") and d["site"].isdigit() else 1
        groups.setdefault((plate, d.get("well") or "A01", site), {})[d["channel"]] = p
    builder = IndexBuilder()
    for (pl, w, s), ch in groups.items():
        builder.add_record(pl, w, s, ch)
    return builder.build(), unmatched


def illum_for(df: pd.DataFrame | None, data_cfg: Any, base: str | None = None,
              **kwargs: Any) -> IllumCorrection | None:
    """The illumination correction ``data.illum`` asks for, from a load_data table (None: nothing to do).

    Without a table there is nothing to correct with: fine for ``auto`` and ``off``, an error for
    ``required``.
    """
    mode = getattr(data_cfg, "illum", "auto")
    if mode == "off":
        return None
    if df is None:
        if mode == "required":
            raise UserError("data.illum=required needs a load_data table with FileName_Illum<Name> columns "
                            "(set data.load_data=<load_data_with_illum.csv|parquet>)")
        return None
    return IllumCorrection.from_table(df, mode, base=base, **kwargs)


def read_image_table(path: str) -> pd.DataFrame:
    """A load_data / CytoTable / CellProfiler image table as plain load_data columns (folders resolved
    against the table's folder); a missing file is one line."""
    if not Path(path).exists():
        raise DataError(f"load_data file not found: {path}")
    return tables.read_table(path)


def folder_source(path: str, data_cfg: Any) -> IndexSource:
    """A local folder, searched recursively, of JUMP-named images (or files matching ``pattern``)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"path not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder or load_data file: {root}")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise DataError(f"no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) found in {root}")
    df = read_image_table(data_cfg.load_data) if data_cfg.load_data else None
    resolved: tuple[dict[int, str], str] | None = None
    if data_cfg.pattern:
        index, unmatched = group_by_pattern(paths, root, _compile_pattern(data_cfg.pattern))
    else:
        if df is not None and not jump.channel_map_from_load_data(df):
            raise DataError(f"load_data file {data_cfg.load_data} names no JUMP-style image files")
        resolved = resolve_channel_map(root, data_cfg.source_map, data_cfg.channel_map, df)
        index, unmatched = jump.group_files(paths, resolved[0])
        if len(index) and df is not None:
            index = jump.attach_load_data(index, jump.fields_from_load_data(df))
    if not len(index):
        hint = " (use --pattern for non-JUMP file names)" if not data_cfg.pattern else ""
        raise DataError(f"no image in {root} matches the expected file names{hint}")
    skipped = [f"{os.path.relpath(p, root)}: name not recognised" for p in unmatched]
    base = str(Path(data_cfg.load_data).resolve().parent) if data_cfg.load_data else None
    return IndexSource(index, data_cfg.channels, str(root), data_cfg.scaling, data_cfg.stain, skipped,
                       channel_map=resolved, illum=illum_for(df, data_cfg, base))


def load_data_source(path: str, data_cfg: Any, root: str | None = None) -> IndexSource:
    """Fields listed in a load_data / CytoTable table (CSV, CSV.gz, Parquet): its ``PathName_Orig*``
    folders (relative ones against the table's folder) or ``root``."""
    df = read_image_table(path)
    if root is None:
        tables.verify_images(df, limit=1)  # a wrong folder fails here, showing the full path tried
    index = jump.fields_from_load_data(df, root=root)
    if not len(index):
        raise DataError(f"load_data file {path} lists no fields")
    cmap = jump.channel_map_from_load_data(df)
    return IndexSource(index, data_cfg.channels, str(path), data_cfg.scaling, data_cfg.stain,
                       channel_map=(cmap, "load_data"),
                       illum=illum_for(df, data_cfg, str(Path(path).resolve().parent)))


register_source("load_data", lambda uri: not uri.startswith("s3://") and uri.lower().endswith(LOAD_DATA_SUFFIXES),
                load_data_source, priority=20)
register_source("folder", lambda uri: "://" not in uri, folder_source, priority=90)
