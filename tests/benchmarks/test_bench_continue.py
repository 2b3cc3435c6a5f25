from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_continue_smoke_prints_c1_c2_c3_and_writes_the_curves(tmp_path: Path) -> None:
    """End to end: a "release" exported without heads, two-stage and one-stage continuation, probes, figure."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_continue.py"), "--smoke", "--out",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-3:]
    for line, (cid, target) in zip(last, [("C1", ">=0.98"), ("C2", ">=1.05"), ("C3", ">=1.0")], strict=True):
        m = re.fullmatch(rf"{cid} ratio=([0-9.]+) target{target}", line)
        assert m and float(m.group(1)) > 0, line
    summary = json.loads((tmp_path / "bench_continue.json").read_text())
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert {"two_stage", "one_stage"} <= set(summary["curves"]) and summary["curves"]["two_stage"]["A"]
    # the release really is backbone-only, and both continuations started from it
    import safetensors.torch

    keys = safetensors.torch.load_file(str(tmp_path / "release" / "model.safetensors")).keys()
    assert keys and not any("head" in k for k in keys)
    for run in ("two_stage", "one_stage"):
        cfg = (tmp_path / run / "config.yaml").read_text()
        assert f"pretrained: {tmp_path / 'release'}" in cfg
