"""The source registry: each kind of field source registers how to recognise and open its URIs.

``open_source`` (in :mod:`dinocell.data.sources`) asks the kinds in priority order; the first whose
``matches(uri)`` is true opens it.  Kinds register themselves when their module is imported, and
this module imports none of them, so there is no import cycle between the registry and the kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dinocell.errors import DataError


@dataclass(frozen=True)
class SourceKind:
    """One kind of source: ``matches(uri)`` recognises it, ``open(uri, data_cfg)`` builds it."""

    name: str
    matches: Callable[[str], bool]
    open: Callable[[str, Any], Any]
    priority: int = 50  # lower is asked first; the catch-all folder kind is last


_KINDS: dict[str, SourceKind] = {}


def register_source(name: str, matches: Callable[[str], bool], opener: Callable[[str, Any], Any],
                    priority: int = 50) -> None:
    """Register (or replace) a source kind."""
    _KINDS[name] = SourceKind(name, matches, opener, priority)


def source_kinds() -> list[SourceKind]:
    """Registered kinds in the order they are asked."""
    return sorted(_KINDS.values(), key=lambda k: (k.priority, k.name))


def open_registered(uri: str, data_cfg: Any) -> Any:
    """Open ``uri`` with the first registered kind that recognises it."""
    for kind in source_kinds():
        if kind.matches(uri):
            return kind.open(uri, data_cfg)
    raise DataError(f"no source kind recognises {uri!r} (known: {', '.join(k.name for k in source_kinds())})")
