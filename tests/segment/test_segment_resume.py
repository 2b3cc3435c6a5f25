"""``segment fit`` resumes bit-exact: a run stopped at step k and rerun equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinocell.cli import main

TINY = ["data.synthetic.n_fields=4", "data.synthetic.size=32", "data.synthetic.wells_per_plate=4",
        "data.synthetic.sites_per_well=1", "data.synthetic.n_plates=1", "model.arch.embed_dim=32",
        "model.arch.depth=2", "model.arch.num_heads=2", "model.arch.patch_size=8", "model.neck_dim=16",
        "model.decoder_dim=8", "task.crop_size=32", "train.steps=5", "train.batch_size=2",
        "train.progress_bar=false", "track.logger=none", "train.precision=32", "infer.tile=32",
        "train.checkpoint_every_steps=1", "optim.warmup_steps=2"]


def _decoder(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if not k.startswith("net.backbone.")}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff == 0.0, f"max abs difference {diff}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["segment", "fit", "--output-dir", str(out), *TINY]) == 0
    return out


def test_stop_and_resume_is_bit_exact(straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["segment", "fit", "--output-dir", str(out), "--max-steps", "2", *TINY]) == 0
    stopped = _decoder(out)
    assert main(["segment", "fit", "--output-dir", str(out), *TINY]) == 0
    _assert_equal(_decoder(out), _decoder(straight))
    with pytest.raises(AssertionError):  # the comparison is not vacuous: step 2 differs from step 5
        _assert_equal(stopped, _decoder(straight))


def test_max_steps_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["segment", "fit", "--output-dir", str(tmp_path / "r"), "--max-steps", "0", *TINY]) == 2
    assert "--max-steps must be greater than 0" in capsys.readouterr().err


_PAUSE_AFTER_STEP_2 = """
import sys, time
from dinocell.cli import main
from dinocell.engine.checkpoint import AtomicCheckpointIO
save = AtomicCheckpointIO.save_checkpoint
def paused(self, checkpoint, path, storage_options=None):
    save(self, checkpoint, path, storage_options)
    if str(path).endswith("step00000002.ckpt"):
        time.sleep(300)
AtomicCheckpointIO.save_checkpoint = paused
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(straight: Path, tmp_path: Path) -> None:
    """A real ``kill -9`` after a step-2 checkpoint, then a rerun, equals the uninterrupted run."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[2] / "src"),
                                                                      os.environ.get("PYTHONPATH", "")) if p)}
    # a long schedule with the same first steps would differ (cosine horizon), so the killed run has the
    # same train.steps; it pauses after writing its step-2 checkpoint (a fast machine would otherwise finish
    # before the poll sees the file) and is killed during that pause
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_AFTER_STEP_2, "segment", "fit", "--output-dir", str(out),
                             *TINY], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "step00000002.ckpt"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not ckpt.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.fail("the run finished before it could be killed; nothing was tested")
    assert main(["segment", "fit", "--output-dir", str(out), *TINY]) == 0
    _assert_equal(_decoder(out), _decoder(straight))
