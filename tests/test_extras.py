"""The core install works without the optional extras (s3, volumes, wandb, profiling).

A fresh interpreter hides the extras' packages behind an import hook, as if ``pip install -e .`` had
been run without them, then imports dinocell and lists a folder of fields: the 2-D core must never
import an extra at module level.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import tifffile

from hidden_imports import run_hiding

EXTRAS = ("boto3", "botocore", "diskcache", "tensorstore", "dask", "distributed", "dask_jobqueue",
          "wandb", "copairs")

def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return run_hiding(EXTRAS, code, tmp_path)


def test_core_imports_and_lists_a_folder_without_extras(tmp_path: Path) -> None:
    plate = tmp_path / "PLATE1__2024-01-01T00_00_00-Measurement1" / "Images"
    plate.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for ch in (1, 2, 3, 4, 5):
        tifffile.imwrite(plate / f"r01c01f01p01-ch{ch}sk1fk1fl1.tiff",
                         rng.integers(0, 4000, (64, 64), dtype=np.uint16))
    res = _run(
        f"""
        import sys, json
        import dinocell
        from dinocell.cli import main, build_parser
        build_parser()
        code = main(["data", "ls", {str(tmp_path)!r}, "--json"])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
        print("EXIT", code, "LOADED", loaded)
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "EXIT 0 LOADED []" in res.stdout, res.stdout + res.stderr
    assert '"fields": 1' in res.stdout


def test_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    res = _run(
        """
        from dinocell.cli import main
        raise SystemExit(main(["data", "ls", "s3://bucket/prefix/"]))
        """,
        tmp_path,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "dinocell[s3]" in lines[0], res.stderr


def test_wandb_logger_without_the_extra_is_one_line(tmp_path: Path) -> None:
    res = _run(
        f"""
        from dinocell.cli import main
        raise SystemExit(main(["pretrain", "--output-dir", {str(tmp_path / "run")!r}, "track.logger=wandb",
                               "--max-steps", "1"]))
        """,
        tmp_path,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert lines and "dinocell[wandb]" in lines[-1], res.stderr
