"""Illumination correction from a ``load_data_with_illum`` table (CellProfiler / JUMP).

Microscope fields are brighter in the centre than at the edges; JUMP ships one illumination function
per plate and channel (``<batch>/illum/<plate>/<plate>_Illum<Name>.npy``), computed by CellProfiler's
CorrectIlluminationCalculate over all of the plate's images.  The corrected image is ``raw / illum``,
and it must happen *before* intensity scaling: percentiles of an uncorrected field are dominated by
its bright centre.  The table names the files in ``FileName_Illum<Name>`` / ``PathName_Illum<Name>``
columns (CytoTable exports prefix them with ``Image_``).

Each function is read once per plate through a pluggable byte reader (local files by default, the
S3 fetch function for ``s3://``) and kept in an LRU bounded by bytes, so a stream over many plates
holds only the plates in flight.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from dinocell.errors import DataError, UserError

log = logging.getLogger(__name__)

MODES = ("auto", "off", "required")
_PREFIXES = ("Image_", "")  # CytoTable's prefixed form first, then CellProfiler's plain one
DEFAULT_CACHE_BYTES = 256 * 2**20  # ~50 float32 1080x1080 functions: 10 plates x 5 stains


def _col(df: pd.DataFrame, name: str) -> str | None:
    for p in _PREFIXES:
        if p + name in df.columns:
            return p + name
    return None


def illum_channels(df: pd.DataFrame) -> list[str]:
    """Channel names with a ``FileName_Illum<Name>`` column (plain or ``Image_`` prefixed)."""
    names = []
    for c in df.columns:
        stem = c[len("Image_"):] if c.startswith("Image_") else c
        if stem.startswith("FileName_Illum") and stem[len("FileName_Illum"):] not in names:
            names.append(stem[len("FileName_Illum"):])
    return names


def join_path(folder: Any, name: str) -> str:
    """``folder/name`` for local folders and ``s3://`` URIs alike; empty folder -> ``name``."""
    folder = "" if folder is None else str(folder)
    if not folder or folder.lower() in ("nan", "none"):
        return name
    return folder.rstrip("/") + "/" + name


def illum_paths(df: pd.DataFrame, base: str | None = None) -> dict[tuple[str, str], str]:
    """``{(plate, channel): path}`` of every illumination function the table names.

    Relative ``PathName_Illum*`` folders are resolved against ``base`` (the table's folder).  Rows of
    one plate that disagree on a path are a :class:`DataError`: one plate has one function per channel.
    """
    plate_col = _col(df, "Metadata_Plate")
    out: dict[tuple[str, str], str] = {}
    for name in illum_channels(df):
        fcol = _col(df, f"FileName_Illum{name}")
        pcol = _col(df, f"PathName_Illum{name}")
        cols = [c for c in (plate_col, fcol, pcol) if c is not None]
        for row in df[cols].drop_duplicates().itertuples(index=False):
            rec = dict(zip(cols, row, strict=True))
            fname = str(rec[fcol])
            if not fname or fname.lower() == "nan":
                continue
            folder = str(rec[pcol]) if pcol is not None else ""
            if base and folder and "://" not in folder and not os.path.isabs(folder):
                folder = os.path.join(base, folder)
            path = join_path(folder if pcol is not None else base, fname)
            key = (str(rec[plate_col]) if plate_col is not None else "plate", name)
            if key in out and out[key] != path:
                raise DataError(f"plate {key[0]} names two illumination functions for {name}: "
                                f"{out[key]} and {path}")
            out[key] = path
    return out


def read_local(path: str) -> bytes:
    """The default byte reader: a local file."""
    with open(path, "rb") as f:
        return f.read()


def sanitise(illum: np.ndarray) -> np.ndarray:
    """The function as float32 with zeros, negatives and NaN/inf replaced by 1 (no correction there):
    dividing by them would create inf/NaN pixels that poison the field's percentiles."""
    f = np.asarray(illum, dtype=np.float32)
    bad = ~np.isfinite(f) | (f <= np.finfo(np.float32).tiny)
    if bad.any():
        f = f.copy()
        f[bad] = 1.0
    return f


def apply_illum(raw_channel: np.ndarray, illum: np.ndarray) -> np.ndarray:
    """``raw / illum`` as float32 (apply before scaling).  Shapes must match."""
    if raw_channel.shape != illum.shape:
        raise DataError(f"illumination function has shape {illum.shape}, image has {raw_channel.shape}")
    return np.divide(raw_channel, sanitise(illum), dtype=np.float32)


class IllumCache:
    """Thread-safe LRU of decoded illumination functions, bounded by bytes (float32 arrays)."""

    def __init__(self, read_bytes: Callable[[str], bytes] = read_local,
                 max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.read_bytes = read_bytes
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.reads = 0  # how many files were actually read (tests and logs)
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for DataLoader workers without the locks and the decoded functions."""
        state = self.__dict__.copy()
        state.update(_lru=OrderedDict(), nbytes=0, _lock=None, _loading={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, path: str) -> np.ndarray:
        """The function at ``path``; read once, then served from memory while it fits."""
        with self._lock:
            if path in self._lru:
                self._lru.move_to_end(path)
                return self._lru[path]
            gate = self._loading.setdefault(path, threading.Lock())
        with gate:  # one reader per path; others wait for it instead of reading again
            with self._lock:
                if path in self._lru:
                    return self._lru[path]
            arr = self._load(path)
            with self._lock:
                self._lru[path] = arr
                self.nbytes += arr.nbytes
                while self.nbytes > self.max_bytes and len(self._lru) > 1:
                    _, old = self._lru.popitem(last=False)
                    self.nbytes -= old.nbytes
                self._loading.pop(path, None)
            return arr

    def _load(self, path: str) -> np.ndarray:
        data = self.read_bytes(path)  # FileNotFoundError / the S3 client's own errors propagate
        self.reads += 1
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise DataError(f"cannot read illumination function {path}: {type(e).__name__}: {e}") from None
        if arr.ndim != 2:
            raise DataError(f"illumination function {path} has shape {arr.shape}; expected 2-D")
        return sanitise(arr)


class IllumCorrection:
    """Applies a table's illumination functions to raw (C,H,W) fields according to ``data.illum``.

    ``auto``: correct when the table has Illum columns and the files can be read; otherwise warn once
    and leave fields uncorrected.  ``required``: a missing column or file is a one-line
    :class:`UserError` naming it.  ``off``: never correct.
    """

    def __init__(self, paths: dict[tuple[str, str], str], mode: str = "auto",
                 read_bytes: Callable[[str], bytes] = read_local, max_bytes: int = DEFAULT_CACHE_BYTES,
                 missing_errors: tuple[type[BaseException], ...] = (FileNotFoundError,)) -> None:
        if mode not in MODES:
            raise UserError(f"data.illum must be one of {', '.join(MODES)}; got '{mode}'")
        self.paths = dict(paths)
        self.mode = mode
        self.cache = IllumCache(read_bytes, max_bytes)
        self.missing_errors = missing_errors
        self.disabled_reason: str | None = None
        if mode == "required" and not self.paths:
            raise UserError("data.illum=required, but the load_data table has no FileName_Illum<Name> columns")
        if mode == "auto" and not self.paths:  # a plain load_data table: nothing to correct with, no warning
            self.disabled_reason = "the load_data table has no FileName_Illum<Name> columns"
            log.info("illumination correction: %s", self.disabled_reason)

    @classmethod
    def from_table(cls, df: pd.DataFrame | None, mode: str = "auto", base: str | None = None,
                   **kwargs: Any) -> IllumCorrection:
        """From a load_data table (None: no table, so nothing to apply)."""
        paths = illum_paths(df, base) if df is not None and mode != "off" else {}
        return cls(paths, mode, **kwargs)

    @property
    def active(self) -> bool:
        return self.mode != "off" and self.disabled_reason is None

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        log.warning("illumination correction skipped: %s (data.illum=auto; set data.illum=off to "
                    "silence this or data.illum=required to make it an error)", reason)

    def function(self, plate: str, channel: str) -> np.ndarray | None:
        """The (plate, channel) function, or None when it does not apply."""
        if not self.active:
            return None
        path = self.paths.get((plate, channel))
        if path is None:
            if self.mode == "required":
                raise UserError(f"no illumination function for plate {plate}, channel {channel} "
                                f"in the load_data table (data.illum=required)")
            return None
        try:
            return self.cache.get(path)
        except self.missing_errors:
            if self.mode == "required":
                raise UserError(f"illumination function not found: {path}") from None
            self._disable(f"illumination function not found: {path}")
            return None

    def __call__(self, raw: np.ndarray, plate: str, channels: Sequence[str]) -> np.ndarray:
        """Correct a raw (C,H,W) field; returns float32 when corrected, ``raw`` unchanged otherwise."""
        if not self.active:
            return raw
        funcs = [self.function(plate, c) for c in channels]
        if all(f is None for f in funcs):
            return raw
        out = raw.astype(np.float32)
        for i, f in enumerate(funcs):
            if f is not None:
                out[i] = apply_illum(raw[i], f)
        return out


__all__ = ["IllumCache", "IllumCorrection", "apply_illum", "illum_channels", "illum_paths", "read_local",
           "sanitise"]
