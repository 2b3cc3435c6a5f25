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
