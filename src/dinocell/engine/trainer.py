"""The Lightning Trainer plumbing ``pretrain`` and ``segment fit`` share: devices, precision, the periodic
checkpoint callback, the one-line setup error, the quiet fit.

Why one module: both commands promise the same engine (resume by rerunning, atomic keep-last-N
checkpoints, the same ``train.devices`` / ``train.precision`` values), which holds only while there is
one copy of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from dinocell.errors import UserError
from dinocell.runs import STEP_TEMPLATE, RunDir

log = logging.getLogger(__name__)

#: Lightning warnings that say nothing to a dinocell user (the sample stream is resumed by step, the
#: run folder is meant to be reused, single-process loaders are a choice).
_FIT_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's pytree helper, every fit
    ".*does not have many workers.*",
    ".*dataloader is not resumable.*",
    ".*ended before the epoch ended.*",
    ".*exists and is not empty.*",
    r".*module\(s\) in eval mode.*",
)


class NonFiniteLossError(UserError):
    """The loss became NaN/inf: the run stops and the last good checkpoint is kept."""


def resolve_precision(precision: str) -> str:
    """``auto``: bf16-mixed where supported, else 16-mixed on GPU, 32 on CPU."""
    if precision != "auto":
        return "32-true" if precision == "32" else precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def parse_devices(value: str) -> Any:
    """``train.devices`` as Lightning takes it: ``auto``, a count, or a device list string."""
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        return value


def quiet_lightning() -> None:
    """Lightning's banners drown the progress bar: warnings only, unless dinocell logs at DEBUG."""
    if not log.isEnabledFor(logging.DEBUG):
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)


def checkpoint_callback(run_dir: str | os.PathLike[str], every_n_steps: int) -> Any:
    """``RUN/checkpoints/stepNNNNNNNN.ckpt`` every ``every_n_steps`` plus ``last.ckpt``.

    Keep-last-N is enforced by :class:`dinocell.engine.checkpoint.AtomicCheckpointIO` (it also removes
    orphans of killed runs), so Lightning keeps everything it writes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=RunDir(run_dir).checkpoints, filename=STEP_TEMPLATE, auto_insert_metric_name=False,
                           every_n_train_steps=max(1, every_n_steps), save_last=True, save_top_k=-1,
                           enable_version_counter=False)


def _run_progress_bar() -> Any | None:
    """Lightning's rich bar titled by the run, not the epoch: a dinocell fit is one Lightning epoch with
    ``max_epochs=-1`` (so a later ``--max-steps`` continues a stopped run), which the stock bar prints as
    ``Epoch 0/-2``.  None when rich is not installed (Lightning's tqdm bar shows no maximum)."""
    try:
        from lightning.pytorch.callbacks import RichProgressBar
        from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
    except ImportError:
        return None
    if not _RICH_AVAILABLE:
        return None

    class RunProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            return "train"

    return RunProgressBar()


def build_trainer(**kwargs: Any) -> Any:
    """The Trainer; a misconfigured device/strategy/precision becomes one clear line."""
    import lightning as L

    if kwargs.get("enable_progress_bar", True) and (bar := _run_progress_bar()) is not None:
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), bar]
    try:
        return L.Trainer(**kwargs)
    except Exception as e:  # Lightning raises MisconfigurationException, ValueError, RuntimeError ...
        raise UserError(f"cannot set up the trainer: {type(e).__name__}: {e}") from None


@contextlib.contextmanager
def quiet_fit() -> Iterator[None]:
    """Around ``trainer.fit``: Lightning's warnings that do not apply to dinocell runs are dropped."""
    with warnings.catch_warnings():
        for pattern in _FIT_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        yield


__all__ = ["NonFiniteLossError", "build_trainer", "checkpoint_callback", "parse_devices", "quiet_fit",
           "quiet_lightning", "resolve_precision"]
