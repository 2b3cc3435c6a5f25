"""Which stain sits in which Phenix channel: resolved from evidence, never guessed silently.

A Phenix file name says ``-ch3``, not "RNA", and the number-to-stain map differs between JUMP
sources.  :func:`resolve_channel_map` takes the strongest evidence available and says where it came
from:

1. ``load_data``: the plate's load_data table (``FileName_Orig<Name>`` columns) — the ground truth;
   given as ``data.load_data``, or a ``load_data.csv`` / ``.parquet`` lying in the image folder itself
   (what ``dinocell data synth`` and pe2loaddata leave there; an explicit ``data.source_map`` wins
   over such a found table);
2. ``channel_map``: an explicit ``data.channel_map={1: Mito, ...}``, or ``data.channel_map=source_4``
   (a built-in map named on purpose: the way to accept the guess below);
3. ``phenix_index``: the Harmony export's ``Index.idx.xml`` / ``Index.xml`` next to the images, whose
   ``<Maps><Map><Entry ChannelID="k"><ChannelName>`` records name each channel's dye; dyes are
   turned into Cell Painting stains with :data:`DYE_STAINS` (the table JUMP's pe2loaddata configs use);
4. ``source_map``: a built-in map, only when the path (a ``source_N`` folder) or ``data.source_map``
   names the source;
5. ``assumed``: otherwise source_4's map, with one loud warning naming the three overrides.

Commands whose outputs carry the channel names for good (``pretrain``, ``embed``, ``segment``) run
inside :func:`refuse_assumed_channel_map`: there an assumed map is a one-line :class:`DataError`
saying how to give one, while ``data ls`` / ``data check`` keep showing the guess with its warning.
:func:`channel_map_record` is what a run writes down (map + origin) so the choice is never implicit.
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from dinocell.data.jump import CHANNEL_MAPS, channel_map, channel_map_from_load_data, read_load_data
from dinocell.errors import DataError

log = logging.getLogger(__name__)

ORIGINS = ("load_data", "channel_map", "phenix_index", "source_map", "assumed")
ASSUMED_SOURCE = "source_4"
INDEX_NAMES = ("Index.idx.xml", "Index.xml")
#: load_data tables recognised inside an image folder (pe2loaddata / ``dinocell data synth`` names).
FOLDER_TABLES = ("load_data.csv", "load_data.csv.gz", "load_data.parquet", "load_data_with_illum.csv",
                 "load_data_with_illum.csv.gz", "load_data_with_illum.parquet")

#: Dye (Harmony ``ChannelName``) -> Cell Painting stain, lower-cased keys.  From the channel tables of
#: the JUMP Phenix exports (Cell Painting v3: Hoechst -> DNA, ConA-488 -> ER, SYTO14 in the 488 long-pass
#: channel -> RNA, phalloidin/WGA-568 -> AGP, MitoTracker Deep Red -> Mito).
DYE_STAINS: dict[str, str] = {
    "hoechst 33342": "DNA",
    "alexa 488": "ER",
    "488 long": "RNA",
    "488 650": "RNA",
    "alexa 488 em 650": "RNA",
    "alexa 568": "AGP",
    "alexa 647": "Mito",
    "brightfield": "Brightfield",
    "brightfield high": "Brightfield_high",
    "brightfield low": "Brightfield_low",
    "digital phase contrast": "DPC",
}

_SOURCE_DIR = re.compile(r"^source_\d+$")
_warned: set[str] = set()
_refusing: list[str] = []  # commands (innermost last) that refuse an assumed map


@contextmanager
def refuse_assumed_channel_map(command: str) -> Iterator[None]:
    """Within this block an assumed channel map raises a one-line :class:`DataError` (see the module doc).

    A process-wide switch rather than a parameter: sources are opened deep inside pretraining,
    embedding and segmentation (datamodule, S3 index, predict inputs), and every one of them resolves
    its map here."""
    _refusing.append(command)
    try:
        yield
    finally:
        _refusing.pop()


def assumed_map_message(command: str, where: str) -> str:
    """The one line a refusing command prints: what is missing and the three ways to say it."""
    guess = ", ".join(f"{k}: {v}" for k, v in list(CHANNEL_MAPS[ASSUMED_SOURCE].items())[:5])
    return (f"{command}: nothing says which stain each Phenix channel of {where} holds (no load_data table, "
            f"no Index.idx.xml, no source_N folder in the path); give the map with "
            f"data.channel_map='{{{guess}}}' (with your plates' numbers), data.load_data=<load_data.csv|parquet>, "
            f"or data.channel_map={ASSUMED_SOURCE} to accept the {ASSUMED_SOURCE} guess "
            f"('dinocell data ls' shows it)")


def _local(tag: str) -> str:
    """Tag without its XML namespace (Harmony versions use different namespaces)."""
    return tag.rsplit("}", 1)[-1]


def parse_phenix_index(src: str | os.PathLike[str] | bytes) -> dict[int, str]:
    """``{channel number: ChannelName}`` of a Harmony ``Index.idx.xml`` / ``Index.xml``.

    Reads ``Maps/Map/Entry[@ChannelID]/ChannelName`` (the Map holding names need not be the first:
    others hold flat-field profiles), and falls back to ``Images/Image`` records (``ChannelID`` +
    ``ChannelName``), which older exports carry per image.
    """
    name = "<bytes>" if isinstance(src, bytes) else os.fspath(src)
    try:
        root = ET.fromstring(src) if isinstance(src, bytes) else ET.parse(name).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"cannot read Phenix index {name}: {e}") from None
    out: dict[int, str] = {}
    for el in root.iter():
        tag = _local(el.tag)
        if tag == "Entry" and el.get("ChannelID"):
            cname = next((c.text for c in el if _local(c.tag) == "ChannelName" and c.text), None)
            if cname:
                out.setdefault(int(el.get("ChannelID", "0")), cname.strip())
        elif tag == "Image":
            fields = {_local(c.tag): (c.text or "").strip() for c in el}
            if fields.get("ChannelID", "").isdigit() and fields.get("ChannelName"):
                out.setdefault(int(fields["ChannelID"]), fields["ChannelName"])
    if not out:
        raise DataError(f"Phenix index {name} names no channels (no Entry/ChannelName records)")
    return dict(sorted(out.items()))


def dyes_to_stains(dyes: Mapping[int, str]) -> dict[int, str]:
    """Dye names -> stain names via :data:`DYE_STAINS`; an unknown dye keeps its name (spaces -> ``_``)."""
    return {k: DYE_STAINS.get(v.strip().lower(), re.sub(r"\W+", "_", v.strip()).strip("_") or f"ch{k}")
            for k, v in dyes.items()}


def find_phenix_index(folder: str | os.PathLike[str]) -> Path | None:
    """An ``Index.idx.xml`` / ``Index.xml`` in ``folder``, its ``Images/`` subfolder or its parent."""
    base = Path(folder)
    if base.is_file():
        base = base.parent
    for d in (base, base / "Images", base.parent):
        for n in INDEX_NAMES:
            if (d / n).is_file():
                return d / n
    return None


def source_named_by(paths: Sequence[str]) -> str | None:
    """The JUMP source a path names through a ``source_N`` folder (``.../source_4/images/...``)."""
    for p in paths:
        for part in re.split(r"[/\\]", str(p)):
            if _SOURCE_DIR.match(part):
                return part
    return None


def find_folder_table(folder: str | os.PathLike[str]) -> Path | None:
    """A load_data table (:data:`FOLDER_TABLES`) lying in ``folder`` itself."""
    base = Path(folder)
    for n in FOLDER_TABLES:
        if (base / n).is_file():
            return base / n
    return None


def _map_from_folder_table(folder: Path) -> dict[int, str] | None:
    table = find_folder_table(folder)
    if table is None:
        return None
    try:
        cmap = channel_map_from_load_data(read_load_data(table))
    except DataError as e:  # not a load_data table after all: no evidence, say why
        log.warning("ignoring %s for the channel map: %s", table, e)
        return None
    if cmap:
        log.info("channel map from %s: %s", table, cmap)
    return cmap or None


def _explicit_map(cfg: Mapping[int, str] | str) -> dict[int, str]:
    """``data.channel_map`` as a map: a mapping (numbers >= 1, distinct names) or a built-in source name."""
    if isinstance(cfg, str):
        if cfg not in CHANNEL_MAPS:
            raise DataError(f"data.channel_map={cfg!r} is neither a map like '{{1: Mito, 2: AGP}}' nor a known "
                            f"source ({', '.join(sorted(CHANNEL_MAPS))})")
        return dict(channel_map(cfg))
    out: dict[int, str] = {}
    for k, v in cfg.items():
        try:
            n = int(k)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or not str(v).strip():
            raise DataError(f"data.channel_map entry {k!r}: {v!r} is not '<channel number >= 1>: <stain name>'")
        out[n] = str(v).strip()
    dup = sorted({v for v in out.values() if list(out.values()).count(v) > 1})
    if dup:
        raise DataError(f"data.channel_map names {', '.join(dup)} for more than one channel number; "
                        "each stain must come from one channel")
    return out


def _warn_assumed() -> None:
    if ASSUMED_SOURCE in _warned:
        return
    _warned.add(ASSUMED_SOURCE)
    cmap = ", ".join(f"ch{k} {v}" for k, v in CHANNEL_MAPS[ASSUMED_SOURCE].items())
    log.warning(
        "CHANNEL MAP ASSUMED: nothing says which stain each Phenix channel holds (no load_data table, "
        "no Index.idx.xml, no source_N in the path), so the %s map is used: %s. If your plates were "
        "imaged differently, every channel name is wrong. Set one of: data.channel_map='{1: Mito, 2: AGP, ...}', "
        "data.load_data=<load_data.csv|parquet>, or data.channel_map=<source> (e.g. %s; data.source_map=<source> "
        "is the same) to accept a built-in map; pretrain, embed and segment refuse to run on this guess.",
        ASSUMED_SOURCE, cmap, ASSUMED_SOURCE)


def resolve_channel_map(folder_or_paths: str | os.PathLike[str] | Sequence[str] | None,
                        source_map_cfg: str | None = None,
                        channel_map_cfg: Mapping[int, str] | str | None = None,
                        load_data_df: pd.DataFrame | None = None) -> tuple[dict[int, str], str]:
    """The channel-number -> stain map and its origin (one of :data:`ORIGINS`); see the module doc."""
    if load_data_df is not None:
        cmap = channel_map_from_load_data(load_data_df)
        if cmap:
            return cmap, "load_data"
    if channel_map_cfg:
        return _explicit_map(channel_map_cfg), "channel_map"
    if folder_or_paths is None:
        paths: list[str] = []
    elif isinstance(folder_or_paths, (str, os.PathLike)):
        paths = [os.fspath(folder_or_paths)]
    else:
        paths = [str(p) for p in folder_or_paths]
    local = [Path(p) for p in paths[:1] if "://" not in p]
    folder = (local[0] if local[0].is_dir() else local[0].parent) if local else None
    if (folder is not None and folder.is_dir() and isinstance(folder_or_paths, (str, os.PathLike))
            and not source_map_cfg):  # an explicit data.source_map wins over a table found lying there
        table_map = _map_from_folder_table(folder)
        if table_map:
            return table_map, "load_data"
    index = find_phenix_index(folder) if folder is not None and folder.is_dir() else None
    if index is not None:
        return dyes_to_stains(parse_phenix_index(index)), "phenix_index"
    named = source_map_cfg or source_named_by(paths)
    if named:
        if named not in CHANNEL_MAPS:
            raise DataError(f"no built-in channel map for '{named}' (known: {', '.join(sorted(CHANNEL_MAPS))}); "
                            f"set data.channel_map='{{1: Mito, ...}}' or data.load_data=<its load_data file>")
        return dict(channel_map(named)), "source_map"
    if _refusing:
        where = paths[0] if len(paths) == 1 else (f"{len(paths)} files under {os.path.dirname(paths[0])}"
                                                  if paths else "the source")
        raise DataError(assumed_map_message(_refusing[-1], where))
    _warn_assumed()
    return dict(channel_map(ASSUMED_SOURCE)), "assumed"


def channel_map_record(source: Any) -> dict[str, Any]:
    """What a run records about its channel names (for ``config.yaml`` / ``summary.json`` / manifests):
    ``{"channel_map": {"1": "Mito", ...} | None, "channel_map_origin": <origin>, "channels": [...]}``.

    ``channel_map`` is None where the source names channels itself (synthetic data, ``data.pattern``);
    the origin then says so (``named_by_source``), so a record never leaves the question open."""
    cmap = getattr(source, "channel_map", None)
    origin = getattr(source, "channel_map_origin", None)
    return {"channel_map": {str(k): v for k, v in sorted(cmap.items())} if cmap else None,
            "channel_map_origin": origin or ("load_data" if cmap == {} else "named_by_source"),
            "channels": list(getattr(source, "channels", []) or [])}


__all__ = ["DYE_STAINS", "FOLDER_TABLES", "ORIGINS", "assumed_map_message", "channel_map_record",
           "dyes_to_stains", "find_folder_table", "find_phenix_index", "parse_phenix_index",
           "refuse_assumed_channel_map", "resolve_channel_map", "source_named_by"]
