"""The ``volumes`` extra (tensorstore, dask, dask-jobqueue) is optional.

A fresh interpreter hides those packages behind an import hook, as if dinocell had been installed
without ``[volumes]``: importing dinocell / dinocell.extract and building the CLI must not touch them,
and a 3-D command must fail with one line naming the extra (exit 2).
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from hidden_imports import run_hiding

HIDDEN = ("tensorstore", "dask", "distributed", "dask_jobqueue")


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_hiding(HIDDEN, code, cwd)


def _loaded_heavy_modules(code: str, tmp_path: Path) -> str:
    res = _run(textwrap.dedent(code) + "\nprint('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in HIDDEN))\n",
               tmp_path)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_imports_and_help_do_not_load_the_extra(tmp_path):
    out = _loaded_heavy_modules(
        """
        import contextlib, io
        import dinocell, dinocell.extract, dinocell.extract.cli, dinocell.extract.volumes
        from dinocell.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as buf, contextlib.suppress(SystemExit):
            main(["--help"])
        assert "extract-volumes" in buf.getvalue()
        """, tmp_path)
    assert "LOADED []" in out


@pytest.mark.parametrize("argv", [
    ["extract-volumes", "--output-dir", "out", "--num-volumes", "1"],
    ["extract-volumes", "--output-dir", "out", "--num-volumes", "1", "--cluster", "serial"],
    ["bench-load", "--preprocessed-dir", "."],
    ["check", "--output-dir", ".", "--verify"],
])
def test_3d_command_without_the_extra_is_one_line(tmp_path, argv):
    res = _run(f"from dinocell.cli import main\nraise SystemExit(main({argv!r}))\n", tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'dinocell[volumes]'" in lines[0], res.stderr
    assert "tensorstore" in lines[0]
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_quick_check_needs_no_extra(extracted_patch_dir, tmp_path):
    """Counting metadata and chunk files is plain Python: ``check`` without --verify works anywhere."""
    res = _run(f"from dinocell.cli import main\nraise SystemExit(main(['check', '--output-dir', "
               f"{str(extracted_patch_dir)!r}]))\n", tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "status: OK" in res.stdout
