"""Output locations checked before any work starts, so a bad ``--out`` / ``--output-dir`` is one line.

A shared leaf (like :mod:`dinocell.config` and :mod:`dinocell.errors`): every layer's CLI may import it.
Without these checks a user finds out after minutes of work, from a traceback, that the output folder
is an existing file, that the disk location is read-only, or that ``--out`` names a folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dinocell.errors import UserError


def _check_creatable(folder: Path, what: str, target: Path) -> None:
    """``folder`` exists as a writable folder, or its nearest existing ancestor is one."""
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{what} {target}: {base} is a file, not a folder")
    try:  # a real probe: os.access says yes to root on read-only folders and mounts
        tempfile.NamedTemporaryFile(dir=base, prefix=".dinocell-probe-").close()
    except OSError:
        raise UserError(f"{what} {target}: {base} is not writable") from None


def check_output_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """``path`` as a folder that exists or can be created and is writable (``UserError`` otherwise)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file; give a folder")
    _check_creatable(p, what, p)
    return p


def check_output_file(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """``path`` as a file that can be (over)written: not a folder, its folder creatable and writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{what} {p} is not writable")
    _check_creatable(p.parent, what, p)
    return p


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through ``<name>.tmp`` + ``os.replace``: a killed process never leaves
    a half-written summary, config or manifest behind (the parent folder is created if needed)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p
