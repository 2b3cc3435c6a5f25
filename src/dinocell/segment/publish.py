"""One ``segment predict`` generation at a time: stage everything, then publish.

``predict`` writes the label TIFFs and the object table of a run into ``OUT/.staging-<objects>-<pid>/``
(a folder still being staged by a live process is a one-line error) and only then publishes them into ``OUT/masks/`` and ``OUT/<objects>.parquet``.  Publishing cannot be
one rename (the TIFFs and the table are separate files, and ``OUT/masks/`` may hold other object
classes), so it is ordered so that a kill at any instant never leaves the *old* table beside *new*
masks:

1. ``OUT/.<objects>.publishing`` marks the folder in progress;
2. the old ``<objects>.parquet`` is removed first -- from here on no table claims to describe the masks;
3. the old ``*_<objects>_masks.tif`` are removed and the staged ones renamed in;
4. the staged table is renamed to ``<objects>.parquet`` (atomic) -- the new generation is complete;
5. the marker and the staging folder are removed.

A kill while staging leaves the previous generation untouched; a kill while publishing leaves no
table (and the marker).  The next ``predict`` into the folder removes stale staging folders and,
seeing the marker, replaces the half-published generation whole.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from dinocell.errors import UserError
from dinocell.paths import write_text_atomic

log = logging.getLogger(__name__)

MASKS = "masks"


def marker(out: Path, objects: str) -> Path:
    """The in-progress marker of ``objects`` in ``out``."""
    return out / f".{objects}.publishing"


def mask_suffix(objects: str) -> str:
    return f"_{objects}_masks.tif"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def begin(out: Path, objects: str) -> Path:
    """A fresh staging folder in ``out`` (stale ones of killed runs are removed first)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f".staging-{objects}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            raise UserError(f"another 'segment predict' (pid {pid}) is writing {objects} into {out}; "
                            "wait for it or choose another --out")
        shutil.rmtree(old, ignore_errors=True)
    if marker(out, objects).exists():
        log.warning("%s: a previous 'segment predict' of %s was interrupted while publishing; its outputs "
                    "are replaced by this run's", out, objects)
    stage = out / f".staging-{objects}-{os.getpid()}"
    (stage / MASKS).mkdir(parents=True)
    return stage


def publish(stage: Path, out: Path, objects: str, table_name: str) -> None:
    """Move the staged masks and table of ``objects`` into ``out`` (see the module docstring)."""
    mark = marker(out, objects)
    write_text_atomic(mark, f"{stage.name}\n")
    (out / table_name).unlink(missing_ok=True)
    masks = out / MASKS
    masks.mkdir(exist_ok=True)
    for old in masks.glob(f"*{mask_suffix(objects)}"):
        old.unlink()
    # Plain renames, not dinocell.paths writers, on purpose: these files are already complete (written in
    # the staging folder on the same disk), so there is nothing to write, only to move; a rename per file
    # keeps other object classes' masks in OUT/masks/ (a whole-folder swap by paths.write_folder_atomic
    # would drop them), and the order above, not a temp file, is what makes a kill safe.
    for new in sorted((stage / MASKS).iterdir()):
        os.replace(new, masks / new.name)
    os.replace(stage / table_name, out / table_name)
    mark.unlink()
    shutil.rmtree(stage, ignore_errors=True)


def in_progress(out: Path, objects: str) -> bool:
    """True while (or after an interrupted) publishing of ``objects`` in ``out``."""
    return marker(Path(out), objects).exists()


__all__ = ["MASKS", "begin", "in_progress", "marker", "mask_suffix", "publish"]
