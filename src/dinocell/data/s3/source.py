"""The S3 field source: fields under an ``s3://`` prefix (or a load_data table), fetched concurrently.

* **Fetch**: a thread pool with at most ``max_in_flight`` GETs in flight per process; all channels of
  a field are fetched at once.  botocore retries transient errors (adaptive mode, see
  :mod:`dinocell.data.s3.config`); this module only retries a body cut short after its headers.  A
  missing key, a 403, an undecodable object or a field with NaN/inf pixels skips that field and is
  counted: the run never crashes on one bad object, and never silently drops one either.
* **Caches**: a byte-bounded LRU of decoded, scaled fields (for ``load``; the training stream
  keeps its own and bypasses it) and an optional disk cache of raw objects.
* **Metrics**: :meth:`S3FieldSource.metrics`; the counters live in shared memory so DataLoader
  workers' downloads are included.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import get_worker_info

from dinocell.data.channels import resolve_channel_map
from dinocell.data.counters import SharedCounters, reset_after_fork
from dinocell.data.decode import read_image
from dinocell.data.field import (
    LOAD_DATA_SUFFIXES,
    FieldRecord,
    FieldSource,
    is_fluorescent,
    order_channels,
    select_channels,
    stack_planes,
)
from dinocell.data.index import FieldIndex
from dinocell.data.jump import channel_map_from_load_data
from dinocell.data.local import illum_for, missing_channel_skips
from dinocell.data.registry import register_source
from dinocell.data.s3.caches import ByteLRU, DiskCache
from dinocell.data.s3.config import (
    S3FetchError,
    S3MissingError,
    Truncated,
    describe,
    make_client,
    parse_s3_uri,
    permanent_error,
    validate_s3_config,
)
from dinocell.data.s3.discovery import (
    cached_index,
    cached_table_keys,
    default_index_path,
    filter_values,
    find_load_data_tables,
    ident_key,
    index_from_listing,
    index_from_load_data,
    index_ident,
    make_lister,
    pick_tables,
    read_load_data_anywhere,
    read_load_data_tables,
    table_list_file,
)
from dinocell.data.stream import SupportsPrefetch
from dinocell.data.tables import normalise_columns
from dinocell.errors import DataError, require_extra

log = logging.getLogger(__name__)

_COUNTERS = ("requests", "retries", "bytes", "download_time", "busy_time", "hits", "misses",
             "disk_hits", "fields", "skipped")


class _ProcState:
    """Per-process resources: they cannot cross a fork (threads) or a pickle (sockets)."""

    def __init__(self, src: S3FieldSource) -> None:
        c = src.s3cfg
        self.pid = os.getpid()
        self.client, self.attempts = make_client(c)
        self.io = ThreadPoolExecutor(max_workers=int(c.max_in_flight), thread_name_prefix="s3-get")
        self.assemble = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                           thread_name_prefix="s3-field")
        info = get_worker_info()
        n_proc = 1 if info is None else max(1, info.num_workers)
        # The budget is per run: each of n DataLoader workers gets 1/n of it.
        self.lru = ByteLRU(int(c.cache_bytes) // n_proc)
        self.disk = (DiskCache(c.disk_cache_dir, int(c.disk_cache_bytes))
                     if c.disk_cache_dir and c.disk_cache_bytes > 0 else None)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.busy_since = 0.0
        self.failed: set[str] = set()

    def close(self) -> None:
        self.io.shutdown(wait=False, cancel_futures=True)
        self.assemble.shutdown(wait=False, cancel_futures=True)
        if self.disk is not None:
            self.disk.close()


def apply_filters(index: FieldIndex, filters: dict[str, Any],
                  channels: Sequence[str] | None) -> tuple[FieldIndex, list[str] | None]:
    """``data.s3.filters`` as vectorised column selections; returns (fields, wanted channels)."""
    raw = dict(filters or {})
    wanted = list(channels) if channels else None
    if "channel" in raw:  # keeps the order the user gave
        chosen = [s for s in (str(x).strip() for x in (raw.pop("channel") if isinstance(raw.get("channel"), (list, tuple))
                                                       else str(raw.pop("channel")).split(","))) if s]
        wanted = [c for c in wanted if c.lower() in {x.lower() for x in chosen}] if wanted else chosen
    columns = {"project": "Metadata_Project", "source": "Metadata_Source", "batch": "Metadata_Batch",
               "plate": "plate", "well": "well", "site": "site"}
    keep = np.ones(len(index), dtype=bool)
    for k, v in raw.items():
        vals = filter_values(v)
        if k == "site":
            vals = {str(int(s)) for s in vals}
        keep &= index.isin(columns[k], vals)
    return (index if keep.all() else index.take(keep)), wanted


class S3FieldSource(FieldSource, SupportsPrefetch):
    """Fields under an ``s3://bucket/prefix`` (or listed by a load_data file), fetched concurrently.

    ``load(rec)`` serves one field through the decoded-field LRU; ``iter_loaded(records)`` fetches
    many with up to ``max_in_flight`` requests in flight -- the training stream fetches each batch's
    fields that way (it declares :class:`~dinocell.data.stream.SupportsPrefetch`).
    """

    def __init__(self, uri: str, data_cfg: Any) -> None:
        super().__init__(data_cfg.scaling, data_cfg.stain)
        self.uri = uri
        self.name = uri
        self.s3cfg = data_cfg.s3
        validate_s3_config(self.s3cfg)
        require_extra("s3", ("boto3", "botocore"), "reading s3:// sources")  # before any warning or request
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.counters = SharedCounters(_COUNTERS)
        self._proc: _ProcState | None = None
        self._proc_lock = threading.Lock()
        reset_after_fork(self)
        self.index_path: Path | None = None

        index, skipped = self._discover(data_cfg)
        index, wanted = apply_filters(index, self.s3cfg.filters, data_cfg.channels)
        if not len(index):
            raise DataError(f"no field under {uri} matches data.s3.filters {dict(self.s3cfg.filters)}")
        counts = index.channel_counts()
        self.channels = select_channels(order_channels(c for c, n in counts.items() if n), wanted)
        keep = index.has_channels(self.channels)
        if not keep.any():
            raise DataError(f"no field under {uri} has all of the channels {', '.join(self.channels)}")
        dropped = int((~keep).sum())
        if dropped:
            skipped += missing_channel_skips(index, keep, self.channels)
        self.records = index if not dropped else index.take(keep)
        self.fluorescent = [is_fluorescent(c) for c in self.channels]
        self.skipped = skipped

    # -- pickling / processes ----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_proc"] = None
        state["_proc_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._proc_lock = threading.Lock()
        reset_after_fork(self)

    def _after_fork(self) -> None:
        self._proc_lock = threading.Lock()  # the parent's pools and client stay unused (pid check)

    def _state(self) -> _ProcState:
        st = self._proc
        if st is not None and st.pid == os.getpid():
            return st
        with self._proc_lock:
            if self._proc is None or self._proc.pid != os.getpid():
                self._proc = _ProcState(self)
            return self._proc

    def close(self) -> None:
        """Stop this process's thread pools (idempotent)."""
        if self._proc is not None and self._proc.pid == os.getpid():
            self._proc.close()
        self._proc = None

    # -- discovery ---------------------------------------------------------------------------------
    def _discover(self, data_cfg: Any) -> tuple[FieldIndex, list[str]]:
        load_data = data_cfg.load_data
        if load_data is None and self.uri.lower().endswith(LOAD_DATA_SUFFIXES):
            load_data = self.uri
        plates = sorted(filter_values(self.s3cfg.filters["plate"])) if "plate" in (self.s3cfg.filters or {}) \
            else None
        df = None
        if load_data:
            df = normalise_columns(read_load_data_anywhere(str(load_data), self._get_bytes))
        else:  # the gallery's per-plate tables, when the prefix has them: no listing of the images
            df, load_data = self._published_load_data(plates, getattr(data_cfg, "illum", "auto") != "off")
        if df is not None:
            self.channel_map, self.channel_map_origin = channel_map_from_load_data(df), "load_data"
        else:
            self.channel_map, self.channel_map_origin = resolve_channel_map(
                self.uri, data_cfg.source_map, data_cfg.channel_map)
        self.illum = illum_for(df, data_cfg, f"s3://{self.bucket}/{self.prefix}", read_bytes=self._read_uri,
                               missing_errors=(S3MissingError, FileNotFoundError))
        ident = index_ident(self.s3cfg.endpoint_url, self.uri, None if load_data else self.channel_map, load_data)
        path = (Path(self.s3cfg.index_cache).expanduser() if self.s3cfg.index_cache
                else default_index_path(ident_key(ident)))
        self.index_path = path
        self.stats_path = str(path.with_name(path.stem + "-plate-stats.json"))
        cmap = self.channel_map

        def build(listed_plates: list[str] | None) -> tuple[FieldIndex, list[str]]:
            if df is not None:
                return index_from_load_data(df, f"s3://{self.bucket}/{self.prefix}", str(load_data)), []
            lister = make_lister(self.s3cfg, self.bucket, on_retries=lambda n: self.counters.add(retries=n))
            try:
                idx, skipped = index_from_listing(lister, self.prefix, listed_plates, cmap)
            except S3MissingError as e:
                raise DataError(str(e)) from None
            except S3FetchError as e:
                raise DataError(str(e)) from None
            if not len(idx):
                raise DataError(f"no JUMP-named images (rRRcCCfFFp01-chK...tiff) found under {self.uri}")
            return idx, skipped

        return cached_index(path, ident, None if load_data else plates, build)

    def _published_load_data(self, plates: list[str] | None, illum: bool) -> tuple[Any, str | None]:
        """(rows of the prefix's published load_data tables, a name for them), or (None, None) when
        the prefix has none.  Which tables exist is remembered next to the index (a warm start asks
        nothing); the tables themselves are read, like a ``data.load_data`` on S3."""
        path, ident = table_list_file(self.s3cfg.index_cache, self.s3cfg.endpoint_url, self.uri)

        def find() -> list[str]:
            lister = make_lister(self.s3cfg, self.bucket, on_retries=lambda n: self.counters.add(retries=n))
            try:
                return find_load_data_tables(lister, self.prefix)  # filters select afterwards
            except (S3MissingError, S3FetchError) as e:
                raise DataError(str(e)) from None

        keys = pick_tables(cached_table_keys(path, ident, find), plates, illum)
        if not keys:
            return None, None
        df = read_load_data_tables(self.bucket, keys, self._get_bytes, f"s3://{self.bucket}/{self.prefix}")
        if df is None:
            return None, None
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        return df, f"s3://{self.bucket}/{keys[0].rsplit('/', 2)[0]}/#{len(keys)}-tables-{digest}"

    # -- fetching ----------------------------------------------------------------------------------
    def _get_bytes(self, bucket: str, key: str) -> bytes:
        """One object's bytes: disk cache, else a GET (botocore retries) with a Content-Length check;
        a body cut short after its headers is fetched again, up to ``max_attempts`` times."""
        st = self._state()
        uri = f"s3://{bucket}/{key}"
        if st.disk is not None:
            cached = st.disk.get(uri)
            if cached is not None:
                self.counters.add(disk_hits=1)
                return cached
        tries = 0  # HTTP attempts spent on this object
        body = b""
        last: BaseException | None = None
        try:
            for _ in range(int(self.s3cfg.max_attempts)):
                self._begin_request(st)
                t0 = time.perf_counter()
                before = st.attempts.value
                in_body = False
                last = None
                try:
                    resp = st.client.get_object(Bucket=bucket, Key=key)
                    in_body = True
                    body = resp["Body"].read()
                    expected = resp.get("ContentLength")
                    if expected is not None and len(body) != int(expected):
                        raise Truncated(f"got {len(body)} of {expected} bytes")
                except Exception as e:
                    err = permanent_error(e, uri, f"{uri}: not found (404)", bool(self.s3cfg.sign))
                    if err is not None:
                        raise err from None
                    last = e
                finally:
                    used = max(1, st.attempts.value - before)
                    tries += used
                    self._end_request(st, time.perf_counter() - t0, len(body) if last is None else 0, used)
                if last is None or not in_body:  # done, or botocore already spent its attempts
                    break
        finally:
            if tries > 1:
                self.counters.add(retries=tries - 1)
        if last is not None:
            raise S3FetchError(f"{uri}: gave up after {tries} attempts: {describe(last)}")
        if st.disk is not None:
            st.disk.put(uri, body)
        return body

    def _begin_request(self, st: _ProcState) -> None:
        with st.lock:
            if st.in_flight == 0:
                st.busy_since = time.perf_counter()
            st.in_flight += 1

    def _end_request(self, st: _ProcState, seconds: float, nbytes: int, attempts: int) -> None:
        busy = 0.0
        with st.lock:
            st.in_flight -= 1
            if st.in_flight == 0:
                busy = time.perf_counter() - st.busy_since
        self.counters.add(requests=attempts, bytes=nbytes, download_time=seconds, busy_time=busy)

    def _read_uri(self, uri: str) -> bytes:
        """One object's bytes by URI (the byte reader of the illumination functions)."""
        return self._get_bytes(*parse_s3_uri(uri))

    def _fetch_channel(self, uri: str) -> np.ndarray:
        bucket, key = parse_s3_uri(uri)
        return read_image(self._get_bytes(bucket, key))

    def _gather(self, rec: FieldRecord, futures: list[Future[np.ndarray]]) -> np.ndarray:
        try:
            planes = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return stack_planes(rec, planes)

    def _submit_channels(self, st: _ProcState, rec: FieldRecord) -> list[Future[np.ndarray]]:
        missing = [c for c in self.channels if c not in rec.channels]
        if missing:
            raise DataError(f"field {rec.key} has no channel {missing[0]}")
        return [st.io.submit(self._fetch_channel, rec.channels[c]) for c in self.channels]

    def _record_skip(self, rec: FieldRecord, exc: BaseException) -> None:
        st = self._state()
        with st.lock:
            if rec.key in st.failed:
                return
            st.failed.add(rec.key)
        self.counters.add(skipped=1)
        self.skipped.append(f"{rec.key}: {exc}")
        log.warning("skipping field %s: %s", rec.key, exc)

    def load_raw(self, rec: FieldRecord) -> np.ndarray:
        """All channels of one field, fetched concurrently; a bad field raises :class:`DataError`."""
        st = self._state()
        try:
            return self._gather(rec, self._submit_channels(st, rec))
        except DataError as e:
            self._record_skip(rec, e)
            raise

    def load(self, rec: FieldRecord) -> np.ndarray:
        """The scaled field, from the decoded-field LRU when it is there."""
        st = self._state()
        arr = st.lru.get(rec.key)
        if arr is not None:
            self.counters.add(hits=1)
            return arr
        self.counters.add(misses=1)
        try:
            arr = self.finish(self.load_raw(rec), rec)
        except DataError as e:
            self._record_skip(rec, e)
            raise
        self.counters.add(fields=1)
        st.lru.put(rec.key, arr)
        return arr

    def _load_task(self, rec: FieldRecord, futures: list[Future[np.ndarray]], cache: bool) -> np.ndarray:
        arr = self.finish(self._gather(rec, futures), rec)
        self.counters.add(fields=1)
        if cache:
            self._state().lru.put(rec.key, arr)
        return arr

    def iter_loaded(self, records: Iterable[FieldRecord], ordered: bool = True, window: int | None = None,
                    cache: bool = True) -> Iterator[tuple[FieldRecord, np.ndarray | None]]:
        """Stream scaled fields with at most ``max_in_flight`` GETs in flight.

        Yields ``(rec, array)``, or ``(rec, None)`` for a field that is missing or undecodable (it is
        counted in ``skipped``).  ``ordered=True`` yields in input order (deterministic: what the
        training stream needs); ``ordered=False`` yields as fields complete.  ``window`` fields are
        in progress at once (default: enough to keep every request slot busy twice over).
        ``cache=False`` neither reads nor fills the decoded-field LRU: the training stream keeps
        its own, so a second copy would only cost memory.
        """
        st = self._state()
        n_ch = max(1, len(self.channels))
        if window is None:
            window = max(2, 2 * -(-int(self.s3cfg.max_in_flight) // n_ch))
        it = iter(records)
        pending: deque[tuple[FieldRecord, Future[np.ndarray]]] = deque()

        def submit() -> bool:
            rec = next(it, None)
            if rec is None:
                return False
            fut: Future[np.ndarray] = Future()
            arr = st.lru.get(rec.key) if cache else None
            if arr is not None:
                self.counters.add(hits=1)
                fut.set_result(arr)
            else:
                if cache:
                    self.counters.add(misses=1)
                try:
                    fut = st.assemble.submit(self._load_task, rec, self._submit_channels(st, rec), cache)
                except DataError as e:
                    fut.set_exception(e)
            pending.append((rec, fut))
            return True

        def result(rec: FieldRecord, fut: Future[np.ndarray]) -> tuple[FieldRecord, np.ndarray | None]:
            try:
                return rec, fut.result()
            except DataError as e:
                self._record_skip(rec, e)
                return rec, None

        try:
            while len(pending) < window and submit():
                pass
            while pending:
                if ordered:
                    rec, fut = pending.popleft()
                else:
                    wait([f for _, f in pending], return_when=FIRST_COMPLETED)
                    i = next(i for i, (_, f) in enumerate(pending) if f.done())
                    rec, fut = pending[i]
                    del pending[i]
                out = result(rec, fut)
                submit()
                yield out
        finally:
            for _, fut in pending:
                fut.cancel()

    # -- reporting ---------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Counters for the loggers (summed over DataLoader workers).

        ``s3/bandwidth_mbps`` is megabits per second while requests were in flight, summed over
        processes; ``s3/download_time`` is the summed duration of all GETs (seconds).
        """
        rows = self.counters.rows()
        tot = self.counters.totals()
        lookups = tot["hits"] + tot["misses"]
        bw = sum(8.0 * r["bytes"] / 1e6 / r["busy_time"] for r in rows if r["busy_time"] > 0)
        out = {
            "s3/cache_hit_rate": tot["hits"] / lookups if lookups else 0.0,
            "s3/download_time": tot["download_time"],
            "s3/bandwidth_mbps": bw,
            "s3/skipped": tot["skipped"],
            "s3/bytes": tot["bytes"],
            "s3/requests": tot["requests"],
            "s3/retries": tot["retries"],
            "s3/fields": tot["fields"],
            "s3/disk_cache_hits": tot["disk_hits"],
        }
        st = self._proc
        if st is not None and st.pid == os.getpid():
            out["s3/cache_bytes"] = float(st.lru.nbytes)
        return out

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["endpoint_url"] = self.s3cfg.endpoint_url
        info["index"] = str(self.index_path) if self.index_path else None
        return info


register_source("s3", lambda uri: uri.startswith("s3://"), S3FieldSource, priority=10)
