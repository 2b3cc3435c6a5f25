"""Cell Painting fields streamed from S3 (the public ``cellpainting-gallery`` bucket, MinIO, local S3).

JUMP is ~3M fields (7.5 TB for cpg0000, 19 TB for cpg0016 source_4): nobody downloads it, so a
training run reads it over the network.  This module makes that fast and safe:

* **Discovery**: a paginated listing grouped into fields by the JUMP/Phenix naming
  (``<plate>__<timestamp>-Measurement1/Images/rRRcCCfFFp01-chKsk1fk1fl1.tiff``), or a load_data
  CSV/Parquet (local or on S3) whose ``PathName_Orig*`` columns hold ``s3://`` folders.  The result is
  cached as a local Parquet index so a restart does not relist millions of keys.
* **Fetch**: a thread pool with at most ``max_in_flight`` GETs in flight per process.  Retries are
  ours, not botocore's (botocore is set to a single attempt so every retry is counted): exponential
  backoff with jitter on 5xx, throttling (503 SlowDown, 429), timeouts, connection resets and
  truncated bodies.  A missing key or an undecodable object skips that field and is counted -- the
  run never crashes on one bad object, and never silently drops one either.
* **Caches**: a thread-safe, byte-bounded LRU of decoded, scaled fields and an optional bounded
  on-disk cache of raw objects whose file names are hashes (no key can escape the cache folder).
* **Metrics**: :meth:`S3FieldSource.metrics` for the loggers; the counters live in shared memory so
  DataLoader workers' downloads are included.

Requests are unsigned by default (the gallery is public; no credentials needed or looked up);
``data.s3.sign: true`` uses boto3's standard credential chain.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dinocell.data import jump
from dinocell.data.decode import read_image, scale_field
from dinocell.data.field import FieldRecord, is_fluorescent
from dinocell.data.sources import FieldSource, _common_channels, _to_unit, select_channels
from dinocell.errors import ConfigError, DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
LOAD_DATA_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
#: Keys of ``data.s3.filters``.
FILTER_KEYS = ("project", "source", "batch", "plate", "well", "site", "channel")
#: Bump when the index file layout changes (old files are then ignored and rebuilt).
INDEX_VERSION = 1
#: At most this many discovery problems are listed by ``describe()`` (millions of keys...).
MAX_LISTED_SKIPS = 100
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
                   "RequestLimitExceeded", "ProvisionedThroughputExceededException"}
_RETRY_CODES = _THROTTLE_CODES | {"InternalError", "ServiceUnavailable", "RequestTimeout",
                                  "RequestTimeoutException", "BadGateway", "GatewayTimeout"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3MissingError(DataError):
    """The object does not exist (404 / NoSuchKey): retrying cannot help."""


class S3FetchError(DataError):
    """The object could not be fetched (permanent error, or every attempt failed)."""


class _Truncated(Exception):
    """The body was shorter than its Content-Length (a connection dropped mid-transfer)."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    if not uri.startswith("s3://"):
        raise DataError(f"not an s3:// URI: {uri}")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket or ""):
        raise DataError(f"bad S3 bucket name in {uri!r}")
    return bucket, key


def _validate_s3_config(c: Any) -> None:
    checks = (("max_in_flight", c.max_in_flight >= 1), ("max_attempts", c.max_attempts >= 1),
              ("timeout_s", c.timeout_s > 0), ("cache_bytes", c.cache_bytes >= 0),
              ("disk_cache_bytes", c.disk_cache_bytes >= 0), ("shuffle_buffer", c.shuffle_buffer >= 1))
    for name, ok in checks:
        if not ok:
            raise ConfigError(f"config key 'data.s3.{name}' has an invalid value: {getattr(c, name)!r}")
    if c.disk_cache_dir and c.disk_cache_bytes <= 0:
        raise ConfigError("config key 'data.s3.disk_cache_dir' is set but 'data.s3.disk_cache_bytes' is 0; "
                          "give the cache a size in bytes")
    if c.endpoint_url and not re.match(r"^https?://", str(c.endpoint_url)):
        raise ConfigError(f"config key 'data.s3.endpoint_url' must start with http:// or https://; "
                          f"got {c.endpoint_url!r}")
    unknown = sorted(set(c.filters or {}) - set(FILTER_KEYS))
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in 'data.s3.filters' (known: {', '.join(FILTER_KEYS)})")


def make_client(s3cfg: Any) -> Any:
    """A boto3 S3 client: unsigned unless ``sign``; botocore's own retries off (ours are counted)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig

    kwargs: dict[str, Any] = {
        "region_name": s3cfg.region,
        "connect_timeout": s3cfg.timeout_s,
        "read_timeout": s3cfg.timeout_s,
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "max_pool_connections": int(s3cfg.max_in_flight) + 4,
    }
    if s3cfg.endpoint_url:
        kwargs["s3"] = {"addressing_style": "path"}  # MinIO / local servers have no bucket DNS names
    if not s3cfg.sign:
        kwargs["signature_version"] = UNSIGNED
    session = boto3.session.Session()  # sessions are not thread-safe: one per client
    return session.client("s3", endpoint_url=s3cfg.endpoint_url or None, config=BotoConfig(**kwargs))


# --------------------------------------------------------------------------------------------------
# Metrics shared across DataLoader worker processes
# --------------------------------------------------------------------------------------------------

_AFTER_FORK: weakref.WeakSet[Any] = weakref.WeakSet()


def _reset_locks_after_fork() -> None:
    """A lock held by another thread at fork time stays locked forever in the child: replace them."""
    for obj in list(_AFTER_FORK):
        obj._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_after_fork)

_COUNTERS = ("requests", "retries", "bytes", "download_time", "busy_time", "hits", "misses",
             "disk_hits", "fields", "skipped")


class SharedCounters:
    """Float64 counters in shared memory, one row per process (main = row 0, worker ``i`` = 1 + i).

    Each process only writes its own row (its threads serialise on a lock), so no increment is lost;
    readers sum the rows.  The tensor lives in shared memory, so DataLoader workers (fork or spawn)
    update the same table the trainer's loggers read.
    """

    ROWS = 65

    def __init__(self, names: Sequence[str]) -> None:
        import torch

        self.names = list(names)
        self._col = {n: i for i, n in enumerate(self.names)}
        self.table = torch.zeros((self.ROWS, len(self.names)), dtype=torch.float64).share_memory_()
        self._lock = threading.Lock()
        _AFTER_FORK.add(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"names": self.names, "table": self.table}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.names = state["names"]
        self._col = {n: i for i, n in enumerate(self.names)}
        self.table = state["table"]
        self._lock = threading.Lock()
        _AFTER_FORK.add(self)

    @staticmethod
    def row() -> int:
        """This process's row: 0 in the main process, 1 + worker id in a DataLoader worker."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (SharedCounters.ROWS - 1)

    def add(self, **values: float) -> None:
        r = self.row()
        with self._lock:
            for k, v in values.items():
                self.table[r, self._col[k]] += float(v)

    def totals(self) -> dict[str, float]:
        t = self.table.sum(dim=0).tolist()
        return dict(zip(self.names, t, strict=True))

    def rows(self) -> list[dict[str, float]]:
        return [dict(zip(self.names, r, strict=True)) for r in self.table.tolist()]


# --------------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------------


class ByteLRU:
    """Thread-safe LRU bounded by the total ``nbytes`` of its arrays (not by their count).

    A count bound is meaningless when a field may be 64 px or 1080 px: the budget is in bytes.
    Items larger than the whole budget are not stored.  ``max_bytes=0`` disables the cache.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key: str, arr: np.ndarray) -> None:
        size = int(arr.nbytes)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= int(old.nbytes)
            self._items[key] = arr
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, ev = self._items.popitem(last=False)
                self.nbytes -= int(ev.nbytes)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)


_SAFE_TAIL = re.compile(r"[^A-Za-z0-9_.\-]")


class DiskCache:
    """Bounded on-disk cache of raw objects (bytes as downloaded), shared by processes.

    Files are named ``<root>/<h[:2]>/<h[2:34]>-<tail>`` with ``h`` the SHA-256 of the URI and ``tail``
    the object's base name reduced to ``[A-Za-z0-9_.-]`` (for humans): no key, not even ``..`` or an
    absolute path, can name a file outside ``root``.  Least recently used files (by mtime, bumped on
    every hit) are deleted when the total passes the budget, down to 90% of it (so the folder is not
    rescanned on every write).  Other processes may delete a file we are about to read: that is a miss.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.root = Path(root).expanduser().absolute()
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._total: int | None = None

    def path_for(self, uri: str) -> Path:
        h = hashlib.sha256(uri.encode("utf-8")).hexdigest()
        tail = _SAFE_TAIL.sub("_", uri.rsplit("/", 1)[-1])[-80:].lstrip(".") or "object"
        p = self.root / h[:2] / f"{h[2:34]}-{tail}"
        if os.path.commonpath([str(self.root), str(p)]) != str(self.root):  # defence in depth
            raise DataError(f"disk cache path for {uri!r} escapes {self.root}")
        return p

    def get(self, uri: str) -> bytes | None:
        p = self.path_for(uri)
        try:
            data = p.read_bytes()
            os.utime(p)
        except OSError:
            return None
        return data

    def put(self, uri: str, data: bytes) -> None:
        size = len(data)
        if size > self.max_bytes:
            return
        p = self.path_for(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, p)
        except OSError as e:  # a full disk must not stop training: the cache is optional
            log.warning("disk cache write failed for %s: %s", p, e)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            if self._total is None:
                self._total = self._scan_total()
            else:
                self._total += size
            if self._total > self.max_bytes:
                self._evict(int(self.max_bytes * 0.9))

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        if not self.root.is_dir():
            return out
        for sub in os.scandir(self.root):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                try:
                    st = f.stat(follow_symlinks=False)
                except OSError:
                    continue
                if f.name.endswith(".tmp") and time.time() - st.st_mtime < 3600:
                    continue  # another thread's write in progress
                out.append((st.st_mtime, st.st_size, Path(f.path)))
        return out

    def _scan_total(self) -> int:
        return sum(s for _, s, _ in self._files())

    def _evict(self, target: int) -> None:
        files = sorted(self._files())
        total = sum(s for _, s, _ in files)
        for _, size, path in files:
            if total <= target:
                break
            try:
                path.unlink()
                total -= size
            except FileNotFoundError:
                total -= size
            except OSError as e:
                log.warning("disk cache eviction failed for %s: %s", path, e)
        self._total = total

    @property
    def nbytes(self) -> int:
        with self._lock:
            if self._total is None:
                self._total = self._scan_total()
            return self._total


# --------------------------------------------------------------------------------------------------
# Error classification and retries
# --------------------------------------------------------------------------------------------------


def _classify(exc: BaseException) -> str:
    """``missing`` (404), ``retry`` (transient) or ``fatal`` (retrying cannot help)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(exc, _Truncated):
        return "retry"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _MISSING_CODES or status == 404:
            return "missing"
        if status >= 500 or status in (408, 429) or code in _RETRY_CODES:
            return "retry"
        return "fatal"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, ParamValidationError)):
        return "fatal"
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 ships with botocore
        Urllib3Error = OSError  # noqa: N806
    if isinstance(exc, (BotoCoreError, Urllib3Error, http.client.HTTPException, OSError)):
        return "retry"  # connection reset/closed, timeouts, streaming errors, incomplete reads
    return "raise"


def _describe(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"HTTP {status} {err.get('Code', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


def _is_throttle(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _THROTTLE_CODES or status in (429, 503)
    return False


# --------------------------------------------------------------------------------------------------
# Discovery helpers
# --------------------------------------------------------------------------------------------------

_PLATE_DIR = re.compile(r"^(?P<plate>[^/]+?)__[^/]*$")


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
        if re.fullmatch(r"source_[A-Za-z0-9]+", p):
            meta["Metadata_Source"] = p
            break
    for i, p in enumerate(parts[:-1]):
        m = _PLATE_DIR.match(p)
        if m and "Measurement" in p:
            meta["Metadata_Plate"] = m["plate"]
            if i >= 2 and parts[i - 1] == "images":
                meta["Metadata_Batch"] = parts[i - 2]
            break
    return meta


def _plate_of_uri(uri: str) -> str:
    return jump.plate_from_path(uri[len("s3://"):].rsplit("/", 1)[0])


def _filter_values(v: Any) -> set[str]:
    if isinstance(v, (list, tuple, set)):
        return {str(x).strip() for x in v}
    return {s.strip() for s in str(v).split(",") if s.strip()}


def default_index_path(key: str) -> Path:
    """``$XDG_CACHE_HOME/dinocell`` (default ``~/.cache/dinocell``)/``s3-index-<hash>.parquet``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(base) / "dinocell" / f"s3-index-{digest}.parquet"


def write_index(path: Path, records: Sequence[FieldRecord], skipped: Sequence[str], meta: dict[str, Any]) -> None:
    """Write the discovered fields as Parquet (atomically: temp file + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "plate": [r.plate for r in records],
        "well": [r.well for r in records],
        "site": pa.array([int(r.site) for r in records], type=pa.int32()),
        "channels": [json.dumps(r.channels, sort_keys=True) for r in records],
        "metadata": [json.dumps(r.metadata, sort_keys=True) for r in records],
    })
    info = dict(meta, version=INDEX_VERSION, skipped=list(skipped)[:MAX_LISTED_SKIPS],
                n_skipped=len(skipped), created=time.time())
    table = table.replace_schema_metadata({b"dinocell": json.dumps(info).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_index(path: Path) -> tuple[list[FieldRecord], list[str], dict[str, Any]]:
    """Records, skipped entries and the stored metadata of an index file."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    info = json.loads((table.schema.metadata or {}).get(b"dinocell", b"{}"))
    cols = table.to_pydict()
    records = [FieldRecord(plate=p, well=w, site=int(s), channels=json.loads(c), metadata=json.loads(m))
               for p, w, s, c, m in zip(cols["plate"], cols["well"], cols["site"], cols["channels"],
                                        cols["metadata"], strict=True)]
    skipped = list(info.get("skipped", []))
    extra = int(info.get("n_skipped", len(skipped))) - len(skipped)
    if extra > 0:
        skipped.append(f"... and {extra} more")
    return records, skipped, info


# --------------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------------


class _ProcState:
    """Per-process resources: they cannot cross a fork (threads) or a pickle (sockets)."""

    def __init__(self, src: S3FieldSource) -> None:
        from torch.utils.data import get_worker_info

        c = src.s3cfg
        self.pid = os.getpid()
        self.client = make_client(c)
        self.io = ThreadPoolExecutor(max_workers=int(c.max_in_flight), thread_name_prefix="s3-get")
        self.assemble = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                           thread_name_prefix="s3-field")
        info = get_worker_info()
        n_proc = 1 if info is None else max(1, info.num_workers)
        # The budget is per run: each of n DataLoader workers gets 1/n of it.
        self.lru = ByteLRU(int(c.cache_bytes) // n_proc)
        self.disk = (DiskCache(c.disk_cache_dir, int(c.disk_cache_bytes) // n_proc)
                     if c.disk_cache_dir and c.disk_cache_bytes > 0 else None)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.busy_since = 0.0
        self.failed: set[str] = set()

    def close(self) -> None:
        self.io.shutdown(wait=False, cancel_futures=True)
        self.assemble.shutdown(wait=False, cancel_futures=True)


class S3FieldSource(FieldSource):
    """Fields under an ``s3://bucket/prefix`` (or listed by a load_data file), fetched concurrently.

    ``load(rec)`` serves one field through the decoded-field LRU; ``iter_loaded(records)`` streams
    many with up to ``max_in_flight`` requests in flight -- that is what the streaming dataset uses.
    ``backoff_base_s``/``backoff_max_s`` shape the retry delays (attempt ``a`` waits a random time in
    ``[d/2, d]`` with ``d = min(max, base * 2**(a-1))``, doubled for throttling).
    """

    def __init__(self, uri: str, data_cfg: Any, *, backoff_base_s: float = 0.1,
                 backoff_max_s: float = 10.0) -> None:
        super().__init__(data_cfg.scaling, data_cfg.stain)
        self.uri = uri
        self.name = uri
        self.s3cfg = data_cfg.s3
        _validate_s3_config(self.s3cfg)
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.source_map = data_cfg.source_map
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.counters = SharedCounters(_COUNTERS)
        self._proc: _ProcState | None = None
        self._proc_lock = threading.Lock()
        _AFTER_FORK.add(self)
        self.index_path: Path | None = None

        records, skipped = self._discover(data_cfg)
        records, wanted = self._apply_filters(records, data_cfg.channels)
        if not records:
            raise DataError(f"no field under {uri} matches data.s3.filters {dict(self.s3cfg.filters)}")
        available = _common_channels(records)
        self.channels = select_channels(available, wanted)
        keep = [r for r in records if all(c in r.channels for c in self.channels)]
        dropped = len(records) - len(keep)
        if not keep:
            raise DataError(f"no field under {uri} has all of the channels {', '.join(self.channels)}")
        if dropped:
            skipped.append(f"{dropped} field(s) missing one of the channels {', '.join(self.channels)}")
        self.records = keep
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
        _AFTER_FORK.add(self)

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
    def _discover(self, data_cfg: Any) -> tuple[list[FieldRecord], list[str]]:
        load_data = data_cfg.load_data
        if load_data is None and self.uri.lower().endswith(LOAD_DATA_SUFFIXES):
            load_data = self.uri
        prune = {k: sorted(_filter_values(v)) for k, v in (self.s3cfg.filters or {}).items() if k == "plate"}
        ident: dict[str, Any] = {"endpoint": self.s3cfg.endpoint_url or "aws", "uri": self.uri,
                                 "source_map": self.source_map, "load_data": load_data, "prune": prune}
        if load_data and not str(load_data).startswith("s3://"):
            p = Path(load_data)
            if not p.is_file():
                raise DataError(f"load_data file not found: {p}")
            st = p.stat()
            ident["load_data"] = str(p.absolute())
            ident["load_data_stat"] = [st.st_size, st.st_mtime_ns]
        key = json.dumps(ident, sort_keys=True)
        path = Path(self.s3cfg.index_cache).expanduser() if self.s3cfg.index_cache else default_index_path(key)
        self.index_path = path
        if path.is_file():
            try:
                records, skipped, info = read_index(path)
                if info.get("version") == INDEX_VERSION and info.get("ident") == ident:
                    log.info("using the field index %s (%d fields; delete it to relist)", path, len(records))
                    return records, skipped
                log.info("field index %s was built for another source; rebuilding it", path)
            except Exception as e:  # a damaged cache is rebuilt, never fatal
                log.warning("ignoring unreadable field index %s: %s", path, e)
        if load_data:
            records, skipped = self._discover_load_data(str(load_data))
        else:
            records, skipped = self._discover_listing(prune.get("plate"))
        if not records:
            raise DataError(f"no JUMP-named images (rRRcCCfFFp01-chK...tiff) found under {self.uri}")
        try:
            write_index(path, records, skipped, {"ident": ident})
        except OSError as e:
            log.warning("could not write the field index %s: %s", path, e)
        return records, skipped

    def _list_page(self, prefix: str, token: str | None, delimiter: str | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        if delimiter:
            kw["Delimiter"] = delimiter
        client = self._state().client
        return self._with_retries(f"listing s3://{self.bucket}/{prefix}",
                                  lambda: client.list_objects_v2(**kw))

    def _list(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            try:
                page = self._list_page(prefix, token, delimiter)
            except S3MissingError:
                raise DataError(f"bucket not found: s3://{self.bucket}") from None
            except S3FetchError as e:
                raise DataError(f"cannot list s3://{self.bucket}/{prefix}: {e}") from None
            yield page
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def _iter_keys(self, prefix: str, plates: list[str] | None) -> Iterator[str]:
        """Every key under ``prefix``; with a plate filter, other plates' folders are not listed."""
        if not plates:
            for page in self._list(prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"]
            return
        wanted = set(plates)
        stack = [prefix]
        while stack:
            p = stack.pop()
            for page in self._list(p, delimiter="/"):
                for obj in page.get("Contents", []):
                    yield obj["Key"]
                for cp in page.get("CommonPrefixes", []):
                    sub = cp["Prefix"]
                    name = sub.rstrip("/").rsplit("/", 1)[-1]
                    m = _PLATE_DIR.match(name)
                    if m and "Measurement" in name:
                        if m["plate"] in wanted:
                            for page2 in self._list(sub):
                                for obj in page2.get("Contents", []):
                                    yield obj["Key"]
                    else:
                        stack.append(sub)

    def _discover_listing(self, plates: list[str] | None) -> tuple[list[FieldRecord], list[str]]:
        uris: list[str] = []
        n_keys = 0
        t0 = time.perf_counter()
        for key in self._iter_keys(self.prefix, plates):
            n_keys += 1
            if n_keys % 100_000 == 0:
                log.info("listed %d keys under %s (%.0f s)", n_keys, self.uri, time.perf_counter() - t0)
            if key.lower().endswith(IMAGE_SUFFIXES):
                uris.append(f"s3://{self.bucket}/{key}")
        records, unparsed = jump.group_files(uris, self.source_map, plate_of=_plate_of_uri)
        for r in records:
            first = next(iter(r.channels.values()))
            r.metadata.update({k: v for k, v in path_metadata(first[len("s3://"):].split("/", 1)[1]).items()
                               if k != "Metadata_Plate"})
        skipped = [f"{u}: name not recognised" for u in unparsed]
        return records, skipped

    def _discover_load_data(self, load_data: str) -> tuple[list[FieldRecord], list[str]]:
        if load_data.startswith("s3://"):
            bucket, key = parse_s3_uri(load_data)
            data = self._get_bytes(bucket, key)
            suffix = next((s for s in LOAD_DATA_SUFFIXES if key.lower().endswith(s)), ".csv")
            fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="dinocell-load-data-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                df = jump.read_load_data(tmp)
            finally:
                os.unlink(tmp)
        else:
            df = jump.read_load_data(load_data)
        records = jump.fields_from_load_data(df)
        base = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        for r in records:
            for ch, path in list(r.channels.items()):
                if path.startswith("s3://"):
                    continue
                if os.path.isabs(path) or re.match(r"^[A-Za-z]:[\\/]", path):
                    raise DataError(f"load_data {load_data}: PathName of {r.key} channel {ch} is a local "
                                    f"folder ({path}); an S3 source needs s3:// folders or relative ones")
                r.channels[ch] = f"{base}/{path.lstrip('./')}"
            first = next(iter(r.channels.values()), "")
            if first.startswith("s3://"):
                extra = path_metadata(first[len("s3://"):].split("/", 1)[-1])
                for k, v in extra.items():
                    r.metadata.setdefault(k, v)
        return records, []

    def _apply_filters(self, records: list[FieldRecord],
                       channels: Sequence[str] | None) -> tuple[list[FieldRecord], list[str] | None]:
        raw = dict(self.s3cfg.filters or {})
        wanted = list(channels) if channels else None
        if "channel" in raw:  # keeps the order the user gave
            v = raw.pop("channel")
            chosen = [str(x).strip() for x in v] if isinstance(v, (list, tuple)) else \
                [s.strip() for s in str(v).split(",") if s.strip()]
            wanted = [c for c in wanted if c.lower() in {x.lower() for x in chosen}] if wanted else chosen
        filters = {k: _filter_values(v) for k, v in raw.items()}
        getters: dict[str, Callable[[FieldRecord], str]] = {
            "project": lambda r: r.metadata.get("Metadata_Project", ""),
            "source": lambda r: r.metadata.get("Metadata_Source", ""),
            "batch": lambda r: r.metadata.get("Metadata_Batch", ""),
            "plate": lambda r: r.plate,
            "well": lambda r: r.well,
            "site": lambda r: str(int(r.site)),
        }
        if "site" in filters:
            filters["site"] = {str(int(s)) for s in filters["site"]}
        out = [r for r in records if all(getters[k](r) in vals for k, vals in filters.items())]
        return out, wanted

    # -- fetching ----------------------------------------------------------------------------------
    def _backoff(self, attempt: int, throttled: bool) -> float:
        d = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)) * (2.0 if throttled else 1.0)
        return random.uniform(d / 2.0, d)

    def _with_retries(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` up to ``max_attempts`` times, sleeping with backoff + jitter between attempts."""
        attempts = int(self.s3cfg.max_attempts)
        last: BaseException | None = None
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as e:
                kind = _classify(e)
                if kind == "raise":
                    raise
                if kind == "missing":
                    raise S3MissingError(f"{what}: not found (404)") from None
                if kind == "fatal":
                    msg = _describe(e)
                    if "403" in msg and not self.s3cfg.sign:
                        msg += " (a private bucket needs data.s3.sign=true)"
                    raise S3FetchError(f"{what}: {msg}") from None
                last = e
                if attempt < attempts:
                    self.counters.add(retries=1)
                    delay = self._backoff(attempt, _is_throttle(e))
                    log.debug("%s: %s; retry %d/%d in %.2f s", what, _describe(e), attempt,
                              attempts - 1, delay)
                    time.sleep(delay)
        assert last is not None
        raise S3FetchError(f"{what}: gave up after {attempts} attempts: {_describe(last)}")

    def _get_bytes(self, bucket: str, key: str) -> bytes:
        """One object's bytes: disk cache, else a GET with our retries and a Content-Length check."""
        st = self._state()
        uri = f"s3://{bucket}/{key}"
        if st.disk is not None:
            data = st.disk.get(uri)
            if data is not None:
                self.counters.add(disk_hits=1)
                return data

        def attempt() -> bytes:
            self._begin_request(st)
            t0 = time.perf_counter()
            n = 0
            try:
                resp = st.client.get_object(Bucket=bucket, Key=key)
                body = resp["Body"].read()
                n = len(body)
                expected = resp.get("ContentLength")
                if expected is not None and n != int(expected):
                    raise _Truncated(f"got {n} of {expected} bytes")
                return body
            finally:
                self._end_request(st, time.perf_counter() - t0, n)

        data = self._with_retries(uri, attempt)
        if st.disk is not None:
            st.disk.put(uri, data)
        return data

    def _begin_request(self, st: _ProcState) -> None:
        with st.lock:
            if st.in_flight == 0:
                st.busy_since = time.perf_counter()
            st.in_flight += 1

    def _end_request(self, st: _ProcState, seconds: float, nbytes: int) -> None:
        busy = 0.0
        with st.lock:
            st.in_flight -= 1
            if st.in_flight == 0:
                busy = time.perf_counter() - st.busy_since
        self.counters.add(requests=1, bytes=nbytes, download_time=seconds, busy_time=busy)

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
        shapes = {p.shape for p in planes}
        if len(shapes) != 1:
            raise DataError(f"field {rec.key} has channels of different sizes: {sorted(shapes)}")
        return np.stack(planes)

    def _submit_channels(self, st: _ProcState, rec: FieldRecord) -> list[Future[np.ndarray]]:
        missing = [c for c in self.channels if c not in rec.channels]
        if missing:
            raise DataError(f"field {rec.key} has no channel {missing[0]}")
        return [st.io.submit(self._fetch_channel, rec.channels[c]) for c in self.channels]

    def _finish(self, raw: np.ndarray) -> np.ndarray:
        """Stain normalisation (if on) and per-channel scaling: what ``FieldSource.load`` does."""
        if self.stain is not None and getattr(self.stain, "use_stain_norm", False):
            from dinocell.data.stain import StainNormalizer

            raw = StainNormalizer(self.stain)(_to_unit(raw))
        if self.scaling is None:
            return _to_unit(raw)
        return scale_field(np.asarray(raw), self.scaling)

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
        arr = self._finish(self.load_raw(rec))
        self.counters.add(fields=1)
        st.lru.put(rec.key, arr)
        return arr

    def _load_task(self, rec: FieldRecord, futures: list[Future[np.ndarray]]) -> np.ndarray:
        arr = self._finish(self._gather(rec, futures))
        self.counters.add(fields=1)
        self._state().lru.put(rec.key, arr)
        return arr

    def iter_loaded(self, records: Iterable[FieldRecord], ordered: bool = True,
                    window: int | None = None) -> Iterator[tuple[FieldRecord, np.ndarray | None]]:
        """Stream scaled fields with at most ``max_in_flight`` GETs in flight.

        Yields ``(rec, array)``, or ``(rec, None)`` for a field that is missing or undecodable (it is
        counted in ``skipped``).  ``ordered=True`` yields in input order (deterministic: what the
        shuffle buffer needs); ``ordered=False`` yields as fields complete.  ``window`` fields are
        in progress at once (default: enough to keep every request slot busy twice over).
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
            arr = st.lru.get(rec.key)
            if arr is not None:
                self.counters.add(hits=1)
                fut.set_result(arr)
            else:
                self.counters.add(misses=1)
                try:
                    fut = st.assemble.submit(self._load_task, rec, self._submit_channels(st, rec))
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
