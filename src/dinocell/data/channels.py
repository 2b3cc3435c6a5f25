"""Which stain sits in which Phenix channel: resolved from evidence, never guessed silently.

A Phenix file name says ``-ch3``, not "RNA", and the number-to-stain map differs between JUMP
sources.  :func:`resolve_channel_map` takes the strongest evidence available and says where it came
from:

1. ``load_data``: the plate's load_data table (``FileName_Orig<Name>`` columns) — the ground truth;
2. ``channel_map``: an explicit ``data.channel_map={1: Mito, ...}``;
3. ``phenix_index``: the Harmony export's ``Index.idx.xml`` / ``Index.xml`` next to the images, whose
   ``<Maps><Map><Entry ChannelID="k"><ChannelName>`` records name each channel's dye; dyes are
   turned into Cell Painting stains with :data:`DYE_STAINS` (the table JUMP's pe2loaddata configs use);
4. ``source_map``: a built-in map, only when the path (a ``source_N`` folder) or ``data.source_map``
   names the source;
5. ``assumed``: otherwise source_4's map, with one loud warning naming the three overrides.
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from dinocell.data.jump import CHANNEL_MAPS, channel_map, channel_map_from_load_data
from dinocell.errors import DataError

log = logging.getLogger(__name__)

ORIGINS = ("load_data", "channel_map", "phenix_index", "source_map", "assumed")
ASSUMED_SOURCE = "source_4"
INDEX_NAMES = ("Index.idx.xml", "Index.xml")

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


def _warn_assumed() -> None:
    if ASSUMED_SOURCE in _warned:
        return
    _warned.add(ASSUMED_SOURCE)
    cmap = ", ".join(f"ch{k} {v}" for k, v in CHANNEL_MAPS[ASSUMED_SOURCE].items())
    log.warning(
        "CHANNEL MAP ASSUMED: nothing says which stain each Phenix channel holds (no load_data table, "
        "no Index.idx.xml, no source_N in the path), so the %s map is used: %s. If your plates were "
        "imaged differently, every channel name is wrong. Set one of: data.source_map=<source>, "
        "data.channel_map='{1: Mito, 2: AGP, ...}', or data.load_data=<load_data.csv|parquet>.",
        ASSUMED_SOURCE, cmap)


def resolve_channel_map(folder_or_paths: str | os.PathLike[str] | Sequence[str] | None,
                        source_map_cfg: str | None = None,
                        channel_map_cfg: Mapping[int, str] | None = None,
                        load_data_df: pd.DataFrame | None = None) -> tuple[dict[int, str], str]:
    """The channel-number -> stain map and its origin (one of :data:`ORIGINS`); see the module doc."""
    if load_data_df is not None:
        cmap = channel_map_from_load_data(load_data_df)
        if cmap:
            return cmap, "load_data"
    if channel_map_cfg:
        return {int(k): str(v) for k, v in channel_map_cfg.items()}, "channel_map"
    if folder_or_paths is None:
        paths: list[str] = []
    elif isinstance(folder_or_paths, (str, os.PathLike)):
        paths = [os.fspath(folder_or_paths)]
    else:
        paths = [str(p) for p in folder_or_paths]
    local = [Path(p) for p in paths[:1] if "://" not in p]
    folder = (local[0] if local[0].is_dir() else local[0].parent) if local else None
    index = find_phenix_index(folder) if folder is not None and folder.is_dir() else None
    if index is not None:
        return dyes_to_stains(parse_phenix_index(index)), "phenix_index"
    named = source_map_cfg or source_named_by(paths)
    if named:
        if named not in CHANNEL_MAPS:
            raise DataError(f"no built-in channel map for '{named}' (known: {', '.join(sorted(CHANNEL_MAPS))}); "
                            f"set data.channel_map='{{1: Mito, ...}}' or data.load_data=<its load_data file>")
        return dict(channel_map(named)), "source_map"
    _warn_assumed()
    return dict(channel_map(ASSUMED_SOURCE)), "assumed"


__all__ = ["DYE_STAINS", "ORIGINS", "dyes_to_stains", "find_phenix_index", "parse_phenix_index",
           "resolve_channel_map", "source_named_by"]
