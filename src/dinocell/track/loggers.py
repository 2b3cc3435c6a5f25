"""Experiment loggers: wandb (offline unless credentials exist), TensorBoard, CSV or none.

Why offline by default: a training run must never fail or hang because a laptop or a cluster node has
no network or no wandb account.  Without an API key (no ``WANDB_API_KEY`` and no ``~/.netrc`` entry for
the wandb host) or with ``WANDB_MODE=offline`` the run is written to ``<run_dir>/wandb/offline-run-*``
and :func:`finalize` prints the ``wandb sync`` command that uploads it later.  With credentials the run
goes online (``project``/``entity``/``name``/``group``/``tags``/``notes`` from ``cfg.track``).

Resuming: the wandb run id is kept in ``<run_dir>/wandb_id.txt`` so a resumed training run continues
the same wandb run (``resume="allow"``).  TensorBoard continues in the latest ``version_N`` folder;
CSV always starts a new ``version_N`` (Lightning's CSV writer would otherwise delete the old file).

Secrets: nothing here reads, prints or logs an API key; the logged config passes through
:func:`redact`, which masks any key that looks like a credential.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.utilities import rank_zero_only

from dinocell.config import Config, to_dict
from dinocell.errors import ConfigError, require_extra
from dinocell.paths import write_text_atomic
from dinocell.runs import RunDir

log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"(api[_-]?key|secret|token|password|passwd|credential|access[_-]?key)", re.I)
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


# --------------------------------------------------------------------------------------------------
# wandb mode and credentials
# --------------------------------------------------------------------------------------------------


def _wandb_host() -> str:
    base = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    return urlparse(base).hostname or "api.wandb.ai"


def has_wandb_credentials() -> bool:
    """True when wandb could authenticate: ``WANDB_API_KEY`` or a netrc entry for the wandb host.

    Only the *presence* of a key is checked; its value is never read into a variable that is logged.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(_wandb_host())
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def wandb_mode() -> str:
    """``offline`` | ``online`` | ``disabled``: ``WANDB_MODE`` wins, else online only with credentials."""
    env = (os.environ.get("WANDB_MODE") or "").strip().lower()
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "disabled"
    return "online" if has_wandb_credentials() else "offline"


# --------------------------------------------------------------------------------------------------
# Names, ids, config
# --------------------------------------------------------------------------------------------------


def data_name(source: str) -> str:
    """A short name for a data source: ``synthetic``, a folder/file name or the last S3 prefix part."""
    s = str(source).rstrip("/")
    if s == "synthetic":
        return s
    if s.startswith("s3://"):
        parts = [p for p in s[5:].split("/") if p]
        return parts[-1] if parts else "s3"
    name = Path(s).name
    for suffix in (".csv.gz", ".parquet", ".csv", ".pq"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name or "data"


def run_name(cfg: Config, now: float | None = None) -> str:
    """``cfg.track.name`` or ``<arch>-<data>-<YYYYmmdd-HHMMSS>``."""
    if cfg.track.name:
        return cfg.track.name
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{cfg.model.name}-{data_name(cfg.data.source)}-{stamp}"


def redact(value: Any) -> Any:
    """A copy of nested config data with credential-looking keys masked (``***``)."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "", False) else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def logged_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as it is sent to loggers (redacted)."""
    return redact(to_dict(cfg))


def _new_wandb_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The wandb id of this run folder: reused from ``wandb_id.txt`` when resuming, else a new one
    (under a ``wandb agent`` the sweep's ``WANDB_RUN_ID``).

    Only rank 0 writes the file; other ranks do not create wandb runs (Lightning's loggers are
    rank-zero-only), so the id they see does not matter.
    """
    path = RunDir(run_dir).wandb_id
    agent_id = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
    if agent_id:  # a `wandb agent` child: the sweep decides the run id
        run_id = agent_id
    elif resume and path.is_file():
        text = path.read_text().strip()
        run_id = text if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text) else _new_wandb_id()
    else:
        run_id = _new_wandb_id()
    if rank_zero_only.rank == 0:
        write_text_atomic(path, run_id + "\n")
    return run_id


def _version_dirs(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = re.fullmatch(r"version_(\d+)", p.name)
        if m and p.is_dir():
            out.append(int(m.group(1)))
    return sorted(out)


# --------------------------------------------------------------------------------------------------
# Building and finishing
# --------------------------------------------------------------------------------------------------


def skip_repeated_rows(logger: Any) -> Any:
    """Make ``logger`` drop a ``log_metrics`` call that repeats the previous call's metrics exactly.

    Lightning flushes the values logged with ``self.log(on_step=True)`` after every step, and on a step
    where the module logged nothing (it logs every ``track.log_interval`` steps) it flushes the
    previous step's values again: the CSV file got a stale copy row per step, wandb and TensorBoard a
    stale point.  A real step's metrics always differ from the previous ones (``training/iteration``
    is among them), so an exact repeat is always one of these copies.
    """
    original = logger.log_metrics
    last: dict[str, Any] = {}

    def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
        current = dict(metrics)
        if current and current == last.get("metrics"):
            return
        last["metrics"] = current
        original(metrics, step=step)

    logger.log_metrics = log_metrics
    return logger


def build_logger(cfg: Config, run_dir: str | os.PathLike[str], resume: bool = False) -> Any:
    """The Lightning logger (see :func:`_build`), with stale repeated rows dropped (:func:`skip_repeated_rows`)."""
    logger = _build(cfg, run_dir, resume)
    return skip_repeated_rows(logger) if logger is not None else None


def _build(cfg: Config, run_dir: str | os.PathLike[str], resume: bool = False) -> Any:
    """The Lightning logger for ``cfg.track.logger`` writing under ``run_dir`` (``None`` for ``none``).

    * ``wandb``: :class:`~lightning.pytorch.loggers.WandbLogger`, files in ``run_dir/wandb/``;
      offline/online per :func:`wandb_mode`; id persisted in ``run_dir/wandb_id.txt``.
    * ``tensorboard``: ``run_dir/tensorboard/version_N`` (resume continues the latest N).
    * ``csv``: ``run_dir/csv/version_N/metrics.csv`` (always a new N).
    The redacted resolved config is logged as hyper-parameters.
    """
    kind = cfg.track.logger
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if kind == "none":
        return None
    params = logged_config(cfg)
    if kind == "wandb":
        require_extra("wandb", ("wandb",), "track.logger=wandb")
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode()
        t = cfg.track
        kwargs: dict[str, Any] = {
            "name": run_name(cfg),
            "save_dir": str(run),
            "id": wandb_run_id(run, resume),
            "project": t.project,
            "mode": mode,
            "config": params,
            "resume": "allow",
        }
        if t.entity:
            kwargs["entity"] = t.entity
        if t.group:
            kwargs["group"] = t.group
        if t.tags:
            kwargs["tags"] = list(t.tags)
        if t.notes:
            kwargs["notes"] = t.notes
        # Checkpoint artifacts need a server; offline they are left in run_dir/checkpoints.
        log_model = bool(t.log_model_checkpoints) and mode == "online"
        if t.log_model_checkpoints and not log_model:
            log.warning("track.log_model_checkpoints: wandb is %s, so checkpoints are not uploaded "
                        "(they stay in %s)", mode, RunDir(run).checkpoints)
        logger = WandbLogger(log_model=log_model, **kwargs)
        if logger._wandb_init.get("anonymous") is None:  # Lightning passes anonymous=None; wandb warns
            logger._wandb_init.pop("anonymous", None)
        return logger
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        versions = _version_dirs(RunDir(run).logger_dir(kind))
        version = versions[-1] if (resume and versions) else (versions[-1] + 1 if versions else 0)
        logger = TensorBoardLogger(save_dir=str(run), name=kind, version=version,
                                   default_hp_metric=False)
        logger.log_hyperparams(_flatten(params))
        return logger
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        versions = _version_dirs(RunDir(run).logger_dir(kind))
        logger = CSVLogger(save_dir=str(run), name=kind, version=(versions[-1] + 1 if versions else 0))
        logger.log_hyperparams(params)
        return logger
    raise ConfigError(f"config key 'track.logger' must be one of wandb, tensorboard, csv, none; got '{kind}'")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b": v}`` with lists as strings (TensorBoard hparams take scalars only)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (list, tuple)) or v is None:
            out[key] = str(v)
        else:
            out[key] = v
    return out


def wandb_sync_dir(logger: Any) -> Path | None:
    """The local folder of a wandb logger's run (``.../wandb/offline-run-*``), if it was started."""
    exp = getattr(logger, "_experiment", None)
    if exp is None:
        return None
    settings = getattr(exp, "settings", None)
    sync = getattr(settings, "sync_dir", None)
    if sync:
        return Path(sync)
    d = getattr(exp, "dir", None)
    return Path(d).parent if d else None


@rank_zero_only
def finalize(logger: Any, run_dir: str | os.PathLike[str]) -> None:
    """Close the logger and tell the user where the logs are (``wandb sync <dir>`` for offline runs)."""
    if logger is None:
        return
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        exp = getattr(logger, "_experiment", None)
        if exp is None:
            return
        offline = bool(getattr(exp, "offline", False)) or getattr(exp.settings, "mode", "") in ("offline", "dryrun")
        sync_dir = wandb_sync_dir(logger)
        exp.finish()
        logger._experiment = None
        import wandb

        if wandb.run is None:
            # wandb 0.31: finish() can return before the service has flushed the offline .wandb file
            # (seen in ~1 of 4 runs); tearing the service down waits for it.
            wandb.teardown()
        if offline and sync_dir is not None:
            print(f"wandb: offline run saved in {sync_dir}\nwandb: upload it with:  wandb sync {sync_dir}")
        return
    if isinstance(logger, TensorBoardLogger):
        logger.finalize("success")
        print(f"tensorboard logs: tensorboard --logdir {logger.log_dir}")
        return
    if isinstance(logger, CSVLogger):
        logger.finalize("success")
        print(f"metrics: {Path(logger.log_dir) / 'metrics.csv'}")


__all__ = [
    "build_logger",
    "finalize",
    "has_wandb_credentials",
    "logged_config",
    "redact",
    "run_name",
    "wandb_mode",
    "wandb_run_id",
]
