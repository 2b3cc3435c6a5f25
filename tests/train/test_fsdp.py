"""``train.strategy=fsdp``: FSDP2 (fully_shard) takes steps, clips per module and checkpoints, on 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinocell.config import load_config
from dinocell.engine.checkpoint import load_checkpoint_file
from dinocell.train.meta_arch import MultiViewDINO
from tests_tiny import TINY

REPO = Path(__file__).resolve().parents[2]
ARGS = [*TINY, "train.eval_fields=8", "train.checkpoint_every_steps=2", "data.synthetic.n_fields=64",
        "loss.gram_weight=0.5", "train.strategy=fsdp", "train.devices=2", "train.accelerator=cpu"]


def _run(out: Path, steps: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "dinocell.cli", "pretrain", "--output-dir", str(out), "--max-steps", str(steps), *ARGS]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_fsdp_two_cpu_processes_take_steps_and_checkpoint(tmp_path: Path) -> None:
    proc = _run(tmp_path, 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3
    # one full (gathered) state dict with the single-process names: exports and resumes work unchanged
    meta = MultiViewDINO(load_config(None, ARGS))
    expected = {f"meta.{k}": v.shape for k, v in meta.state_dict().items()}
    assert {k: v.shape for k, v in last["state_dict"].items()} == expected
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    sd = last["state_dict"]
    # the teacher starts as a copy of the student; after 3 optimiser steps they differ
    assert any(not torch.equal(v, sd[k.replace("meta.student.", "meta.teacher.", 1)])
               for k, v in sd.items() if k.startswith("meta.student."))
    assert last["optimizer_states"] and last["optimizer_states"][0]["state"]
    # rank 0's after-training evaluation ran on the gathered teacher (no collective left hanging)
    assert json.loads((tmp_path / "summary.json").read_text())["cross_channel_retrieval_top1"] is not None
    again = _run(tmp_path, 3)  # rerun: loads the FSDP checkpoint back into the sharded model
    assert again.returncode == 0, again.stderr[-3000:]
