"""Caches of the S3 source: decoded fields in memory (bounded in bytes) and raw objects on disk.

The disk cache is :mod:`diskcache` (SQLite index + files, safe across processes, LRU eviction by
size): object keys are database keys, never file names, so no key -- ``..``, an absolute path, 3000
characters -- can name a file outside the cache folder.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

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


class DiskCache:
    """Bounded on-disk cache of raw objects (bytes as downloaded), shared by processes.

    ``max_bytes`` bounds the cache folder (``diskcache`` evicts the least recently used objects once
    it is full).  A full disk or a damaged database never stops training: the cache is optional, so
    its errors are logged and count as misses.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        import diskcache

        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.max_bytes = int(max_bytes)
        self._cache = diskcache.Cache(self.root, size_limit=self.max_bytes,
                                      eviction_policy="least-recently-used")

    def get(self, uri: str) -> bytes | None:
        try:
            data = self._cache.get(uri, default=None, retry=True)
        except Exception as e:  # sqlite / filesystem trouble: a miss
            log.warning("disk cache read failed for %s: %s", uri, e)
            return None
        return bytes(data) if data is not None else None

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
