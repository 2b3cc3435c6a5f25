from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dinocell.cli import main
from dinocell.config import load_config
from dinocell.engine.checkpoint import load_checkpoint_file
from dinocell.errors import UserError
from dinocell.train.run import pretrain
from tests_tiny import TINY


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, TINY + ["train.checkpoint_every_steps=2", "train.keep_last_n=2", "train.eval_fields=48"])
    summary = pretrain(cfg, run, max_steps=5)
    return run, summary


def test_run_folder_contents(tiny_run: tuple[Path, dict]) -> None:
    run, summary = tiny_run
    assert (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml").model.depth == 2  # the resolved config round-trips
    ck = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ck and len([c for c in ck if c.startswith("step")]) == 2  # keep-last-N
    state = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 5
    assert any(k.startswith("meta.teacher.backbone.") for k in state["state_dict"])
    assert state["optimizer_states"] and "rng" in state["dinocell"]
    data = json.loads((run / "summary.json").read_text())
    for key in ("loss_first", "loss_last", "channel_consistency_before", "channel_consistency_after",
                "channel_consistency_raw_before", "cross_channel_retrieval_top1", "transfer_knn_accuracy"):
        assert key in data and data[key] is not None, key
    # evaluation reads only held-out wells, recorded with the run
    wells = (run / "holdout.txt").read_text().split()
    assert data["heldout_fields"] > 0 and data["heldout_wells"] == len(wells)
    # run outputs go to summary.json; config.yaml stays the resolved input config
    assert set(yaml.safe_load((run / "config.yaml").read_text())["data"]["holdout"]) == {"fraction", "wells", "salt"}
    assert data["skipped_fields"] == 0 and data["eval_fields"] <= data["heldout_fields"]
    assert data == json.loads(json.dumps(summary))
    assert not list(run.rglob("*.tmp"))
    # dense figures and the forgetting guard (track.reference=heldout by default: step 0 and the end)
    for key in ("patch_consistency_before", "patch_consistency_after", "patch_retrieval_top1_after",
                "knn_accuracy_after"):
        assert data[key] is not None, key
    assert 0 <= data["patch_retrieval_top1_after"] <= 1 and data["patch_chance"] == 1 / 16
    assert data["reference"] == "heldout" and data["reference_steps"] == [0, 5]
    assert data["reference_min"] <= data["reference_start"] and data["reference_min"] <= data["reference_end"]
    # every run says what code made it and which channel map it used (synthetic: named by the source)
    from dinocell import __version__
    from dinocell.config import config_record

    record = config_record(run / "config.yaml")
    assert record["dinocell_version"] == data["dinocell_version"] == __version__
    assert record["git_commit"] == data["git_commit"] and data["git_commit"]
    assert record["channel_map_origin"] == data["channel_map_origin"] == "named_by_source"


def test_rerun_resumes_and_is_a_noop_when_done(tiny_run: tuple[Path, dict]) -> None:
    run, _ = tiny_run
    before = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["state_dict"]
    # what runs killed mid-write leave behind: old steps, a temp file, Lightning's versioned copies
    for orphan in ("step00000001.ckpt", "step00000003.ckpt.tmp", "step00000004-v1.ckpt", "last-v1.ckpt"):
        (run / "checkpoints" / orphan).write_bytes(b"partial")
    held = (run / "holdout.txt").read_text()
    pretrain(load_config(run / "config.yaml"), run, max_steps=5)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step00000002.ckpt", "step00000004.ckpt"]  # keep_last_n=2 by step
    assert (run / "holdout.txt").read_text() == held  # decided once per run
    after = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 5
    assert all(torch.equal(before[k], after["state_dict"][k]) for k in before)


def test_resume_reuses_the_recorded_heldout_wells(tmp_path: Path) -> None:
    """The held-out wells are read back from the run record (holdout.txt), not re-decided from the
    config: a resumed run with another data.holdout rule still holds out the same wells."""
    base = TINY + ["train.eval_fields=0", "track.reference=none"]
    first = pretrain(load_config(None, [*base, "data.holdout.wells=[SYNTH-P01/A01]"]), tmp_path, max_steps=1)
    assert (tmp_path / "holdout.txt").read_text().split() == ["SYNTH-P01/A01"] and first["heldout_wells"] == 1
    again = pretrain(load_config(None, [*base, "data.holdout.wells=[SYNTH-P02/A02,SYNTH-P01/A02]"]), tmp_path,
                     max_steps=2)
    assert (tmp_path / "holdout.txt").read_text().split() == ["SYNTH-P01/A01"]
    assert again["heldout_wells"] == 1 and again["heldout_fields"] == first["heldout_fields"] == 4


def test_export_and_load_backbone(tiny_run: tuple[Path, dict], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import dinocell

    run, _ = tiny_run
    out = tmp_path / "teacher"
    assert main(["export", str(run), "--out", str(out)]) == 0
    conf = json.loads((out / "config.json").read_text())
    notes = dict(n.split("=", 1) for n in conf["pretrained_cfg"]["notes"])
    assert json.loads(notes["dinocell_preprocess"])["channel_names"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert conf["model_args"]["patch_size"] == 8 and conf["model_args"]["in_chans"] == 1
    made = json.loads(notes["dinocell_provenance"])
    assert made["dinocell_version"] == dinocell.__version__ and made["git_commit"]  # the code that made it
    model = dinocell.load_backbone(str(out))
    state = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["state_dict"]
    teacher = {k[len("meta.teacher.backbone."):]: v for k, v in state.items()
               if k.startswith("meta.teacher.backbone.")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    assert not model.training
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 32)


def test_other_architecture_lists_keys(tiny_run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = tiny_run
    argv = ["pretrain", "--output-dir", str(run), "--max-steps", "6", *TINY, "model.depth=3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not match this model's architecture" in err and "blocks.2" in err
    assert "model.depth=2 -> 3" in err  # the config keys that differ
    assert len(err.strip().splitlines()) == 1


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "last.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint_file(bad)
    assert not marker.exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinocell.train.meta_arch import MultiViewDINO

    original = MultiViewDINO.forward
    calls = {"n": 0}

    def poisoned(self, batch, teacher_temp, gram_generator=None):
        out = original(self, batch, teacher_temp, gram_generator)
        calls["n"] += 1
        if calls["n"] == 4:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(MultiViewDINO, "forward", poisoned)
    cfg = load_config(None, TINY + ["train.checkpoint_every_steps=1"])
    with pytest.raises(UserError, match="loss is nan at step 3"):
        pretrain(cfg, tmp_path, max_steps=6)
    last = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def _train_cmd(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "dinocell.cli", "pretrain", "--output-dir", str(out), "--max-steps", str(steps),
            *TINY, "train.checkpoint_every_steps=3", "train.eval_fields=0", "model.embed_dim=64",
            "data.batch_size=8", "data.synthetic.n_fields=64"]


def _teacher(path: Path) -> dict[str, torch.Tensor]:
    sd = load_checkpoint_file(path)
    return {k: v for k, v in sd["state_dict"].items() if k.startswith("meta.teacher.")}, sd["global_step"]


@pytest.mark.slow  # three trainings in subprocesses
def test_sigkill_resume_matches_uninterrupted(tmp_path: Path) -> None:
    steps = 30
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, steps), check=True, env=env, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, killed_at = _teacher(last)
    assert 0 < killed_at < steps, "the run must have been killed mid-way"

    subprocess.run(_train_cmd(run, steps), check=True, env=env, capture_output=True, timeout=600)
    resumed, step = _teacher(last)
    expected, ref_step = _teacher(ref / "checkpoints" / "last.ckpt")
    assert step == ref_step == steps
    for k, v in expected.items():
        assert torch.equal(resumed[k], v), k


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    """Lightning DDP (gloo, 2 CPU processes): ranks read disjoint samples, Sinkhorn sums are all-reduced,
    and rank 0 writes the checkpoint and summary."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    cmd = [*_train_cmd(tmp_path, 4), "train.strategy=ddp", "train.devices=2", "train.accelerator=cpu",
           "train.eval_fields=16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4


def test_uniform_teacher_is_reported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A tiny random head at teacher temperature 0.2 gives uniform Sinkhorn targets: the run says so
    (once, at the check step) instead of silently training on a loss that cannot move."""
    cfg = load_config(None, TINY + ["loss.teacher_temp=0.2", "loss.warmup_teacher_temp=0.2", "train.eval_fields=0"])
    with caplog.at_level("WARNING", logger="dinocell.train.module"):
        pretrain(cfg, tmp_path, max_steps=22)
    msgs = [r.getMessage() for r in caplog.records if "teacher targets are still uniform" in r.getMessage()]
    assert len(msgs) == 1 and "at step 20" in msgs[0]


def test_max_steps_stops_early_without_changing_the_horizon(tmp_path: Path) -> None:
    from dinocell.train import schedules as sched

    cfg = load_config(None, TINY + ["train.epochs=3", "train.eval_fields=0", "optim.warmup_epochs=1",
                                    "optim.lr=0.01", "optim.layerwise_decay=1.0", "optim.patch_embed_lr_mult=1.0"])
    pretrain(cfg, tmp_path, max_steps=4)
    ckpt = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    n_train = json.loads((tmp_path / "summary.json").read_text())["heldout_fields"]
    spe = (16 - n_train) // 4
    full = sched.from_config(cfg.optim, cfg.loss, spe, 3, 4)  # the horizon of the whole run
    lrs = {g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"] if not g.get("is_last_layer")}
    short = sched.from_config(cfg.optim, cfg.loss, spe, 3, 4, max_steps=4)  # what max_steps used to do
    assert full.total_steps == 3 * spe > 4 and full.at(3)["lr"] != pytest.approx(short.at(3)["lr"])
    assert lrs and all(lr == pytest.approx(full.at(3)["lr"]) for lr in lrs)
    history = ckpt["dinocell"]["loss_history"]
    assert history["count"] == 4 and len(history["tail"]) == 4


def test_epoch_longer_than_the_data_trains(tmp_path: Path) -> None:
    """train.steps_per_epoch beyond one pass over the fields used to hang forever."""
    cfg = load_config(None, TINY + ["train.steps_per_epoch=16", "train.eval_fields=0"])
    pretrain(cfg, tmp_path, max_steps=5)
    assert load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5


def _jump_folder(root: Path, n_fields: int) -> list[Path]:
    from dinocell.data.synthetic import write_jump_folder

    return [Path(p) for p in write_jump_folder(root, n_fields=n_fields, size=64, seed=0, n_plates=1)]


def test_skipped_fields_are_counted_in_the_summary(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tiffs = sorted(p for p in _jump_folder(data, 12) if p.suffix == ".tiff")
    tiffs[0].write_bytes(b"not a tiff")  # one field becomes unreadable
    cfg = load_config(None, TINY + [f"data.source={data}", "data.batch_size=2", "train.eval_fields=4"])
    summary = pretrain(cfg, tmp_path / "run", max_steps=2)
    assert summary["skipped_fields"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_fields"] == 1


def test_every_field_unreadable_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for p in _jump_folder(data, 2):
        if p.suffix == ".tiff":
            p.write_bytes(b"broken")
    assert main(["pretrain", "--output-dir", str(tmp_path / "run"), "--max-steps", "2", *TINY,
                 f"data.source={data}"]) == 2
    err = capsys.readouterr().err
    assert "no readable field" in err and len(err.strip().splitlines()) == 1


def test_a_later_max_steps_continues_a_stopped_run(tmp_path: Path) -> None:
    """``--max-steps 2`` then ``--max-steps 4`` trains steps 3-4 (it used to find the fit finished and train
    nothing) and equals one invocation stopped at step 4; a rerun without a limit finishes the schedule."""
    over = TINY + ["train.eval_fields=0", "track.reference=none", "train.checkpoint_every_steps=1"]
    pretrain(load_config(None, over), tmp_path / "a", max_steps=2)
    pretrain(load_config(None, over), tmp_path / "a", max_steps=4)
    pretrain(load_config(None, over), tmp_path / "b", max_steps=4)
    a, b = (load_checkpoint_file(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("a", "b"))
    assert a["global_step"] == b["global_step"] == 4
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k
    summary = pretrain(load_config(None, over), tmp_path / "a")
    last = load_checkpoint_file(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == summary["steps"] > 4
