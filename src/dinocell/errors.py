"""User-facing errors.

A :class:`UserError` is something the user can fix (a bad path, an unknown config key, a corrupt
file).  The CLI prints its message on one line and exits with status 2 instead of a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by user input; the CLI shows only ``str(err)`` and exits 2."""


class ConfigError(UserError):
    """Bad configuration: unknown key, wrong type, unreadable YAML."""


class DataError(UserError):
    """Bad data: missing path, no matching files, unreadable image, unknown channel."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type name when empty): library errors (torch, safetensors,
    timm) span many lines, a :class:`UserError` quoting one must not."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def require_extra(extra: str, modules: tuple[str, ...] | list[str], what: str) -> None:
    """Raise a one-line :class:`UserError` naming ``pip install 'dinocell[<extra>]'`` when one of
    ``modules`` cannot be found.

    Why up front instead of a late ImportError: the extras (s3, volumes, wandb, profiling) are optional,
    the 2-D core never needs them, and a run should stop before it writes anything, with the fix in
    the message. ``find_spec`` locates a module without importing it.
    """
    import importlib.util

    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    missing = [m for m in modules if not importable(m)]
    if missing:
        raise UserError(f"{what} needs the optional package(s) {', '.join(missing)}: "
                        f"pip install 'dinocell[{extra}]'")
