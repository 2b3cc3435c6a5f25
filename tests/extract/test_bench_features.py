from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_features_quick_prints_the_three_ratios():
    """P5 is measured on the patch store; the seed's voxel-store figure is printed beside it."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_features.py"), "--quick", "--reps", "1",
                          "--dim", "32"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-3:]
    for line, (pid, target) in zip(last, [("P4", ">=0.5"), ("P5", ">=100"), ("P6", ">=0.9")], strict=True):
        m = re.fullmatch(rf"{pid} ratio=([0-9.]+) target{target}", line)
        assert m and float(m.group(1)) > 0, line
    assert "read fromfile" in res.stdout and "on-the-fly item (patch)" in res.stdout
    assert "cached load (patch, zstd)" in res.stdout and "the seed's P5" in res.stdout
