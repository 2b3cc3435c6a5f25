"""Run code in a fresh interpreter that cannot import some packages, as if an extra were not installed.

Shared by the tests of the optional extras (tests/test_extras.py, tests/extract/test_volumes_extra.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_HIDE = textwrap.dedent(
    """
    import importlib.abc, sys
    HIDDEN = {hidden!r}
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, Hide())
    """
)


def run_hiding(hidden: Sequence[str], code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with ``hidden`` (top-level package names) unimportable; ``HIDDEN`` is defined
    for the code, and this checkout's ``src`` comes first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    script = _HIDE.format(hidden=tuple(hidden)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
