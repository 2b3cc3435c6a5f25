"""Loggers: wandb offline files, TensorBoard event files, CSV, run ids, and no leaked secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dinocell.config import load_config
from dinocell.errors import ConfigError
from dinocell.track import loggers as lg

FAKE_KEY = "fakekey0123456789abcdef0123456789abcdef"  # 40 chars, the shape of a real key


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _cfg(*overrides: str):
    return load_config(None, ["model.name=vit_small_patch16_dinov3", *overrides])


# --------------------------------------------------------------------------------------------- mode


def test_wandb_mode_offline_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "missing_netrc"))
    assert not lg.has_wandb_credentials()
    assert lg.wandb_mode() == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login u password p\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert lg.wandb_mode() == "offline"  # an entry for another host does not count
    netrc.write_text("machine api.wandb.ai login user password " + FAKE_KEY + "\n")
    assert lg.has_wandb_credentials() and lg.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert lg.wandb_mode() == "offline"  # the env var wins over credentials
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert lg.wandb_mode() == "disabled"


def test_wandb_mode_online_with_env_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "missing_netrc"))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert lg.wandb_mode() == "online"


def test_run_name_and_data_name() -> None:
    cfg = _cfg()
    assert re.fullmatch(r"vit_small_patch16_dinov3-synthetic-\d{8}-\d{6}", lg.run_name(cfg))
    assert lg.run_name(_cfg("track.name=my-run")) == "my-run"
    assert lg.data_name("s3://bucket/cpg0016/images/") == "images"
    assert lg.data_name("/data/plates/load_data.csv.gz") == "load_data"
    assert lg.data_name("/data/plates/") == "plates"


def test_redact_masks_credentials_only() -> None:
    data = {"s3": {"endpoint_url": "http://x", "secret_access_key": "abc", "token": None},
            "api_key": "k", "lr": 1e-4, "items": [{"password": "p"}]}
    out = lg.redact(data)
    assert out == {"s3": {"endpoint_url": "http://x", "secret_access_key": "***", "token": None},
                   "api_key": "***", "lr": 1e-4, "items": [{"password": "***"}]}


def test_wandb_run_id_persists_for_resume(tmp_path: Path) -> None:
    first = lg.wandb_run_id(tmp_path, resume=False)
    assert (tmp_path / "wandb_id.txt").read_text().strip() == first
    assert lg.wandb_run_id(tmp_path, resume=True) == first
    second = lg.wandb_run_id(tmp_path, resume=False)
    assert second != first and (tmp_path / "wandb_id.txt").read_text().strip() == second


def test_wandb_run_id_follows_sweep_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun7")
    assert lg.wandb_run_id(tmp_path, resume=False) != "agentrun7"  # not a sweep: ignored
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    assert lg.wandb_run_id(tmp_path, resume=True) == "agentrun7"
    assert (tmp_path / "wandb_id.txt").read_text().strip() == "agentrun7"


def test_checkpoint_upload_only_online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg("track.logger=wandb", "track.log_model_checkpoints=true", "track.entity=lab")
    offline = lg.build_logger(cfg, tmp_path, resume=False)
    assert offline._log_model is False and offline._wandb_init["mode"] == "offline"
    monkeypatch.setattr(lg, "wandb_mode", lambda: "online")
    online = lg.build_logger(cfg, tmp_path, resume=False)  # constructing does not contact the server
    assert online._log_model is True
    init = online._wandb_init
    assert init["mode"] == "online" and init["entity"] == "lab" and init["resume"] == "allow"
    assert init["id"] == (tmp_path / "wandb_id.txt").read_text().strip()
    assert init["dir"] == str(tmp_path) and init["project"] == "dinocell"


def test_none_and_invalid_logger(tmp_path: Path) -> None:
    assert lg.build_logger(_cfg("track.logger=none"), tmp_path, resume=False) is None
    cfg = _cfg()
    cfg.track.logger = "mlflow"
    with pytest.raises(ConfigError, match="track.logger"):
        lg.build_logger(cfg, tmp_path)


# --------------------------------------------------------------------------------------------- wandb


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def test_wandb_offline_run_files_hold_metrics_and_no_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "run"
    cfg = _cfg("track.logger=wandb", "track.tags=[a,b]", "track.notes=hello", "track.group=g1")
    logger = lg.build_logger(cfg, run_dir, resume=False)
    from lightning.pytorch.loggers import WandbLogger

    assert isinstance(logger, WandbLogger)
    logger.log_metrics({"loss/total": 1.25, "diag/teacher_entropy": 3.0}, step=1)
    logger.log_metrics({"loss/total": 1.0}, step=2)
    run_id = logger.experiment.id
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    sync_dir = lg.wandb_sync_dir(logger)
    lg.finalize(logger, run_dir)
    out = capfd.readouterr()
    assert f"wandb sync {sync_dir}" in out.out
    assert sync_dir is not None and sync_dir.parent == run_dir / "wandb"
    assert sync_dir.name.startswith("offline-run-") and sync_dir.name.endswith(run_id)
    data = (sync_dir / f"run-{run_id}.wandb").read_bytes()
    for key in (b"loss/total", b"diag/teacher_entropy", b"trainer/global_step"):
        assert key in data
    for value in (b"vit_small_patch16_dinov3", b"multiview", b"hello"):  # config and notes went with the run
        assert value in data
    # the API key is nowhere: not in any file of the run folder, not on the console
    leaks = [p for p, b in _all_bytes(run_dir) if FAKE_KEY.encode() in b]
    assert leaks == []
    assert FAKE_KEY not in out.out + out.err

    # resuming continues the same wandb run id
    logger2 = lg.build_logger(cfg, run_dir, resume=True)
    logger2.log_metrics({"loss/total": 0.5}, step=3)
    assert logger2.experiment.id == run_id
    lg.finalize(logger2, run_dir)
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert [p for p, b in _all_bytes(run_dir) if FAKE_KEY.encode() in b] == []


# --------------------------------------------------------------------------------------- tensorboard


def _tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_read_back_and_resume(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg("track.logger=tensorboard")
    logger = lg.build_logger(cfg, tmp_path, resume=False)
    logger.log_metrics({"loss/total": 2.0, "training/lr": 1e-4}, step=1)
    logger.log_metrics({"loss/total": 1.5}, step=2)
    lg.finalize(logger, tmp_path)
    assert "tensorboard --logdir" in capfd.readouterr().out
    log_dir = tmp_path / "tensorboard" / "version_0"
    assert log_dir.is_dir() and (log_dir / "hparams.yaml").is_file()
    s = _tb_scalars(log_dir)
    assert s["loss/total"] == [(1, 2.0), (2, 1.5)]
    assert s["training/lr"][0][1] == pytest.approx(1e-4)

    resumed = lg.build_logger(cfg, tmp_path, resume=True)
    resumed.log_metrics({"loss/total": 1.0}, step=3)
    resumed.finalize("success")
    assert Path(resumed.log_dir) == log_dir  # continues the same curves
    assert [v for _, v in _tb_scalars(log_dir)["loss/total"]] == [2.0, 1.5, 1.0]
    fresh = lg.build_logger(cfg, tmp_path, resume=False)
    assert Path(fresh.log_dir).name == "version_1"


def test_csv_logger_never_overwrites(tmp_path: Path) -> None:
    import csv

    cfg = _cfg("track.logger=csv")
    logger = lg.build_logger(cfg, tmp_path, resume=False)
    logger.log_metrics({"loss/total": 2.0}, step=0)
    lg.finalize(logger, tmp_path)
    first = tmp_path / "csv" / "version_0" / "metrics.csv"
    rows = list(csv.DictReader(first.open()))
    assert rows[0]["loss/total"] == "2.0" and rows[0]["step"] == "0"
    assert "lr" in (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    again = lg.build_logger(cfg, tmp_path, resume=True)
    again.log_metrics({"loss/total": 1.0}, step=1)
    again.finalize("success")
    assert first.is_file() and (tmp_path / "csv" / "version_1" / "metrics.csv").is_file()


def test_csv_rows_hold_each_logged_step_once(tmp_path: Path) -> None:
    """Lightning re-flushes the last on-step values after steps where nothing was logged: the CSV
    file used to repeat stale rows.  Now there is one row per logged step, with that step's values."""
    import csv

    from dinocell.train.run import pretrain
    from tests_tiny import TINY

    cfg = _cfg(*TINY, "track.logger=csv", "track.log_interval=2", "train.eval_fields=0",
               "track.attention_log_interval=0", "track.pca_log_interval=0")
    pretrain(cfg, tmp_path, max_steps=7)
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    steps = [r for r in rows if r.get("loss/total")]
    assert [int(r["step"]) for r in steps] == [0, 2, 4, 6]
    assert [float(r["training/iteration"]) for r in steps] == [0.0, 2.0, 4.0, 6.0]
    assert len({r["loss/total"] for r in steps}) == len(steps)


def test_skip_repeated_rows_keeps_real_repeats_apart(tmp_path: Path) -> None:
    calls: list[tuple[dict, int | None]] = []

    class Recorder:
        def log_metrics(self, metrics: dict, step: int | None = None) -> None:
            calls.append((dict(metrics), step))

    rec = lg.skip_repeated_rows(Recorder())
    rec.log_metrics({"a": 1.0, "it": 0.0}, step=0)
    rec.log_metrics({"a": 1.0, "it": 0.0}, step=1)  # Lightning's stale copy
    rec.log_metrics({"a": 1.0, "it": 2.0}, step=2)  # same loss, new step: kept
    rec.log_metrics({"eval/x": 0.5}, step=2)
    assert [s for _, s in calls] == [0, 2, 2]


# --------------------------------------------------------------------------------------------- sweep


def test_sweep_file_drives_pretrain_with_valid_overrides() -> None:
    import yaml

    from dinocell.cli import build_parser
    from dinocell.config import config_from_args

    repo = Path(__file__).resolve().parents[2]
    sweep = yaml.safe_load((repo / "configs" / "sweep_lr.yaml").read_text())
    assert sweep["program"] == "dinocell" and sweep["metric"]["name"].startswith("eval/")
    cmd = sweep["command"]
    assert cmd[0] == "${program}" and cmd[1] == "pretrain" and cmd[-1] == "${args_no_hyphens}"
    # expand the way `wandb agent` does: one key=value per parameter
    args = []
    for key, spec in sweep["parameters"].items():
        value = spec.get("value", (spec.get("values") or [spec.get("min")])[0])
        args.append(f"{key}={value}")
    argv = [a for a in cmd[1:-1]] + args
    argv[argv.index("configs/demo_synthetic.yaml")] = str(repo / "configs" / "demo_synthetic.yaml")
    parsed = build_parser().parse_args(argv)
    assert parsed.no_resume is True
    cfg = config_from_args(parsed)  # strict: every sweep parameter is a real config key
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.track.logger == "wandb"
