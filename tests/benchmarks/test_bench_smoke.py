"""Every benchmark script runs end to end in its ``--smoke`` mode and prints its ``ID ratio=`` lines.

The numbers of a smoke run are meaningless (seconds of work); what is tested is that every code path
of every benchmark still runs against the current library.  bench_index.py and bench_continue.py are
covered by their owners' tests.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
RATIO = re.compile(r"^([A-Z][A-Z0-9-]*) ratio=(\S+) target(>=|<=)\S+$")

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, timeout: int = 1800) -> dict[str, float]:
    """Run ``benchmarks/<script>`` and return its ``ID ratio=`` values (nan allowed: smoke sizes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{script} exited {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    out = {}
    for line in res.stdout.splitlines():
        m = RATIO.match(line.strip())
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pretraining cache for the downstream scripts (they reuse each other's backbones)."""
    return tmp_path_factory.mktemp("bench_cache")


def test_bench_views_smoke():
    assert set(run_bench("bench_views.py", "--smoke")) == {"P2"}


def test_bench_train_step_smoke():
    r = run_bench("bench_train_step.py", "--smoke")
    assert set(r) == {"P1"} and r["P1"] > 0


def test_bench_s3_smoke():
    for mod in ("boto3", "moto"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed (the s3 extra)")
    r = run_bench("bench_s3.py", "--smoke")
    assert set(r) == {"P3"} and r["P3"] > 0


def test_bench_features_smoke():
    r = run_bench("bench_features.py", "--smoke")
    assert set(r) == {"P4", "P5", "P6"} and all(v > 0 for v in r.values())


def test_bench_invariance_smoke(tmp_path):
    r = run_bench("bench_invariance.py", "--smoke", "--out", str(tmp_path / "q12"))
    assert set(r) == {"Q12"} and r["Q12"] >= 1.0  # the best of two variants, one being the reference


def test_bench_downstream_smoke(tmp_path, bench_cache):
    r = run_bench("bench_downstream.py", "--smoke", "--work", str(tmp_path), "--cache-dir", str(bench_cache),
                  "--jobs", "2")  # worker processes, whatever the machine's core count
    expect = {"S1", "S2", "PROF"}
    if (SHARED_DATA / "dsb2018_nuclei").is_dir():
        expect |= {"R1", "R2", "R3"}
        assert (tmp_path / "side_by_side.png").stat().st_size > 1000
    assert set(r) == expect
    assert r["R1"] >= 0 if "R1" in r else True
    assert (tmp_path / "results.json").is_file()
    assert len(list(bench_cache.iterdir())) == 2  # multiview + single_view, one folder each


def test_bench_segmentation_and_profiling_are_entry_points_into_downstream(tmp_path, bench_cache):
    """The thin entry points reuse the cached backbones (no pretraining) and print their own lines."""
    before = sorted(p.name for p in bench_cache.iterdir())
    seg = run_bench("bench_segmentation.py", "--smoke", "--work", str(tmp_path / "seg"), "--cache-dir",
                    str(bench_cache), "--shared", str(tmp_path / "no_shared"), "--jobs", "1")  # in-process path
    assert set(seg) == {"S1", "S2"}
    prof = run_bench("bench_profiling.py", "--smoke", "--work", str(tmp_path / "prof"), "--cache-dir",
                     str(bench_cache))
    assert set(prof) == {"PROF"}
    assert sorted(p.name for p in bench_cache.iterdir()) == before
