"""Finding the fields under an S3 prefix: concurrent listing, load_data tables, the cached index.

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
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from dinocell.data import jump
from dinocell.data.field import IMAGE_SUFFIXES, LOAD_DATA_SUFFIXES, MAX_LISTED_SKIPS
from dinocell.data.index import INDEX_VERSION, FieldIndex, IndexBuilder, read_index, read_info, write_index
from dinocell.data.s3.config import S3FetchError, describe, parse_s3_uri, permanent_error
from dinocell.errors import DataError

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


class Lister:
    """Paginated, retried, concurrent listing of one bucket (``client`` is thread-safe)."""

    def __init__(self, client: Any, attempts: Any, bucket: str, workers: int = 32,
                 on_retries: Callable[[int], None] | None = None, signed: bool = False) -> None:
        self.signed = signed
        self.client = client
        self.attempts = attempts
        self.bucket = bucket
        self.workers = max(1, int(workers))
        self.on_retries = on_retries

    def page(self, prefix: str, token: str | None, delimiter: str | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        if delimiter:
            kw["Delimiter"] = delimiter
        before = self.attempts.value
        try:
            return self.client.list_objects_v2(**kw)
        except Exception as e:
            what = f"cannot list s3://{self.bucket}/{prefix}"
            err = permanent_error(e, what, f"bucket not found: s3://{self.bucket}", self.signed)
            raise (err or S3FetchError(f"{what}: {describe(e)}")) from None
        finally:
            if self.on_retries is not None:
                self.on_retries(max(0, self.attempts.value - before - 1))

    def pages(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            page = self.page(prefix, token, delimiter)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def _explore(self, prefix: str) -> tuple[list[str], list[str]]:
        keys, subs = [], []
        for page in self.pages(prefix, "/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
            subs += [cp["Prefix"] for cp in page.get("CommonPrefixes", [])]
        return keys, subs

    def _full(self, prefix: str) -> tuple[list[str], list[str]]:
        return [o["Key"] for page in self.pages(prefix) for o in page.get("Contents", [])], []

    def walk(self, prefix: str, plates: Iterable[str] | None,
             on_keys: Callable[[list[str]], None]) -> int:
        """List every key under ``prefix`` (only the ``plates`` folders when given), passing each
        batch of keys to ``on_keys`` in this thread.  Returns the number of keys."""
        from tqdm.auto import tqdm

        wanted = set(plates) if plates else None
        n_keys = 0
        bar = tqdm(desc=f"listing s3://{self.bucket}/{prefix}", unit="keys", unit_scale=True, disable=None,
                   leave=False)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="s3-list") as pool:
            pending: set[Future[tuple[list[str], list[str]]]] = {pool.submit(self._explore, prefix)}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        keys, subs = fut.result()
                        for sub in subs:
                            plate = is_plate_folder(sub.rstrip("/").rsplit("/", 1)[-1])
                            if plate is None:
                                pending.add(pool.submit(self._explore, sub))
                            elif wanted is None or plate in wanted:
                                pending.add(pool.submit(self._full, sub))
                        if keys:
                            n_keys += len(keys)
                            bar.update(len(keys))
                            on_keys(keys)
            finally:
                for fut in pending:
                    fut.cancel()
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

    def on_keys(keys: list[str]) -> None:
        nonlocal n_unparsed
        by_folder: dict[str, list[str]] = defaultdict(list)
        for k in keys:
            if k.lower().endswith(IMAGE_SUFFIXES):
                folder, _, name = k.rpartition("/")
                by_folder[folder].append(name)
        for folder, names in by_folder.items():
            meta = path_metadata(folder + "/x")  # once per folder, not per key
            plate = meta.pop("Metadata_Plate", None) or jump.plate_from_path(folder)
            base = f"s3://{lister.bucket}/{folder}/"
            bad = jump.add_phenix_folder(builder, base, plate, names, cmap, meta)
            n_unparsed += len(bad)
            room = MAX_LISTED_SKIPS - len(skipped)
            skipped.extend(f"{base}{n}: name not recognised" for n in bad[:max(0, room)])

    lister.walk(prefix, plates, on_keys)
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

    hit = usable()
    if hit is not None:
        return hit
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock: FileLock | None = FileLock(str(path) + ".lock", timeout=lock_timeout_s)
        lock.acquire()
    except (OSError, Timeout) as e:
        log.warning("cannot lock %s (%s): building the index without a lock", path, e)
        lock = None
    try:
        hit = usable() if lock is not None else None  # another process may have built it meanwhile
        if hit is not None:
            return hit
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
    finally:
        if lock is not None:
            lock.release()


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
