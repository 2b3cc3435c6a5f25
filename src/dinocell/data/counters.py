"""Counters in shared memory, so the main process sees what its DataLoader workers did."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import get_worker_info

_AFTER_FORK: weakref.WeakSet[Any] = weakref.WeakSet()


def reset_after_fork(obj: Any) -> None:
    """Call ``obj._after_fork()`` in every forked child: a lock held by another thread at fork time
    stays locked forever in the child, so objects that own locks replace them there."""
    _AFTER_FORK.add(obj)


def _run_after_fork() -> None:
    for obj in list(_AFTER_FORK):
        obj._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_run_after_fork)


class SharedCounters:
    """Float64 counters in shared memory, one row per process (main = row 0, worker ``i`` = 1 + i).

    Each process only writes its own row (its threads serialise on a lock), so no increment is lost;
    readers sum the rows.  The tensor lives in shared memory, so DataLoader workers (fork or spawn)
    update the same table the trainer's loggers read.
    """

    ROWS = 65

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._col = {n: i for i, n in enumerate(self.names)}
        self.table = torch.zeros((self.ROWS, len(self.names)), dtype=torch.float64).share_memory_()
        self._lock = threading.Lock()
        reset_after_fork(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"names": self.names, "table": self.table}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.names = state["names"]
        self._col = {n: i for i, n in enumerate(self.names)}
        self.table = state["table"]
        self._lock = threading.Lock()
        reset_after_fork(self)

    @staticmethod
    def row() -> int:
        """This process's row: 0 in the main process, 1 + worker id in a DataLoader worker."""
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
