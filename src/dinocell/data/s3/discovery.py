"""Finding the fields under an S3 prefix: load_data tables, concurrent listing, the cached index.

**load_data tables first.** The Cell Painting Gallery publishes one table per plate
(``source_N/workspace/load_data_csv/<batch>/<plate>/load_data.csv.gz``, ``.parquet`` or
``load_data_with_illum``).  When a prefix has them they name every field and its channels, so the
image folders are not listed at all (:func:`find_load_data_tables`); otherwise the prefix is listed.

**Listing.** Plate folders (``<plate>__<timestamp>-Measurement1/``) are found with ``/``-delimited
listings, level by level, and then listed in full by a bounded thread pool (``data.s3.list_workers``,
default 32): one plate folder is ~17k keys (18 pages, sequential by nature), and JUMP has thousands
of them, so listing plates concurrently is what makes a cold start minutes instead of hours.  Each
folder's keys are grouped into the columnar index as soon as they arrive and then dropped, so memory
stays at tens of bytes per field however many keys are listed.  A ``plate`` filter prunes the walk:
other plates' folders are never listed.

**The index file.** Its name is a hash of the endpoint, the URI, the channel map and the load_data
file -- not of the filters, which select from the full index after it is read.  The header records
which plates were listed (``None``: all); a later filter asking for plates the file lacks relists.
One process builds it under a file lock (``<index>.lock``); others on the same filesystem wait and
read it, so a job of 8 ranks x 8 workers lists once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinocell.data import jump
from dinocell.data.field import IMAGE_SUFFIXES, LOAD_DATA_SUFFIXES, MAX_LISTED_SKIPS
from dinocell.data.index import INDEX_VERSION, FieldIndex, IndexBuilder, read_index, read_info, write_index
from dinocell.data.s3.config import parse_s3_uri
from dinocell.data.s3.listing import BotoPager, HttpPager, endpoint_of
from dinocell.data.tables import normalise_columns
from dinocell.errors import DataError
from dinocell.paths import once_per_job, write_text_atomic

log = logging.getLogger(__name__)

_PLATE_DIR = re.compile(r"^(?P<plate>[^/]+?)__[^/]*$")
_SOURCE = re.compile(r"source_[A-Za-z0-9]+")


def is_plate_folder(name: str) -> str | None:
    """The plate of a Phenix export folder name ``<plate>__<time>-Measurement1``, else None."""
    m = _PLATE_DIR.match(name)
    return m["plate"] if m and "Measurement" in name else None


def path_metadata(key: str) -> dict[str, str]:
    """Project / source / batch / plate of a Cell Painting Gallery key, where the layout tells them.

    ``cpg0016-jump/source_4/images/2021_04_26_Batch1/images/BR00117035__2021-05-02T16_02_51-Measurement1/
    Images/r01c01f01p01-ch1sk1fk1fl1.tiff`` -> project ``cpg0016-jump``, source ``source_4``, batch
    ``2021_04_26_Batch1``, plate ``BR00117035``.
    """
    parts = [p for p in key.split("/") if p]
    meta: dict[str, str] = {}
    if parts and parts[0].startswith("cpg"):
        meta["Metadata_Project"] = parts[0]
    for p in parts:
        if _SOURCE.fullmatch(p):
            meta["Metadata_Source"] = p
            break
    for i, p in enumerate(parts[:-1]):
        plate = is_plate_folder(p)
        if plate is not None:
            meta["Metadata_Plate"] = plate
            if i >= 2 and parts[i - 1] == "images":
                meta["Metadata_Batch"] = parts[i - 2]
            break
    return meta


def filter_values(v: Any) -> set[str]:
    """A filter value: one value, a list, or a comma-separated string."""
    if isinstance(v, (list, tuple, set)):
        return {str(x).strip() for x in v}
    return {s.strip() for s in str(v).split(",") if s.strip()}


def default_index_path(key: str) -> Path:
    """``$XDG_CACHE_HOME/dinocell`` (default ``~/.cache/dinocell``)/``s3-index-<hash>.parquet``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(base) / "dinocell" / f"s3-index-{digest}.parquet"


# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------


#: Split points inside a plate folder (Phenix rows 2..16): its ranges are listed concurrently, so a
#: job of a few large plates is as parallel as one of thousands.  Every field of a range is whole
#: (all channels of a site share the row prefix); rows past 16 stay in the last range.
ROW_SPLITS = tuple(f"Images/r{r:02d}" for r in range(2, 17))
#: Keys buffered before they are grouped (fewer, larger per-folder grouping calls).
FLUSH_KEYS = 100_000
#: Listed batches (one range or one folder level each) waiting to be grouped: bounds the memory of
#: keys listed faster than they are grouped.
QUEUE_BATCHES = 64


def make_lister(s3cfg: Any, bucket: str, on_retries: Callable[[int], None] | None = None) -> Lister:
    """The listing client for ``data.s3``: the lean HTTP pager (unsigned), boto3 when signing."""
    workers = int(s3cfg.list_workers)
    if s3cfg.sign:
        from dinocell.data.s3.config import make_client

        client, attempts = make_client(s3cfg, pool=workers)
        return Lister(BotoPager(client, attempts, bucket, True, on_retries), bucket, workers)
    pager = HttpPager(endpoint_of(s3cfg), bucket, float(s3cfg.timeout_s), int(s3cfg.max_attempts), on_retries)
    return Lister(pager, bucket, workers)


class Lister:
    """Concurrent listing of one bucket: folder levels, plate folders and row ranges inside them.

    ``pager.page(prefix, token, delimiter, start_after)`` returns a :class:`~dinocell.data.s3.listing.Page`
    and is thread-safe.  Listing threads hand whole batches (one range or one folder level) to the
    caller's thread through a bounded queue, where they are grouped.
    """

    def __init__(self, pager: Any, bucket: str, workers: int = 32, splits: tuple[str, ...] = ROW_SPLITS) -> None:
        self.pager = pager
        self.bucket = bucket
        self.workers = max(1, int(workers))
        self.splits = splits

    def _explore(self, prefix: str) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        subs: list[str] = []
        token: str | None = None
        while True:
            page = self.pager.page(prefix, token, "/")
            keys += page.keys
            subs += page.prefixes
            if page.token is None:
                return keys, subs
            token = page.token

    def _range(self, prefix: str, lo: str | None, hi: str | None) -> tuple[list[str], list[str]]:
        """Keys ``k`` under ``prefix`` with ``lo < k <= hi`` (``None``: unbounded)."""
        keys: list[str] = []
        token: str | None = None
        while True:
            page = self.pager.page(prefix, token, None, lo if token is None else None)
            if hi is not None and page.keys and page.keys[-1] > hi:
                keys += [k for k in page.keys if k <= hi]
                return keys, []
            keys += page.keys
            if page.token is None:
                return keys, []
            token = page.token

    def ranges(self, folder: str, n: int | None = None) -> list[tuple[str | None, str | None]]:
        """``n`` (default: as many as there are split points + 1) ``(lo, hi]`` ranges that partition
        the keys of a plate folder, split at evenly spaced :attr:`splits`."""
        m = len(self.splits) + 1
        n = m if n is None else max(1, min(m, int(n)))
        cuts = [self.splits[round(i * m / n) - 1] for i in range(1, n)]
        bounds: list[str | None] = [None, *(folder + c for c in cuts), None]
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def walk(self, prefix: str, plates: Iterable[str] | None,
             on_keys: Callable[[list[str]], None]) -> int:
        """List every key under ``prefix`` (only the ``plates`` folders when given), passing each
        batch of keys to ``on_keys`` in this thread.  Returns the number of keys."""
        from tqdm.auto import tqdm

        wanted = set(plates) if plates else None
        n_keys = 0
        bar = tqdm(desc=f"listing s3://{self.bucket}/{prefix}", unit="keys", unit_scale=True, disable=None,
                   leave=False)
        done: queue.Queue[tuple[bool, Any, list[str]]] = queue.Queue(maxsize=QUEUE_BATCHES)
        stop = threading.Event()
        pending = 0

        def run(fn: Callable[..., tuple[list[str], list[str]]], *args: Any) -> None:
            try:
                keys, subs = fn(*args)
                item: tuple[bool, Any, list[str]] = (True, keys, subs)
            except BaseException as e:  # handed to the caller's thread
                item = (False, e, [])
            while not stop.is_set():
                try:
                    done.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue

        t0 = time.perf_counter()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="s3-list")

        def submit(fn: Callable[..., tuple[list[str], list[str]]], *args: Any) -> None:
            nonlocal pending
            pending += 1
            pool.submit(run, fn, *args)

        try:
            submit(self._explore, prefix)
            while pending:
                ok, keys, subs = done.get()
                pending -= 1
                if not ok:
                    raise keys
                plate_subs = []
                for sub in subs:
                    plate = is_plate_folder(sub.rstrip("/").rsplit("/", 1)[-1])
                    if plate is None:
                        submit(self._explore, sub)
                    elif wanted is None or plate in wanted:
                        plate_subs.append(sub)
                # Enough ranges per plate folder to keep every thread busy twice over: a few large
                # plates are split into row ranges; thousands of plates are listed whole.
                per_plate = -(-2 * self.workers // max(1, len(plate_subs)))
                for sub in plate_subs:
                    for lo, hi in self.ranges(sub, per_plate):
                        submit(self._range, sub, lo, hi)
                if keys:
                    n_keys += len(keys)
                    bar.update(len(keys))
                    on_keys(keys)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        dt = time.perf_counter() - t0
        log.info("listed %d keys under s3://%s/%s in %.1f s (%.0f keys/s)", n_keys, self.bucket, prefix, dt,
                 n_keys / max(dt, 1e-9))
        return n_keys


def index_from_listing(lister: Lister, prefix: str, plates: Iterable[str] | None,
                       cmap: Mapping[int, str]) -> tuple[FieldIndex, list[str]]:
    """List ``prefix`` and group the image keys into a field index, folder by folder, naming channel
    numbers with ``cmap`` (resolved by :func:`dinocell.data.channels.resolve_channel_map`)."""
    builder = IndexBuilder(naming={})
    skipped: list[str] = []
    n_unparsed = 0
    buffered: dict[str, list[str]] = defaultdict(list)  # folder -> names, grouped in large batches
    n_buffered = 0

    def flush() -> None:
        nonlocal n_unparsed, n_buffered
        for folder, names in buffered.items():
            meta = path_metadata(folder + "/x")  # once per folder, not per key
            plate = meta.pop("Metadata_Plate", None) or jump.plate_from_path(folder)
            base = f"s3://{lister.bucket}/{folder}/"
            bad = [n for n in jump.add_phenix_folder(builder, base, plate, names, cmap, meta)
                   if n.lower().endswith(IMAGE_SUFFIXES)]  # other files are not images: ignored
            n_unparsed += len(bad)
            room = MAX_LISTED_SKIPS - len(skipped)
            skipped.extend(f"{base}{n}: name not recognised" for n in bad[:max(0, room)])
        buffered.clear()
        n_buffered = 0

    def on_keys(keys: list[str]) -> None:
        # A batch is one listed range or folder level: whole fields, sorted keys.  When its first and
        # last keys share a folder and no key is deeper, every key is in that folder (sorted order).
        nonlocal n_buffered
        folder = keys[0].rpartition("/")[0]
        depth = folder.count("/") + 1 if folder else 0
        if keys[-1].rpartition("/")[0] == folder and "\n".join(keys).count("/") == depth * len(keys):
            cut = len(folder) + 1 if folder else 0
            buffered[folder] += [k[cut:] for k in keys]
        else:
            for k in keys:
                f, _, name = k.rpartition("/")
                buffered[f].append(name)
        n_buffered += len(keys)
        if n_buffered >= FLUSH_KEYS:
            flush()

    lister.walk(prefix, plates, on_keys)
    flush()
    if n_unparsed > len(skipped):
        skipped.append(f"... and {n_unparsed - len(skipped)} more key(s) with names not recognised")
    return builder.build(), skipped


# --------------------------------------------------------------------------------------------------
# load_data tables
# --------------------------------------------------------------------------------------------------


def read_load_data_anywhere(load_data: str, get_bytes: Callable[[str, str], bytes]) -> pd.DataFrame:
    """A load_data table from a local path or an ``s3://`` URI (fetched with ``get_bytes``)."""
    if not load_data.startswith("s3://"):
        return jump.read_load_data(load_data)
    bucket, key = parse_s3_uri(load_data)
    data = get_bytes(bucket, key)
    suffix = next((s for s in LOAD_DATA_SUFFIXES if key.lower().endswith(s)), ".csv")
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="dinocell-load-data-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return jump.read_load_data(tmp)
    finally:
        os.unlink(tmp)


def index_from_load_data(df: pd.DataFrame, base: str, load_data: str) -> FieldIndex:
    """The fields of a load_data table whose folders are ``s3://`` URIs or relative to ``base``."""
    idx = jump.fields_from_load_data(df)

    def resolve(folder: str) -> str:
        if folder.startswith("s3://"):
            return folder
        if os.path.isabs(folder) or re.match(r"^[A-Za-z]:[\\/]", folder):
            raise DataError(f"load_data {load_data}: PathName {folder} is a local folder; an S3 source "
                            "needs s3:// folders or relative ones")
        return f"{base.rstrip('/')}/{folder.lstrip('./')}"

    idx = idx.map_folders(resolve)
    # Project / source / batch from the key layout, where the table does not have them.
    first = idx.cols[f"d:{idx.channels[0]}"] if idx.channels else np.zeros(len(idx), np.int64)
    per_folder = [path_metadata(f[len("s3://"):].split("/", 1)[-1] + "x") for f in idx.cats["folder"]]
    for key in ("Metadata_Project", "Metadata_Source", "Metadata_Batch", "Metadata_Plate"):
        if key in idx.meta or key == "Metadata_Plate":
            continue
        codes, names = pd.factorize(pd.Series([m.get(key, "") for m in per_folder], dtype=object))
        if not any(names):
            continue
        idx.cols[f"m:{key}"] = codes[first]
        idx.cats[key] = [str(n) for n in names]
        idx.meta.append(key)
    return idx


#: Table names JUMP publishes per plate, in order of preference (the plain table names the same
#: images as the one with illumination columns, which ``data.illum`` auto and required prefer; Parquet
#: reads fastest).
LOAD_DATA_NAMES = tuple(f"{stem}{suffix}" for stem in ("load_data", "load_data_with_illum")
                        for suffix in (".parquet", ".csv.gz", ".csv"))


def load_data_folder(prefix: str) -> str | None:
    """Where the Cell Painting Gallery keeps the load_data tables of the images under ``prefix``:
    ``<…>/source_N/workspace/load_data_csv/`` (its ``<batch>/`` folder when the prefix names a batch);
    ``None`` for a prefix outside that layout."""
    m = _SOURCE.search(prefix)
    if m is None:
        return None
    parts = [p for p in prefix[m.end():].split("/") if p]
    folder = prefix[:m.end()] + "/workspace/load_data_csv/"
    if len(parts) >= 2 and parts[0] == "images":
        folder += parts[1] + "/"
    return folder


def find_load_data_tables(lister: Lister, prefix: str) -> list[str]:
    """Keys of the per-plate load_data tables for the images under ``prefix`` (every name of
    :data:`LOAD_DATA_NAMES`; only the prefix's own plate when it names one).  Listing that folder is
    a few keys per plate, not ~17k."""
    folder = load_data_folder(prefix)
    if folder is None:
        return []
    keys: list[str] = []
    lister.walk(folder, None, keys.extend)
    own = next((p for p in map(is_plate_folder, prefix.split("/")) if p), None)
    return sorted(k for k in keys if k.rpartition("/")[2].lower() in LOAD_DATA_NAMES
                  and (own is None or k.split("/")[-2] == own))


def pick_tables(keys: Iterable[str], plates: Iterable[str] | None, illum: bool = False) -> list[str]:
    """One table per plate folder (only ``plates`` when given), by :data:`LOAD_DATA_NAMES` preference;
    ``illum``: the table with illumination columns first."""
    order = LOAD_DATA_NAMES[3:] + LOAD_DATA_NAMES[:3] if illum else LOAD_DATA_NAMES
    by_dir: dict[str, dict[str, str]] = defaultdict(dict)
    for k in keys:
        d, _, name = k.rpartition("/")
        by_dir[d][name.lower()] = k
    wanted = set(plates) if plates else None
    return [names[next(n for n in order if n in names)] for d, names in sorted(by_dir.items())
            if wanted is None or d.rsplit("/", 1)[-1] in wanted]


def table_list_file(index_cache: str | None, endpoint: str | None, uri: str) -> tuple[Path, dict[str, Any]]:
    """(file that remembers which load_data tables ``uri`` has, what it was found for): next to the
    ``data.s3.index_cache`` file when one is set, else in the default cache folder."""
    ident = {"endpoint": endpoint or "aws", "uri": uri}
    path = Path(index_cache).expanduser() if index_cache else default_index_path(ident_key(ident))
    return path.with_name(path.stem + "-load-data-tables.json"), ident


def cached_table_keys(path: Path, ident: dict[str, Any], find: Callable[[], list[str]]) -> list[str]:
    """The load_data table keys found for ``ident`` (none is an answer too), kept in ``path`` so a
    warm start sends no request to learn them again (delete the file to look again)."""
    try:
        saved = json.loads(path.read_text())
        if saved.get("ident") == ident:
            return [str(k) for k in saved["tables"]]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    tables = find()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"ident": ident, "tables": tables}))
    except OSError as e:
        log.warning("could not keep the load_data table list in %s: %s", path, e)
    return tables


def read_load_data_tables(bucket: str, keys: list[str], get_bytes: Callable[[str, str], bytes],
                          within: str, workers: int = 16) -> pd.DataFrame | None:
    """The rows of the tables ``keys`` whose images are under ``within`` (an ``s3://`` prefix), read
    concurrently; ``None`` when no row is (then the prefix is listed instead)."""
    def read(key: str) -> pd.DataFrame:
        return read_load_data_anywhere(f"s3://{bucket}/{key}", get_bytes)

    with ThreadPoolExecutor(max(1, min(workers, len(keys))), thread_name_prefix="s3-load-data") as pool:
        tables = [normalise_columns(t) for t in pool.map(read, keys)]
    kept = [_rows_within(t, within) for t in tables]
    if not any(n for _, n in kept):
        return None
    for key, (_, n) in zip(keys, kept, strict=True):
        if not n:  # a broken or foreign table must not drop its plate silently
            log.warning("load_data table s3://%s/%s names no image under %s: its plate is left out", bucket, key,
                        within)
    df = pd.concat([t for t, n in kept if n], ignore_index=True)
    log.info("using %d load_data table(s) instead of listing %s (%d fields)", len(keys), within, len(df))
    return df


def _rows_within(df: pd.DataFrame, within: str) -> tuple[pd.DataFrame, int]:
    """The rows of one table whose images lie under ``within`` (none when it has no ``PathName_`` column)."""
    paths = [c for c in df.columns if c.startswith("PathName_")]
    if not paths:
        return df.iloc[:0], 0
    inside = df[paths[0]].astype(str).str.startswith(within).to_numpy()
    return df[inside].reset_index(drop=True), int(inside.sum())


# --------------------------------------------------------------------------------------------------
# The index file: one builder per job
# --------------------------------------------------------------------------------------------------


def _covers(listed: list[str] | None, need: list[str] | None) -> bool:
    return listed is None or (need is not None and set(need) <= set(listed))


def cached_index(path: Path, ident: dict[str, Any], need_plates: list[str] | None,
                 build: Callable[[list[str] | None], tuple[FieldIndex, list[str]]],
                 lock_timeout_s: float = 6 * 3600.0) -> tuple[FieldIndex, list[str]]:
    """The index at ``path`` if it was built for ``ident`` and covers ``need_plates``; else build it
    (under a file lock, so concurrent processes build it once) and write it in row-group chunks."""

    def usable() -> tuple[FieldIndex, list[str]] | None:
        if not path.is_file():
            return None
        try:
            info = read_info(path)
            if info.get("version") != INDEX_VERSION or info.get("ident") != ident:
                log.info("field index %s was built for another source; rebuilding it", path)
                return None
            if not _covers(info.get("plates"), need_plates):
                log.info("field index %s lacks some of the requested plates; relisting", path)
                return None
            idx, info = read_index(path)
        except Exception as e:  # a damaged cache is rebuilt, never fatal
            log.warning("ignoring unreadable field index %s: %s", path, e)
            return None
        skipped = list(info.get("skipped", []))
        log.info("using the field index %s (%d fields; delete it to relist)", path, len(idx))
        return idx, skipped

    def make() -> tuple[FieldIndex, list[str]]:
        plates = need_plates
        if need_plates is not None and path.is_file():
            try:
                info = read_info(path)
                if info.get("ident") == ident and info.get("plates") is not None:
                    plates = sorted(set(need_plates) | set(info["plates"]))
            except Exception:  # noqa: BLE001 - a damaged file is simply replaced
                pass
        idx, skipped = build(plates)
        if len(idx):
            try:
                write_index(path, idx, {"ident": ident, "plates": plates, "skipped": skipped,
                                        "created": time.time()})
            except OSError as e:
                log.warning("could not write the field index %s: %s", path, e)
        return idx, skipped

    return once_per_job(path, usable, make, lock_timeout_s)


def index_ident(endpoint: str | None, uri: str, cmap: Mapping[int, str] | None,
                load_data: str | None) -> dict[str, Any]:
    """What an index file was built from (filters are not part of it: they select afterwards)."""
    ident: dict[str, Any] = {"endpoint": endpoint or "aws", "uri": uri,
                             "channel_map": None if cmap is None else {str(k): v for k, v in sorted(cmap.items())},
                             "load_data": load_data}
    if load_data and not str(load_data).startswith("s3://"):
        p = Path(load_data)
        if not p.is_file():
            raise DataError(f"load_data file not found: {p}")
        st = p.stat()
        ident["load_data"] = str(p.absolute())
        ident["load_data_stat"] = [st.st_size, st.st_mtime_ns]
    return ident


def ident_key(ident: dict[str, Any]) -> str:
    return json.dumps(ident, sort_keys=True)
