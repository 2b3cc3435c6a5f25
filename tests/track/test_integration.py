"""Tracking inside a real (tiny) ``pretrain`` run: wandb offline files, TensorBoard events, no secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinocell.config import load_config
from tests_tiny import TINY_OVERRIDES

FAKE_KEY = "fakekey0123456789abcdef0123456789abcdef"
# the shared tiny run, with a real logger and figures at every few steps
TINY = [o for o in TINY_OVERRIDES if not o.startswith(("track.logger", "data.synthetic.size", "train.eval_fields"))] + [
    "data.synthetic.size=48", "train.eval_fields=8", "track.log_interval=1",
    "track.attention_log_interval=2", "track.pca_log_interval=3", "train.checkpoint_every_steps=2",
]


@pytest.fixture
def pretrain():
    from dinocell.train import run
    return run.pretrain


@pytest.mark.slow
def test_wandb_offline_pretrain_logs_everything_and_leaks_nothing(
        pretrain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "run"
    pretrain(load_config(None, TINY + ["track.logger=wandb"]), run_dir, max_steps=3)
    out = capfd.readouterr()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    assert f"wandb sync {runs[0]}" in out.out
    data = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in ("loss/total", "loss/dino", "training/lr", "diag/teacher_entropy", "diag/student_var",
                "gradients/global_norm", "gradients/head_max", "system/cpu_rss_gb", "figures/attention",
                "figures/pca", "figures/consistency", "eval/channel_consistency"):
        assert key.encode() in data, key
    media = {p.name.split("_")[0] for p in (runs[0] / "files" / "media" / "images" / "figures").glob("*.png")}
    assert {"attention", "pca", "consistency"} <= media
    assert (run_dir / "figures" / "attention_step000002.png").is_file()

    # resumed run: same wandb id, a second offline run folder for it
    pretrain(load_config(None, TINY + ["track.logger=wandb"]), run_dir, max_steps=5, resume=True)
    out2 = capfd.readouterr()
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2

    leaks = [p for p in run_dir.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []
    assert FAKE_KEY not in out.out + out.err + out2.out + out2.err


@pytest.mark.slow
def test_tensorboard_pretrain_scalars_and_images(pretrain, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(load_config(None, TINY + ["track.logger=tensorboard"]), tmp_path, max_steps=3)
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "version_0"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/total", "diag/teacher_entropy", "gradients/global_norm", "eval/channel_consistency"} <= scalars
    assert len(acc.Scalars("loss/total")) == 3
    assert all(e.value == e.value for e in acc.Scalars("loss/total"))  # finite
    assert {"figures/attention", "figures/attention_heads", "figures/pca"} <= set(acc.Tags()["images"])
