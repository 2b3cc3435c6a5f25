"""Caches of the S3 source: decoded fields in memory (bounded in bytes) and raw objects on disk.

The disk cache is :mod:`diskcache` (SQLite index + files, safe across processes, LRU eviction by
size): object keys are database keys, never file names, so no key -- ``..``, an absolute path, 3000
characters -- can name a file outside the cache folder.

The cache folder is data, never code: diskcache stores any non-bytes value as a pickle and unpickles it
on read, so a planted or foreign entry could run code in every data-loader worker.  :func:`bytes_disk`
is a ``diskcache.Disk`` that writes and reads raw bytes only; a pickled value or key, a non-bytes raw
value or a file name that leaves the folder is refused, the entry dropped and the object fetched again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from functools import cache
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


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


class UnsafeCacheEntry(Exception):
    """A disk-cache entry that is not plain bytes (a pickle, a foreign type, a path outside the folder)."""


@cache
def bytes_disk() -> type:
    """The ``diskcache.Disk`` subclass :class:`DiskCache` uses: raw bytes in, raw bytes out.

    Why a subclass and not a check after ``Cache.get``: the stock ``Disk.fetch`` unpickles before the
    caller sees the value, so the refusal has to happen before deserialisation.  Built on first use
    because diskcache is an optional (``s3``) dependency.
    """
    import diskcache
    from diskcache.core import MODE_BINARY, MODE_RAW

    class BytesOnlyDisk(diskcache.Disk):  # type: ignore[misc]
        def _inside(self, filename: str) -> str:
            root = os.path.realpath(self._directory)
            full = os.path.realpath(os.path.join(root, filename))
            if os.path.commonpath([root, full]) != root:
                raise UnsafeCacheEntry(f"its file {filename!r} is outside the cache folder")
            return full

        def put(self, key: Any) -> tuple[Any, bool]:
            if not isinstance(key, str):
                raise TypeError(f"disk cache keys are str, not {type(key).__name__}")
            return super().put(key)

        def get(self, key: Any, raw: bool) -> Any:
            if not raw:
                raise UnsafeCacheEntry("its key is pickled")
            return super().get(key, raw)

        def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
            if read or not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"the disk cache stores bytes only, not {type(value).__name__}")
            return super().store(bytes(value), False, key=key)

        def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> bytes:
            if mode not in (MODE_RAW, MODE_BINARY) or read:
                raise UnsafeCacheEntry(f"it is stored in mode {mode}, not as raw bytes")
            if mode == MODE_BINARY:
                if not filename:
                    raise UnsafeCacheEntry("it names no file")
                self._inside(filename)
            data = super().fetch(mode, filename, value, False)
            if not isinstance(data, bytes):
                raise UnsafeCacheEntry(f"it holds a {type(data).__name__}, not bytes")
            return data

        def remove(self, file_path: str) -> bool:
            try:
                self._inside(file_path)
            except UnsafeCacheEntry:
                log.warning("disk cache: not removing %r (outside the cache folder)", file_path)
                return False
            return bool(super().remove(file_path))

    return BytesOnlyDisk


class DiskCache:
    """Bounded on-disk cache of raw objects (bytes as downloaded), shared by processes.

    ``max_bytes`` bounds the cache folder (``diskcache`` evicts the least recently used objects once
    it is full).  A full disk or a damaged database never stops training: the cache is optional, so
    its errors are logged and count as misses.  Only raw bytes are ever read back (:func:`bytes_disk`):
    anything else is dropped, counted in ``refused`` and fetched again.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        import diskcache

        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.max_bytes = int(max_bytes)
        self.refused = 0
        self._cache = diskcache.Cache(self.root, size_limit=self.max_bytes, disk=bytes_disk(),
                                      eviction_policy="least-recently-used")

    def get(self, uri: str) -> bytes | None:
        try:
            data = self._cache.get(uri, default=None, retry=True)
        except UnsafeCacheEntry as e:
            self.refused += 1
            log.warning("disk cache: dropped the entry for %s (%s); fetching it again", uri, e)
            self._drop(uri)
            return None
        except Exception as e:  # sqlite / filesystem trouble: a miss
            log.warning("disk cache read failed for %s: %s", uri, e)
            return None
        return data if isinstance(data, bytes) else None

    def _drop(self, uri: str) -> None:
        try:
            self._cache.delete(uri, retry=True)
        except Exception as e:  # the refetch overwrites it anyway
            log.warning("disk cache: cannot drop %s: %s", uri, e)

    def put(self, uri: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        try:
            self._cache.set(uri, data, retry=True)
        except Exception as e:
            log.warning("disk cache write failed for %s: %s", uri, e)

    @property
    def nbytes(self) -> int:
        """Bytes the cache folder holds (database and files)."""
        return int(self._cache.volume())

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()

    def __getstate__(self) -> dict[str, object]:
        return {"root": self.root, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["root"], state["max_bytes"])  # type: ignore[misc, arg-type]
