from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from dinocell.errors import ConfigError
from dinocell.extract.check import check_output
from dinocell.extract.dataset import FeatureVolumeDataset
from dinocell.extract.runner import ClusterOptions, job_script, plan_indices, run_extraction
from dinocell.extract.volumes import volume_paths

REPO = Path(__file__).resolve().parents[2]


def test_plan_indices():
    assert plan_indices(3, 5) == [5, 6, 7]
    assert plan_indices(None, 0, [4, 2, 4, 9]) == [4, 2, 9]
    with pytest.raises(ConfigError, match="--num-volumes"):
        plan_indices(None, 0, None)
    with pytest.raises(ConfigError, match=">= 0"):
        plan_indices(None, 0, [-1])


def test_cluster_option_validation():
    with pytest.raises(ConfigError, match="--cluster must be one of"):
        ClusterOptions(cluster="pbs").validate()
    with pytest.raises(ConfigError, match="--walltime"):
        ClusterOptions(walltime="2h").validate()


def test_serial_run_is_idempotent(tmp_path, synthetic_manifest, make_cfg):
    cfg = make_cfg(tmp_path, synthetic_manifest)
    s1 = run_extraction(cfg, [0, 1], ClusterOptions(cluster="serial"), progress=False)
    assert s1.completed == [0, 1] and not s1.skipped and not s1.failed
    stamps = [volume_paths(tmp_path, i)["metadata"].stat().st_mtime_ns for i in (0, 1)]
    s2 = run_extraction(make_cfg(tmp_path, synthetic_manifest), [0, 1, 2], ClusterOptions(cluster="serial"),
                        progress=False)
    assert s2.skipped == [0, 1] and s2.completed == [2]
    assert [volume_paths(tmp_path, i)["metadata"].stat().st_mtime_ns for i in (0, 1)] == stamps
    record = json.loads((tmp_path / "extraction_run.json").read_text())
    assert record["requested"] == [0, 1, 2] and len(record["runs"]) == 2
    from dinocell.provenance import provenance

    assert all({k: r[k] for k in ("dinocell_version", "git_commit")} == provenance() for r in record["runs"])


def test_local_dask_cluster_then_check(tmp_path, synthetic_manifest, make_cfg):
    cfg = make_cfg(tmp_path, synthetic_manifest)
    summary = run_extraction(cfg, [0, 1, 2], ClusterOptions(cluster="local", num_processors=1), progress=False)
    assert summary.completed == [0, 1, 2] and not summary.failed
    report = check_output(tmp_path, verify=True)
    assert report["ok"] and report["completed"] == 3 and report["missing_indices"] == []


def test_failed_volume_is_logged_and_others_continue(tmp_path, synthetic_manifest, make_cfg):
    good = yaml.safe_load(synthetic_manifest.read_text())["volumes"][0]
    good = {**good, "raw": str(synthetic_manifest.parent / good["raw"]),
            "labels": {k: str(synthetic_manifest.parent / v) for k, v in good["labels"].items()}}
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"volumes": [good, {"name": "broken", "raw": str(tmp_path / "nope.zarr")}]}))
    out = tmp_path / "out"
    summary = run_extraction(make_cfg(out, manifest), [0, 1, 2], ClusterOptions(cluster="serial"), progress=False)
    assert summary.completed == [0, 2] and list(summary.failed) == [1]
    assert "DataError: cannot open" in summary.failed[1]
    err = volume_paths(out, 1)["error"].read_text().strip().splitlines()
    assert err[-1] == summary.failed[1] and any("Traceback" in ln for ln in err)
    report = check_output(out)
    assert report["failed"] == {"1": summary.failed[1]} and report["missing_indices"] == [1]
    assert not report["ok"]


@pytest.mark.parametrize("kind,needles", [
    ("lsf", ["#BSUB -n 2", "#BSUB -W 01:30", "#BSUB -q gpu_q", '#BSUB -P "lab"', '#BSUB -gpu "num=1"',
             "#BSUB -J dinocell-extract", "--resources volume=1", "export OMP_NUM_THREADS=2", "source env.sh"]),
    ("slurm", ["#SBATCH --cpus-per-task=2", "#SBATCH -t 01:30:00", "#SBATCH -p gpu_q", "#SBATCH -A lab",
               "#SBATCH --gres=gpu:1", "#SBATCH --mem=", "--resources volume=1"]),
])
def test_dry_run_job_scripts(tmp_path, make_cfg, kind, needles):
    opts = ClusterOptions(cluster=kind, num_processors=2, memory_gb=8, walltime="01:30", queue="gpu_q",
                          project="lab", gpu=True, prologue=["source env.sh"])
    script = job_script(opts, tmp_path / "out")
    assert script.startswith("#!/usr/bin/env bash")
    for n in needles:
        assert n in script, n
    assert sys.executable in script and "dask_worker" in script
    buf = io.StringIO()
    summary = run_extraction(make_cfg(tmp_path / "out2", None), [0, 1], opts, dry_run=True, out=buf)
    assert summary.completed == [] and buf.getvalue().strip().startswith("#!/usr/bin/env bash")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out").exists()  # a dry run leaves no trace


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import dinocell.extract.volumes.store as V

    ready = Path(sys.argv[2])
    original = V.array_spec

    def stall(path, *args, **kwargs):
        # volume 1: features and gt writes are already in flight when the mask array is created
        if "volume_000001_mask" in str(path):
            ready.write_text("writing volume 1")
            time.sleep(300)
        return original(path, *args, **kwargs)

    V.array_spec = stall
    from dinocell.cli import main
    sys.exit(main(["extract-volumes", "--output-dir", sys.argv[1], "--manifest", sys.argv[3],
                   "--indices", "0", "2", "1", "--output-image-dim", "16", "--cluster", "serial",
                   "--no-progress"]))
""")


def test_sigkill_mid_volume_then_rerun(tmp_path, synthetic_manifest, make_cfg):
    out, ready = tmp_path / "out", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out), str(ready), str(synthetic_manifest)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.time() < deadline, "extraction never reached volume 1"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert volume_paths(out, 1)["features"].is_dir()  # partial volume on disk ...
    report = check_output(out)
    assert report["completed_indices"] == [0, 2]  # ... but never reported complete
    assert report["missing_indices"] == [1] and report["gaps"] == [1]
    assert "1" in report["incomplete"] and not report["ok"]
    assert FeatureVolumeDataset(out).indices == [0, 2]
    stamps = {i: volume_paths(out, i)["metadata"].stat().st_mtime_ns for i in (0, 2)}

    summary = run_extraction(make_cfg(out, synthetic_manifest), [0, 1, 2], ClusterOptions(cluster="serial"),
                             progress=False)
    assert summary.completed == [1] and sorted(summary.skipped) == [0, 2]
    assert {i: volume_paths(out, i)["metadata"].stat().st_mtime_ns for i in (0, 2)} == stamps
    final = check_output(out, verify=True)
    assert final["ok"] and final["completed_indices"] == [0, 1, 2]
