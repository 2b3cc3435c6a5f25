"""``benchmarks/bench_index.py --smoke`` runs every path (index, start-up of ranks, pattern grouping,
listing the fake S3 server) and prints every ID line (issue 24)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_index_smoke_prints_every_id() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_index.py"), "--smoke"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()[-7:]
    for line, pid in zip(lines, ["P7", "P8", "P9", "P10", "P11", "P12", "P13"], strict=True):
        m = re.fullmatch(rf"{pid} ratio=(-?[0-9.]+|nan) target[<>]=[0-9.]+", line)
        assert m, line
    assert "start-up of 2 ranks" in res.stdout and "fake server" in res.stdout
    assert float(re.search(r"P11 ratio=([0-9.]+)", res.stdout).group(1)) > 0  # type: ignore[union-attr]
