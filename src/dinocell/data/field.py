"""The unit of data: one field of view (plate, well, site) with one image per channel.

Also the pieces every source shares: the :class:`FieldSource` base class (select channels, load and
scale a field), channel-name helpers and the Phenix file-name pattern the columnar index regenerates
names from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinocell.data import intensity
from dinocell.data.decode import check_image, finish_field, read_image
from dinocell.errors import DataError

log = logging.getLogger(__name__)
_STATS_LOCK = threading.RLock()  # per process; a lock attribute would not pickle into DataLoader workers

#: Channels that are not fluorescent stains; they never enter the "mean of fluorescent channels" view.
BRIGHTFIELD_NAMES = frozenset({"brightfield", "bf", "brightfield_1", "brightfield_2", "brightfield_3",
                               "brightfieldlow", "brightfieldhigh", "highzbf", "lowzbf"})
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LOAD_DATA_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
#: Order in which channels are listed when the user does not choose.
STANDARD_CHANNELS = ("DNA", "RNA", "ER", "AGP", "Mito")
#: At most this many per-field problems are listed by ``describe()`` (the rest are counted).
MAX_LISTED_SKIPS = 100
#: ``verify()`` reads the header of every local file up to this many files; above it, of
#: :data:`VERIFY_SAMPLE_FIELDS` evenly spread fields (3M fields are 15M files: minutes per rank).
VERIFY_ALL_FILES = 20_000
VERIFY_SAMPLE_FIELDS = 256


def is_fluorescent(channel: str) -> bool:
    """True for stain channels, False for brightfield/transmitted-light channels."""
    name = channel.lower().replace("-", "_")
    return not (name in BRIGHTFIELD_NAMES or name.startswith("brightfield") or name.endswith("bf"))


def well_name(row: int, col: int) -> str:
    """Row 1, column 1 -> ``A01``."""
    if not 1 <= row <= 26 * 2:
        raise ValueError(f"row {row} out of range")
    letters = chr(ord("A") + row - 1) if row <= 26 else "A" + chr(ord("A") + row - 27)
    return f"{letters}{col:02d}"


def format_name(row: int, col: int, site: int, channel: int, plane: int = 1) -> str:
    """The Phenix (Harmony) file name of one channel of one site."""
    return f"r{row:02d}c{col:02d}f{site:02d}p{plane:02d}-ch{channel}sk1fk1fl1.tiff"


@dataclass
class FieldRecord:
    """One field: where each channel's image lives, plus metadata (Metadata_* columns).

    ``channels`` maps a channel name (``DNA``, ``AGP`` ...) to a local path or ``s3://`` URI.
    Synthetic fields have an empty mapping and carry their generator index in ``metadata``.
    """

    plate: str
    well: str
    site: int
    channels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A stable, unique id for the field."""
        return f"{self.plate}/{self.well}/{self.site}"


def select_channels(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """Choose channels by name (case-insensitive); unknown names fail with the available ones."""
    if not wanted:
        return list(available)
    lower = {a.lower(): a for a in available}
    out = []
    for w in wanted:
        if w.lower() not in lower:
            raise DataError(f"unknown channel '{w}'; available: {', '.join(available) or 'none'}")
        out.append(lower[w.lower()])
    return out


def order_channels(names: Iterable[str]) -> list[str]:
    """Standard stains first (DNA, RNA, ER, AGP, Mito), then the rest alphabetically."""
    order = {c: i for i, c in enumerate(STANDARD_CHANNELS)}
    return sorted(set(names), key=lambda c: (order.get(c, 99), c))


def take_records(records: Sequence[FieldRecord], idx: np.ndarray) -> Sequence[FieldRecord]:
    """``records`` at ``idx``: vectorised for a columnar index, a list otherwise."""
    take = getattr(records, "take", None)
    if take is not None:
        return take(np.asarray(idx, dtype=np.int64))
    return [records[int(i)] for i in idx]


class FieldSource:
    """Base class: a sequence of fields with named channels and a way to read them."""

    channels: list[str]
    fluorescent: list[bool]
    records: Sequence[FieldRecord]
    name: str = "source"
    #: Channel number -> stain name and where it came from (:mod:`dinocell.data.channels`); None for
    #: sources whose channels are named by their files (synthetic, ``pattern``).
    channel_map: dict[int, str] | None = None
    channel_map_origin: str | None = None
    #: Illumination correction (:class:`dinocell.data.illum.IllumCorrection`), applied before scaling.
    illum: Any = None
    #: JSON file caching per-plate intensity statistics (``data.scaling.mode=plate``).
    stats_path: str | None = None

    def __init__(self, scaling: Any = None, stain: Any = None) -> None:
        self.scaling = scaling
        self.stain = stain
        self.skipped: list[str] = []
        self._plate_stats: dict[str, intensity.PlateStats] = {}

    # -- reading ---------------------------------------------------------------------------------
    def load_raw(self, rec: FieldRecord) -> np.ndarray:
        """The field's selected channels as a (C,H,W) uint8/uint16 array."""
        planes = []
        for ch in self.channels:
            if ch not in rec.channels:
                raise DataError(f"field {rec.key} has no channel {ch}")
            planes.append(read_image(rec.channels[ch]))
        return stack_planes(rec, planes)

    def corrected(self, raw: np.ndarray, rec: FieldRecord) -> np.ndarray:
        """``raw`` divided by its plate's illumination functions (unchanged when there are none)."""
        return raw if self.illum is None else self.illum(raw, rec.plate, self.channels)

    def finish(self, raw: np.ndarray, rec: FieldRecord) -> np.ndarray:
        """A raw field made ready: illumination correction, then scaling by ``data.scaling.mode``."""
        ranges = intensity.field_ranges(self.scaling, self.channels, self.plate_stats(rec.plate)) \
            if self.scaling is not None and getattr(self.scaling, "mode", "field") != "field" else None
        return finish_field(self.corrected(raw, rec), self.scaling, self.stain, rec.key, ranges)

    def load(self, rec: FieldRecord) -> np.ndarray:
        """The field corrected and scaled per channel into float32 [0,1]; NaN/inf pixels make it a bad field."""
        return self.finish(self.load_raw(rec), rec)

    # -- per-plate intensity statistics ------------------------------------------------------------
    def plate_stats(self, plate: str) -> intensity.PlateStats | None:
        """The plate's [low, high] levels (``data.scaling.mode=plate``), from a sample of its
        illumination-corrected fields; computed once and kept in memory and in ``stats_path``."""
        if getattr(self.scaling, "mode", "field") != "plate":
            return None
        known = self.__dict__.setdefault("_plate_stats", {})  # subclasses that skip __init__ too
        if plate in known:
            return known[plate]
        with _STATS_LOCK:  # fetch threads of a streaming source must not compute one plate twice
            if plate not in known:
                known[plate] = self._load_or_compute_stats(plate)
        return known[plate]

    def _load_or_compute_stats(self, plate: str) -> intensity.PlateStats:
        illum_on = self.illum is not None and bool(getattr(self.illum, "active", True))
        key = intensity.stats_key(plate, self.channels, self.scaling, illum_on)
        path = self.stats_path or default_stats_path(self.name)
        stats = intensity.read_stats_file(path).get(key)
        if stats is None:
            stats = self._compute_plate_stats(plate)
            try:
                intensity.write_stats_file(path, {key: stats})
            except OSError as e:
                log.warning("could not cache plate statistics in %s: %s", path, e)
        return stats

    def _compute_plate_stats(self, plate: str) -> intensity.PlateStats:
        recs = self.records
        if hasattr(recs, "codes"):
            codes, names = recs.codes("plate")  # type: ignore[attr-defined]
            where = np.flatnonzero(codes == list(names).index(plate)) if plate in names else np.zeros(0, int)
        else:
            where = np.asarray([i for i, r in enumerate(recs) if r.plate == plate], dtype=np.int64)
        picks = where[intensity.sample_indices(len(where), int(self.scaling.plate_sample_fields))]

        def fields() -> Any:
            for i in picks:
                rec = recs[int(i)]
                try:
                    yield self.corrected(self.load_raw(rec), rec)
                except DataError as e:
                    log.warning("plate statistics of %s: skipping field %s: %s", plate, rec.key, e)

        stats = intensity.plate_statistics(fields(), self.channels, plate, self.scaling.low_percentile,
                                           self.scaling.high_percentile)
        log.info("plate %s: intensity levels from %d fields: %s", plate, stats.n_fields,
                 ", ".join(f"{c} [{lo:.0f}, {hi:.0f}]" for c, lo, hi in zip(stats.channels, stats.low, stats.high,
                                                                            strict=True)))
        return stats

    # -- reporting -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Summary for ``dinocell data ls``."""
        recs = self.records
        if hasattr(recs, "codes"):
            pc, pn = recs.codes("plate")  # type: ignore[attr-defined]
            wc, _ = recs.codes("well")  # type: ignore[attr-defined]
            plates = sorted({pn[i] for i in np.unique(pc)})
            wells = len(np.unique(pc.astype(np.int64) * (1 << 20) + wc))
        else:
            plates = sorted({r.plate for r in recs})
            wells = len({(r.plate, r.well) for r in recs})
        return {
            "source": self.name,
            "fields": len(recs),
            "channels": list(self.channels),
            "fluorescent": [c for c, f in zip(self.channels, self.fluorescent, strict=True) if f],
            "plates": plates,
            "wells": wells,
            "skipped": list(self.skipped),
            "channel_map": ({str(k): v for k, v in sorted(self.channel_map.items())}
                            if self.channel_map is not None else None),
            "channel_map_origin": self.channel_map_origin,
            # the selected channels' numbers, as read from the file names (Phenix sources)
            "channel_numbers": ({c: int(naming[c]) for c in self.channels if c in naming}
                                if (naming := getattr(recs, "naming", None)) else None),
            "illum": (None if self.illum is None else
                      "on" if getattr(self.illum, "active", False) else
                      f"off ({getattr(self.illum, 'disabled_reason', None) or 'data.illum=off'})"),
            "scaling": getattr(self.scaling, "mode", "field") if self.scaling is not None else None,
        }

    def verify(self) -> list[str]:
        """Check what can be checked cheaply before training; unreadable fields are dropped from
        ``records``, reported in ``skipped`` and returned.  All fields unreadable -> DataError.

        A columnar index is checked column-wise (:func:`verify_index`): channels present, one
        ``isdir`` per local folder, TIFF headers of every local file when there are at most
        :data:`VERIFY_ALL_FILES` (else of an evenly spread sample).  Remote (``s3://``) files are not
        checked here -- a field that fails to load while training is skipped and counted.  Nothing
        is copied unless a field is dropped: this runs on every rank of a 3M-field job.
        """
        recs = self.records
        if hasattr(recs, "cols"):
            bad_idx, bad = verify_index(recs, self.channels)
        else:
            bad_idx, bad = _verify_list(recs, self.channels)
        if not len(bad_idx):
            return []
        if len(bad_idx) == len(recs):
            raise DataError(f"no readable field in {self.name}: {bad[0]}")
        keep = np.ones(len(recs), dtype=bool)
        keep[bad_idx] = False
        self.records = take_records(recs, np.flatnonzero(keep))
        self.skipped.extend(bad)
        return bad

    def __len__(self) -> int:
        return len(self.records)


def _file_problems(rec: FieldRecord, channels: Sequence[str]) -> list[str]:
    return [f"{os.path.basename(p)}: {why}" for c in channels
            if (p := rec.channels.get(c)) and "://" not in p and (why := check_image(p))]


def _verify_list(records: Sequence[FieldRecord], channels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """``verify`` of a plain list of records (small sources: synthetic, tests): every local file."""
    bad_idx, bad = [], []
    for i, rec in enumerate(records):
        problems = _file_problems(rec, channels)
        if problems:
            bad_idx.append(i)
            bad.append(f"{rec.key}: {'; '.join(problems)}")
    return np.asarray(bad_idx, dtype=np.int64), bad


def verify_index(index: Any, channels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(indices of bad fields, one line per listed bad field) of a columnar
    :class:`~dinocell.data.index.FieldIndex`, without a per-field Python object where it can be
    helped: missing channels and missing local folders are found on the integer columns; file
    headers are read for every local file up to :data:`VERIFY_ALL_FILES`, else for a spread sample."""
    n = len(index)
    bad = ~index.has_channels(channels)
    gone_of: dict[str, tuple[np.ndarray, list[str], np.ndarray]] = {}
    remote = np.zeros(n, dtype=bool)
    done: set[int] = set()
    for c in channels:
        codes, folders = index.folder_codes(c)
        if not len(folders) or id(codes) in done:  # a Phenix index: one folder column for all
            continue
        done.add(id(codes))
        is_remote = np.array(["://" in f for f in folders], dtype=bool)
        if is_remote.all():  # an S3 index: nothing to look at per field
            remote[:] = True
            continue
        used = np.bincount(codes, minlength=len(folders)) > 0
        gone = np.zeros(len(folders), dtype=bool)
        for f in np.flatnonzero(used & ~is_remote):  # one stat per local folder, never per field
            gone[f] = bool(folders[f]) and not os.path.isdir(folders[f])
        if gone.any():
            gone_of[c] = (codes, folders, gone)
            bad |= gone[codes]
        if is_remote.any():
            remote |= is_remote[codes]
    if remote.any():
        log.info("verify: %d field(s) on remote storage are not checked before training (a field "
                 "that fails to load is skipped and counted)", int(remote.sum()))
    local = np.flatnonzero(~bad & ~remote)
    if len(local) * max(1, len(channels)) > VERIFY_ALL_FILES:
        picks = np.unique(np.linspace(0, len(local) - 1, VERIFY_SAMPLE_FIELDS).astype(np.int64))
        log.info("verify: reading the file headers of %d of %d local fields (the rest are checked "
                 "when loaded)", len(picks), len(local))
        local = local[picks]
    why: dict[int, str] = {}
    for i in local:
        problems = _file_problems(index[int(i)], channels)
        if problems:
            bad[i] = True
            why[int(i)] = "; ".join(problems)
    bad_idx = np.flatnonzero(bad)
    lines = []
    for i in bad_idx[:MAX_LISTED_SKIPS]:
        rec = index[int(i)]
        reason = why.get(int(i))
        if reason is None:
            missing = [c for c in channels if c not in rec.channels]
            gone = [f"{c}: folder not found: {fs[cs[i]]}" for c, (cs, fs, g) in gone_of.items() if g[cs[i]]]
            reason = "; ".join(gone) if gone else "missing channel(s) " + ", ".join(missing)
        lines.append(f"{rec.key}: {reason}")
    if len(bad_idx) > MAX_LISTED_SKIPS:
        lines.append(f"... and {len(bad_idx) - MAX_LISTED_SKIPS} more unreadable field(s)")
    return bad_idx, lines


def field_labels(records: Sequence[FieldRecord]) -> np.ndarray | None:
    """Per-field integer ``label`` metadata (-1 where absent), or None when no field has one.

    Computed once per dataset so a sample never builds a :class:`FieldRecord` just to look for a
    label: one column read on a columnar index, one pass over a (small) list of records otherwise."""
    if hasattr(records, "cols"):
        if "label" not in getattr(records, "meta", ()):
            return None
        codes, names = records.codes("label")  # type: ignore[attr-defined]
        table = np.array([int(v) if str(v).lstrip("-").isdigit() else -1 for v in names], dtype=np.int64)
        return table[codes] if len(table) else None
    out = np.full(len(records), -1, dtype=np.int64)
    found = False
    for i, rec in enumerate(records):
        v = rec.metadata.get("label")
        if v is not None:
            out[i] = int(v)
            found = True
    return out if found else None


def stack_planes(rec: FieldRecord, planes: list[np.ndarray]) -> np.ndarray:
    """One (C,H,W) array from a field's channel planes (all must have one size)."""
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise DataError(f"field {rec.key} has channels of different sizes: {sorted(shapes)}")
    return np.stack(planes)


def default_stats_path(source_name: str) -> str:
    """``$XDG_CACHE_HOME/dinocell/plate-stats-<hash of the source>.json`` (the per-plate levels cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(os.path.abspath(source_name).encode() if "://" not in source_name
                            else source_name.encode()).hexdigest()[:20]
    return os.path.join(base, "dinocell", f"plate-stats-{digest}.json")
