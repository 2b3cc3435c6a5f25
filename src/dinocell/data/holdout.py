"""The held-out split: whole wells that training never reads, decided once per run.

Why wells, not fields: the sites of one well show the same treatment, often the same cells at the
border; a field-level split would let evaluation score fields whose neighbours were trained on.

The rule is pure and deterministic: every well gets a score from ``sha256(salt:PLATE/WELL)`` and, per
plate, the ``round(fraction * wells)`` lowest scores are held out (at least one well of every plate
with two or more wells when ``fraction > 0``; never all of them).  The score depends on the names only,
so the split is the same on every machine, every rank and every rerun, and a well keeps its side when
plates are added.  An explicit ``PLATE/WELL`` list replaces the rule.

:func:`split_source` works on any :class:`~dinocell.data.sources.FieldSource` (records carry plate and
well).  A run keeps its list in ``DIR/holdout.txt``; :func:`heldout_source` gives ``dinocell evaluate``
/ ``embed`` the held-out fields of a run folder.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.data.field import FieldRecord
from dinocell.data.index import FieldIndex
from dinocell.errors import ConfigError, UserError
from dinocell.paths import once_per_job, write_text_atomic
from dinocell.runs import RunDir


def well_key(rec: FieldRecord) -> str:
    """``PLATE/WELL`` of a record: the unit of the split."""
    return f"{rec.plate}/{rec.well}"


def well_score(key: str, salt: str = "dinocell") -> float:
    """A uniform number in [0, 1) from the well's name alone (sha256: stable across Python versions)."""
    return float(well_hashes([key], salt)[0]) / 2.0**64


def well_hashes(keys: Sequence[str], salt: str = "dinocell") -> np.ndarray:
    """The first 8 bytes of ``sha256(salt:key)`` of every key as uint64 (what :func:`well_score` scales
    to [0, 1)); one bulk pass, ~30% cheaper than a Python float per well at 3x10^5 wells."""
    prefix, sha = f"{salt}:".encode(), hashlib.sha256
    blob = b"".join([sha(prefix + k.encode()).digest()[:8] for k in keys])
    return np.frombuffer(blob, dtype=">u8").astype(np.uint64)


def well_groups(records: Sequence[FieldRecord]) -> tuple[np.ndarray, list[str], list[str]]:
    """(per-field well number, plate of each well, ``PLATE/WELL`` of each well): the one grouping of
    fields by well, shared by the held-out split and anything else per well.

    On a columnar :class:`~dinocell.data.index.FieldIndex` it is :meth:`~FieldIndex.well_rows` (O(n)
    on a built index, whose wells are runs; no per-field Python object) plus one string per well,
    computed once per index; a plain list of records takes the generic path."""
    if isinstance(records, FieldIndex):
        cached = records.__dict__.get("_well_groups")
        if cached is None:
            first, well_of = records.well_rows()
            pc, plates = records.codes("plate")
            wc, wells = records.codes("well")
            id_plates = [plates[i] for i in pc[first].tolist()]
            keys = [f"{p}/{wells[w]}" for p, w in zip(id_plates, wc[first].tolist(), strict=True)]
            cached = records.__dict__["_well_groups"] = (well_of, id_plates, keys)
        return cached
    pairs = [(r.plate, r.well) for r in records]
    uniq_pairs = sorted(set(pairs))
    lookup = {pw: i for i, pw in enumerate(uniq_pairs)}
    ids = np.fromiter((lookup[pw] for pw in pairs), dtype=np.int64, count=len(pairs))
    return ids, [p for p, _ in uniq_pairs], [f"{p}/{w}" for p, w in uniq_pairs]


def heldout_wells(records: Sequence[FieldRecord], fraction: float, salt: str = "dinocell") -> list[str]:
    """The wells the rule holds out (sorted ``PLATE/WELL``): ``fraction`` of each plate's wells.

    Vectorised (one sort of all wells by plate, then score, then name): at JUMP scale (3x10^5 wells)
    every rank decides it before its first step, so its cost is paid eight times on an 8-GPU node."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"config key 'data.holdout.fraction' must be in [0, 1), got {fraction}")
    _, id_plates, keys = well_groups(records)
    if fraction <= 0 or not keys:
        return []
    codes: dict[str, int] = {}
    plate_of = np.fromiter((codes.setdefault(p, len(codes)) for p in id_plates), dtype=np.int64, count=len(keys))
    score = well_hashes(keys, salt) / 2.0**64  # the floats well_score gives: ties break the same way
    order = np.lexsort((score, plate_of))  # by plate, then score
    plate_sorted, score_sorted = plate_of[order], score[order]
    if ((np.diff(plate_sorted) == 0) & (np.diff(score_sorted) == 0)).any():
        # equal scores (not seen in practice): the name decides, as in well_score's sort (the plate
        # column keeps its sorted order, so plate_sorted stands)
        name_rank = np.argsort(np.asarray(keys, dtype=object), kind="stable").argsort(kind="stable")
        order = np.lexsort((name_rank, score, plate_of))
    starts = np.flatnonzero(np.r_[True, plate_sorted[1:] != plate_sorted[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    take = np.where(sizes < 2, 0, np.minimum(sizes - 1, np.maximum(1, np.round(fraction * sizes)))).astype(np.int64)
    pos = np.arange(len(order)) - np.repeat(starts, sizes)  # rank of each well inside its plate
    held = order[pos < np.repeat(take, sizes)]
    return sorted(keys[i] for i in held.tolist())


def resolve_wells(records: Sequence[FieldRecord], holdout: Any, cache: Path | None = None) -> list[str]:
    """The held-out wells of ``records`` for a ``HoldoutConfig``: its explicit ``wells`` (checked) or the rule.

    ``cache`` (a source's index file) lets the processes of one job share the rule's result: one
    computes it, the others read it (:func:`shared_heldout_wells`)."""
    if holdout.wells:
        wanted = sorted({str(w).strip() for w in holdout.wells if str(w).strip()})
        present = set(well_groups(records)[2])
        if not any(w in present for w in wanted):
            raise ConfigError(f"config key 'data.holdout.wells' names no well of this source (e.g. "
                              f"'{wanted[0]}'; wells look like '{next(iter(sorted(present)), 'PLATE/A01')}')")
        return wanted
    if cache is not None:
        return shared_heldout_wells(records, holdout.fraction, holdout.salt, cache)
    return heldout_wells(records, holdout.fraction, holdout.salt)


def shared_heldout_wells(records: Sequence[FieldRecord], fraction: float, salt: str, cache: Path) -> list[str]:
    """:func:`heldout_wells`, decided by one process per job and read by the others.

    Why: at JUMP scale the rule hashes ~3x10^5 well names (~0.4 CPU-s), and the ranks of a job start
    together on the same cores.  The file sits beside ``cache`` and is named by a digest of the salt,
    the fraction and every well name, so another selection of fields never reads it; it is written
    atomically under a file lock (:func:`~dinocell.paths.once_per_job`).  Any trouble with the file
    falls back to computing here."""
    keys = well_groups(records)[2]
    digest = hashlib.sha256("\n".join([salt, repr(float(fraction)), *keys]).encode()).hexdigest()[:16]
    path = cache.with_name(f"{cache.name}.holdout-{digest}.txt")

    def read() -> list[str] | None:
        try:
            return [w for w in path.read_text().splitlines() if w] if path.is_file() else None
        except OSError:
            return None

    def make() -> list[str]:
        wells = heldout_wells(records, fraction, salt)
        with contextlib.suppress(OSError):  # unwritable: this process decided, the others decide too
            write_text_atomic(path, "".join(f"{w}\n" for w in wells))
        return wells

    return once_per_job(path, read, make, timeout_s=600)


def split_indices(records: Sequence[FieldRecord], wells: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) record indices for a set of held-out ``PLATE/WELL`` keys (vectorised)."""
    held = set(wells)
    ids, _, keys = well_groups(records)
    held_id = np.array([k in held for k in keys], dtype=bool)
    mask = held_id[ids] if len(keys) else np.zeros(len(ids), dtype=bool)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def subset_source(source: Any, indices: Sequence[int] | np.ndarray) -> Any:
    """A shallow copy of ``source`` restricted to ``records[indices]`` (loading, channels, caches shared).

    A columnar index stays columnar (``take``); a list of records stays a list."""
    sub = copy.copy(source)
    idx = np.asarray(indices, dtype=np.int64)
    if hasattr(source.records, "take"):
        sub.records = source.records.take(idx)
    else:
        sub.records = [source.records[int(i)] for i in idx]
    return sub


def split_source(source: Any, wells: Iterable[str]) -> tuple[Any, Any]:
    """(training source, held-out source) of any FieldSource for the held-out ``wells``."""
    train, test = split_indices(source.records, wells)
    if not len(train):
        raise UserError(f"every field of {source.name} is held out for evaluation; lower "
                        "data.holdout.fraction or list fewer data.holdout.wells")
    return subset_source(source, train), subset_source(source, test)


def write_holdout_file(run_dir: str | os.PathLike[str], wells: Sequence[str]) -> Path:
    """``DIR/holdout.txt``: one ``PLATE/WELL`` per line (atomic)."""
    return write_text_atomic(RunDir(run_dir).holdout, "".join(f"{w}\n" for w in wells))


def read_holdout_file(run_dir: str | os.PathLike[str]) -> list[str] | None:
    """The held-out wells a run decided, or ``None`` when the folder has no ``holdout.txt``."""
    path = RunDir(run_dir).holdout
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def heldout_source(run_dir: str | os.PathLike[str], source: Any = None) -> Any:
    """The held-out fields of a training run, for ``dinocell evaluate`` / ``embed``.

    ``source`` defaults to the run's own data (``DIR/config.yaml``); the wells come from
    ``DIR/holdout.txt`` (or, for runs without it, the config's rule).  Raises ``UserError`` when the
    folder is not a run or nothing is held out.
    """
    from dinocell.config import load_config
    from dinocell.data.sources import open_source

    run = Path(run_dir)
    cfg_path = RunDir(run).config
    if not cfg_path.is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml)")
    cfg = load_config(cfg_path)
    src = source if source is not None else open_source(cfg.data)
    wells = read_holdout_file(run)
    if wells is None:
        wells = resolve_wells(src.records, cfg.data.holdout)
    _, held = split_indices(src.records, wells)
    if not len(held):
        raise UserError(f"run {run} holds out no field of {src.name}")
    return subset_source(src, held)
