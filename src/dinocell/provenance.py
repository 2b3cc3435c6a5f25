"""Which code made a run: the dinocell version and the git commit of the checkout it was imported from.

A shared leaf (like :mod:`dinocell.paths`): run folders, summaries, profiles and exports record it so a
figure can be traced back to the code that produced it (dinov3 logs its SHA for the same reason).
Outside a git checkout (an installed wheel) the commit is ``"unknown"``.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from dinocell import __version__


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the checkout holding this package (``+dirty`` when it has uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--show-toplevel"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        if not top or not (here.is_relative_to(Path(top))):
            return "unknown"
        sha = subprocess.run(
            ["git", "-C", top, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", top, "status", "--porcelain", "--untracked-files=no", "--", "src"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha or "unknown"


def provenance() -> dict[str, str]:
    """``{"dinocell_version": ..., "git_commit": ...}`` for config.yaml, summary.json, profiles, exports."""
    return {"dinocell_version": __version__, "git_commit": git_commit()}
