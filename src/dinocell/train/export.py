"""``dinocell export``: a run's teacher backbone as a standalone model folder.

One format (:mod:`dinocell.models.timm_export`): ``OUT/config.json`` + ``OUT/model.safetensors`` (+
``OUT/dinocell.safetensors``), which ``dinocell.load_model(OUT)`` and, without dinocell,
``timm.create_model("local-dir:OUT", pretrained=True)`` load (and which can be pushed to the Hugging Face
Hub as is).  It carries the preprocessing the backbone was trained with and the code that made it.
Old ``.safetensors`` + JSON sidecar exports are still read, no longer written: an ``OUT`` ending in
``.safetensors`` is refused with one line rather than quietly becoming a folder of that name.
"""

from __future__ import annotations

import os
from pathlib import Path

from dinocell.errors import UserError
from dinocell.paths import ensure_free_space, payload_bytes
from dinocell.runs import RunDir


def check_export_out(out: str | os.PathLike[str]) -> Path:
    """``out`` as an export folder: one line for a path in the old single-file format (``.safetensors``)."""
    target = Path(out)
    if target.suffix == ".safetensors":
        raise UserError(f"--out {target}: dinocell export writes a folder now (config.json + model.safetensors, "
                        f"loadable by timm); give a folder, e.g. --out {target.with_suffix('')}")
    return target


def export_run(run_or_ckpt: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the teacher backbone of a run folder or ``.ckpt`` to the export folder ``out``."""
    from dinocell.models.loading import load_checkpoint_model
    from dinocell.models.timm_export import WEIGHTS, save_timm

    target = check_export_out(out)  # before loading anything
    p = Path(run_or_ckpt)
    ckpt = RunDir(p).last_checkpoint if p.is_dir() else p
    if p.is_dir() and not ckpt.is_file():
        raise UserError(f"no checkpoint in {p} (expected {ckpt})")
    m = load_checkpoint_model(ckpt)
    # a full disk found before writing: one line, nothing half-written (failures later are caught by
    # the CLI, whose message names the file)
    ensure_free_space(target / WEIGHTS, payload_bytes(m.backbone.state_dict()))
    return save_timm(m.backbone, target, m.preprocess)
