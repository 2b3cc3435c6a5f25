"""The one place the segmenter imports the trainer's checkpoint I/O (atomic writes, ``weights_only``
reads, architecture checks), so moving it (to ``dinocell.train.checkpoint``) is a one-file change."""

from __future__ import annotations

from dinocell.train.run import (  # noqa: F401  (re-exported)
    CKPT_DIR,
    LAST,
    check_compatible,
    load_checkpoint_file,
    resolve_precision,
)
from dinocell.train.run import (
    _checkpoint_io as checkpoint_io,
)

__all__ = ["CKPT_DIR", "LAST", "check_compatible", "checkpoint_io", "load_checkpoint_file", "resolve_precision"]
