"""The run-folder layout: the one place that knows where a run keeps its files.

A shared leaf (like :mod:`dinocell.paths`): ``models.loading`` reads run folders, ``train`` and ``segment``
write them, ``evaluate`` / ``track`` / ``data.holdout`` add to them; all of them ask :class:`RunDir`
instead of spelling ``checkpoints/last.ckpt`` themselves, so the layout can change in one file::

    RUN/
      config.yaml            resolved config (+ provenance header)          RunDir.config
      summary.json           what the run measured                          RunDir.summary
      holdout.txt            held-out wells, decided once per folder        RunDir.holdout
      eval_before.json       pretrain's before-training figures (cache)     RunDir.eval_before
      reference.json         the forgetting guard's figures                 RunDir.reference
      checkpoints/           last.ckpt + stepNNNNNNNN.ckpt (keep-last-N)     RunDir.checkpoints
      export/NAME/           export folders (old *.safetensors: read too)   RunDir.exports()
      eval/                  ``dinocell evaluate`` output                   RunDir.eval_dir
      figures/               diagnostic figures                             RunDir.figures
      wandb_id.txt, wandb/, tensorboard/, csv/                               logger files

Pure path arithmetic: nothing here reads or writes files except the ``exports`` listing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
SUMMARY = "summary.json"
HOLDOUT = "holdout.txt"
EVAL_BEFORE = "eval_before.json"
REFERENCE = "reference.json"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
#: Lightning ``ModelCheckpoint`` filename template of the periodic checkpoints (``.ckpt`` is appended).
STEP_TEMPLATE = "step{step:08d}"
#: A periodic checkpoint's file name; group 1 is the step.
STEP_NAME = re.compile(r"step(\d+)\.ckpt")
EXPORT = "export"
#: An export folder's completion marker (written last, :mod:`dinocell.models.timm_export`).
EXPORT_MARKER = "config.json"
#: Exports written before the folder format: ``export/NAME.safetensors`` + ``.json`` sidecar (read only).
OLD_EXPORT_SUFFIX = ".safetensors"
EVAL = "eval"
FIGURES = "figures"
WANDB_ID = "wandb_id.txt"
#: Sub-folders a file may sit in inside a run folder (``RUN/checkpoints/last.ckpt``, ``RUN/export/NAME``).
_FILE_FOLDERS = (CHECKPOINTS, EXPORT)


@dataclass(frozen=True)
class RunDir:
    """A run folder (``dinocell pretrain`` or ``dinocell segment fit`` output) and the paths inside it."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_file(cls, path: str | os.PathLike[str]) -> RunDir | None:
        """The run folder owning ``path`` (a file or export folder) when it sits in a run's ``checkpoints/`` or
        ``export/``, else None."""
        p = Path(path)
        return cls(p.parent.parent) if p.parent.name in _FILE_FOLDERS else None

    # ------------------------------------------------------------------ files
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def holdout(self) -> Path:
        return self.root / HOLDOUT

    @property
    def eval_before(self) -> Path:
        return self.root / EVAL_BEFORE

    @property
    def reference(self) -> Path:
        return self.root / REFERENCE

    @property
    def wandb_id(self) -> Path:
        return self.root / WANDB_ID

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.root / CHECKPOINTS / LAST

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{STEP_TEMPLATE.format(step=int(step))}.ckpt"

    # ------------------------------------------------------------------ folders
    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT

    def exports(self) -> list[Path]:
        """Complete export folders ``export/NAME/`` and old ``export/*.safetensors`` files, oldest first
        (the newest is what a run folder loads as; a folder's age is its ``config.json``'s)."""
        folders = list(self.export_dir.glob(f"*/{EXPORT_MARKER}"))
        old = list(self.export_dir.glob(f"*{OLD_EXPORT_SUFFIX}"))
        found = [(q.stat().st_mtime, q.parent) for q in folders] + [(q.stat().st_mtime, q) for q in old if q.is_file()]
        return [q for _, q in sorted(found, key=lambda t: t[0])]

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL

    @property
    def figures(self) -> Path:
        return self.root / FIGURES

    def logger_dir(self, kind: str) -> Path:
        """Where the ``kind`` logger (``wandb``, ``tensorboard``, ``csv``) writes."""
        return self.root / kind


__all__ = ["CHECKPOINTS", "CONFIG", "EVAL", "EXPORT", "LAST", "RunDir", "STEP_NAME", "STEP_TEMPLATE", "SUMMARY"]
