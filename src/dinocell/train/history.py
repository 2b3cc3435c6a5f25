"""A bounded record of the training loss that rides along in checkpoints.

A list of every step's loss grows without bound (3 M steps = 24 MB per checkpoint, re-pickled at every
save).  The summary only needs the start and the end of the curve and its mean, so the history keeps
the first ``head`` losses, the last ``tail`` losses, the count and the running sum: constant size,
and a resumed run reports the same ``loss_first`` / ``loss_last`` as an uninterrupted one.

The training step hands over the loss as a device tensor (:meth:`LossHistory.record`): it is kept as is
and turned into floats in one transfer when the history is read or every ``flush_every`` steps, so the
hot path never waits for the device.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

HEAD = 64
TAIL = 256


class LossHistory:
    """First ``head`` and last ``tail`` losses plus count and running sum (see module doc)."""

    def __init__(self, head: int = HEAD, tail: int = TAIL) -> None:
        self.head_size, self.tail_size = head, tail
        self.head: list[float] = []
        self.tail: deque[float] = deque(maxlen=tail)
        self.count = 0
        self.total = 0.0
        self._pending: list[torch.Tensor] = []

    #: device losses held before one host transfer (bounded memory, one sync per this many steps)
    flush_every = 256

    def record(self, loss: torch.Tensor) -> None:
        """Queue a detached scalar loss without synchronising with its device."""
        self._pending.append(loss.detach().reshape(()))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Move the queued device losses to the history (one transfer)."""
        if self._pending:
            values = torch.stack(self._pending).float().cpu().tolist()
            self._pending = []
            for v in values:
                self.append(v)

    def append(self, loss: float) -> None:
        if len(self.head) < self.head_size:
            self.head.append(float(loss))
        self.tail.append(float(loss))
        self.count += 1
        self.total += float(loss)

    def __len__(self) -> int:
        self.flush()
        return self.count

    @property
    def first(self) -> float | None:
        self.flush()
        return self.head[0] if self.head else None

    @property
    def last(self) -> float | None:
        self.flush()
        return self.tail[-1] if self.tail else None

    @property
    def mean(self) -> float | None:
        self.flush()
        return self.total / self.count if self.count else None

    def first_mean(self, k: int) -> float | None:
        """Mean of the first ``k`` losses (at most ``head``)."""
        self.flush()
        xs = self.head[: max(1, k)]
        return sum(xs) / len(xs) if xs else None

    def last_mean(self, k: int) -> float | None:
        """Mean of the last ``k`` losses (at most ``tail``)."""
        self.flush()
        xs = list(self.tail)[-max(1, k):]
        return sum(xs) / len(xs) if xs else None

    def state(self) -> dict[str, Any]:
        """Plain data (loadable with ``weights_only=True``)."""
        self.flush()
        return {"head": list(self.head), "tail": list(self.tail), "count": self.count, "total": self.total,
                "head_size": self.head_size, "tail_size": self.tail_size}

    @classmethod
    def from_state(cls, state: Any) -> LossHistory:
        """Restore :meth:`state`; a list (checkpoints before the history was bounded) is replayed."""
        if isinstance(state, dict):
            h = cls(int(state.get("head_size", HEAD)), int(state.get("tail_size", TAIL)))
            h.head = [float(x) for x in state.get("head", [])]
            h.tail.extend(float(x) for x in state.get("tail", []))
            h.count, h.total = int(state.get("count", 0)), float(state.get("total", 0.0))
            return h
        h = cls()
        for x in state or []:
            h.append(float(x))
        return h
