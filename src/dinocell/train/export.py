"""``dinocell export``: a run's teacher backbone as a standalone model.

Two formats: ``safetensors`` (default) writes ``FILE.safetensors`` + ``FILE.safetensors.json`` for
:func:`dinocell.load_backbone` / :func:`dinocell.load_model`; ``timm`` writes a folder with
``config.json`` + ``model.safetensors`` that ``timm.create_model("local-dir:DIR", pretrained=True)``
loads without dinocell (and that can be pushed to the Hugging Face Hub as is).  Both carry the
preprocessing the backbone was trained with.
"""

from __future__ import annotations

import os
from pathlib import Path

from dinocell.errors import UserError
from dinocell.paths import ensure_free_space, payload_bytes
from dinocell.provenance import provenance
from dinocell.runs import RunDir

FORMATS = ("safetensors", "timm")


def export_run(run_or_ckpt: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "safetensors") -> Path:
    """Write the teacher backbone of a run folder or ``.ckpt`` to ``out`` in format ``fmt``."""
    from dinocell.models.backbone import save_backbone
    from dinocell.models.loading import load_checkpoint_model
    from dinocell.models.timm_export import save_timm

    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    p = Path(run_or_ckpt)
    ckpt = RunDir(p).last_checkpoint if p.is_dir() else p
    if p.is_dir() and not ckpt.is_file():
        raise UserError(f"no checkpoint in {p} (expected {ckpt})")
    m = load_checkpoint_model(ckpt)
    # a full disk found before writing: one line, nothing half-written (failures later are caught by
    # the CLI, whose message names the file)
    target = Path(out) / "model.safetensors" if fmt == "timm" else Path(out)
    ensure_free_space(target, payload_bytes(m.backbone.state_dict()))
    if fmt == "timm":
        return save_timm(m.backbone, out, m.preprocess)
    pre = m.preprocess
    sidecar = {"preprocess": pre.to_dict(), "channel_names": pre.channel_names, "source_run": str(run_or_ckpt),
               **provenance()}
    return Path(save_backbone(m.backbone, out, sidecar))
