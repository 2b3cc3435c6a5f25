"""Output locations checked before any work starts, so a bad ``--out`` / ``--output-dir`` is one line.

A shared leaf (like :mod:`dinocell.config` and :mod:`dinocell.errors`): every layer's CLI may import it.
Without these checks a user finds out after minutes of work, from a traceback, that the output folder
is an existing file, that the disk location is read-only, or that ``--out`` names a folder.

It also holds the one atomic writer (:func:`write_atomic`, :func:`write_text_atomic`,
:func:`write_files_atomic` for a writer that fills a folder with named files, and
:func:`write_folder_atomic` for a whole tree published at once): temp file + rename, and a full disk (``ENOSPC``, or torch's / safetensors' wrapped versions of it) becomes one
:class:`DiskFullError` line naming the file and the bytes it needs, with the temp file removed and the
last complete file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from dinocell.errors import UserError
from dinocell.runs import RunDir

log = logging.getLogger(__name__)
T = TypeVar("T")

#: errno values that mean "this disk / quota cannot take more bytes".
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# How third-party writers report the same thing without an errno: torch.save's PytorchStreamWriter
# ("[enforce fail at inline_container.cc:...] ... file write failed"), safetensors' Rust IoError
# ("No space left on device", kind StorageFull), pyarrow ("IOError: ... No space left on device").
_DISK_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded", "file write failed",
                   "file too large", "unexpected pos")


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


def write_text_atomic(path: str | os.PathLike[str], text: str, *, unique: bool = False, fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` through ``<name>.tmp`` + ``os.replace``: a killed process never leaves
    a half-written summary, config or manifest behind (the parent folder is created if needed); a full
    disk is one :class:`DiskFullError` line (see :func:`write_atomic`, also for ``unique`` and ``fsync``)."""
    data = text.encode()
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), needed=len(data), unique=unique, fsync=fsync)


def refuse_segmentation_run(path: str | os.PathLike[str] | None, command: str) -> None:
    """One line when ``path`` (a run folder, or a file inside one) is a ``dinocell segment fit`` run.

    Why here: evaluate / embed / export load a *pretraining* model; given a segmentation run they used
    to fail on its config ("unknown config key 'model.backbone'"), which does not say what was wrong."""
    if path is None:
        return
    p = Path(path).expanduser()
    for folder in (p, p.parent, p.parent.parent) if p.exists() else ():
        cfg = RunDir(folder).config
        if not cfg.is_file():
            continue
        import yaml

        try:
            top = yaml.safe_load(cfg.read_text())
        except (OSError, yaml.YAMLError):
            return
        if isinstance(top, dict) and {"task", "infer", "post"} <= set(top):
            raise UserError(f"{path} is a segmentation run ('dinocell segment fit'), not a pretrained model; "
                            f"{command} needs a pretraining run folder, .ckpt, export folder "
                            f"or DINOv3 .pth (to use the segmenter: dinocell segment predict {folder} INPUT --out DIR)")
        return


class DiskFullError(UserError):
    """A write failed because the disk (or quota) is full; the message names the file and the bytes."""


def is_disk_full(exc: BaseException) -> bool:
    """``exc`` (or an exception it was raised from) says the disk or quota is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def human_bytes(n: float) -> str:
    """``1.5 GB``-style size for messages."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free bytes on the disk holding ``path`` (or its nearest existing ancestor); None if unknown."""
    base = Path(path).expanduser().absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        return int(shutil.disk_usage(base).free)
    except OSError:
        return None


def payload_bytes(obj: Any) -> int:
    """Bytes of the arrays / tensors / bytes inside ``obj`` (nested dicts, lists): what a writer of it
    needs at least.  Duck-typed on ``.nbytes`` so this leaf never imports torch or numpy."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if isinstance(obj, str):
        return len(obj.encode())
    if isinstance(obj, Mapping):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    n = getattr(obj, "nbytes", None)
    return int(n) if isinstance(n, int) else 0


def disk_full_error(path: str | os.PathLike[str], needed: int | None, exc: BaseException | None = None,
                    written: int | None = None) -> DiskFullError:
    """The one-line error for a write of ``needed`` bytes to ``path`` that did not fit."""
    free = free_bytes(Path(path).parent)
    if needed:
        need = f"it needs {human_bytes(needed)}"
    elif written:
        need = f"it needs more than the {human_bytes(written)} written before the disk filled"
    else:
        need = "it needs more space"
    have = f", {human_bytes(free)} free there" if free is not None else ""
    return DiskFullError(f"no space left on the disk to write {path}: {need}{have}; free some space or "
                         "write elsewhere (the previous complete file, if any, is untouched)")


def ensure_free_space(path: str | os.PathLike[str], needed: int, margin: float = 1.05) -> None:
    """Refuse up front (``DiskFullError``) when ``path``'s disk has less than ``needed * margin`` free.

    Why: a failed multi-GB write wastes minutes and, for writers that do not clean up, leaves a temp
    file; checking first costs one ``statvfs``."""
    free = free_bytes(Path(path).parent)
    if free is not None and needed > 0 and free < needed * margin:
        raise disk_full_error(path, int(needed * margin))


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], object],
                 needed: int | None = None, *, unique: bool = False, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` for ``<path>.tmp`` and rename it to ``path``.

    Any failure removes the temp file and leaves an earlier ``path`` untouched; a full disk becomes one
    :class:`DiskFullError` naming ``path`` and ``needed`` bytes (or what was written before it failed),
    so the CLI prints one line and exits 2 instead of a torch / safetensors traceback.  ``unique``: the temp
    name is ``.<name>.<pid>.<thread>.tmp``, for files that several processes or threads may write at once
    (the last rename wins, none reads another's half).  ``fsync``: the bytes reach the disk before the
    rename (files a cluster job's later reader trusts after a node crash).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = (p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp") if unique
           else p.with_name(p.name + ".tmp"))
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        written = None
        try:
            written = tmp.stat().st_size if tmp.exists() else None
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(p, needed, e, written) from None
        raise
    return p


def write_files_atomic(folder: str | os.PathLike[str], write: Callable[[Path], object],
                       names: Iterable[str]) -> Path:
    """Call ``write(tmp_dir)`` for a writer that fills a folder (e.g. Hugging Face's ``save_for_hf``), then
    move each of ``names`` into ``folder`` by rename, in order: the last name marks the set complete, and
    an earlier set stays whole until its files are replaced one by one.  The temp folder (``.tmp-<pid>``
    inside ``folder``, so the renames stay on one disk) is removed whatever happens; a full disk is one
    :class:`DiskFullError` line."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with _temp_tree(out, out / f".tmp-{os.getpid()}") as tmp:
        write(tmp)
        for name in names:
            os.replace(tmp / name, out / name)
    return out


@contextlib.contextmanager
def _temp_tree(out: Path, tmp: Path) -> Iterator[Path]:
    """A fresh temp folder ``tmp`` for a writer of ``out``, removed whatever happens; a full disk while
    writing becomes one :class:`DiskFullError` line naming ``out``."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except Exception as e:
        if is_disk_full(e):
            raise disk_full_error(out, None, e) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_folder_atomic(folder: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_dir)`` for a writer that fills a whole tree (a generated dataset of zarr containers
    and a manifest), then rename the finished tree to ``folder`` in one step: readers see no folder or a
    complete one, never a half-written tree (:func:`write_files_atomic` moves named files one by one,
    which a killed run could leave half done with stale folders in the way of the next run).

    The temp folder is the sibling ``.<name>.<pid>.<thread>.tmp`` (same disk, hidden) and is removed
    whatever happens.  When ``folder`` already exists at the rename (another process finished first),
    its copy is kept and ours dropped: the first complete copy wins.  A full disk is one
    :class:`DiskFullError` line."""
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _temp_tree(out, out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")) as tmp:
        write(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not out.is_dir():
                raise
    return out


def remove_temp_files(outputs: Iterable[str | os.PathLike[str]], since: float,
                      suffixes: tuple[str, ...] = (".tmp",)) -> list[Path]:
    """Delete ``*.tmp`` files modified at or after ``since`` (``time.time()``) under each output folder
    (recursively), or next to each output file: the half-written files a failed command left behind,
    never older ones (another run's are not ours)."""
    removed: list[Path] = []
    for out in outputs:
        root = Path(out).expanduser()
        if root.is_dir():
            files: Iterable[Path] = root.rglob("*")
        elif root.parent.is_dir():
            files = root.parent.glob(root.name + "*")
        else:
            continue
        for f in files:
            try:
                if f.is_file() and f.name.endswith(suffixes) and f.stat().st_mtime >= since - 1.0:
                    f.unlink()
                    removed.append(f)
            except OSError:
                continue
    return removed


def once_per_job(path: str | os.PathLike[str], read: Callable[[], T | None], make: Callable[[], T],
                 timeout_s: float) -> T:
    """What ``read()`` finds for ``path``, else ``make()`` under the file lock ``<path>.lock``.

    Why: the processes of one job (DDP ranks, a node's workers) start together and need the same
    derived file (a listing index, a held-out split); under the lock one makes it while the others
    wait, then read it.  ``make`` writes the file itself (atomically).  When no lock can be taken
    (unwritable folder, timeout) each caller makes its own, with a warning."""
    hit = read()
    if hit is not None:
        return hit
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{os.fspath(path)}.lock", timeout=timeout_s)
        lock.acquire()
    except (OSError, Timeout) as e:
        log.warning("cannot lock %s (%s): making it without a lock", path, e)
        return make()
    try:
        hit = read()  # another process may have made it while this one waited
        return hit if hit is not None else make()
    finally:
        lock.release()

