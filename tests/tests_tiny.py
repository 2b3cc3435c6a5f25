"""Tiny-run overrides importable from module-scoped fixtures (conftest's fixture is function-scoped)."""

from conftest import TINY_OVERRIDES

TINY = list(TINY_OVERRIDES)
