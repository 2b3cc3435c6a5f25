"""Turn a run folder's checkpoint into a standalone teacher backbone (safetensors + JSON sidecar)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dinocell.config import config_from_dict
from dinocell.errors import UserError

TEACHER_PREFIX = "meta.teacher.backbone."


def load_run_backbone(run_or_ckpt: str | os.PathLike[str], which: str = "teacher") -> tuple[Any, Any]:
    """(backbone, config) from a run folder (``checkpoints/last.ckpt``) or a ``.ckpt`` file."""
    from dinocell.models.backbone import build_backbone
    from dinocell.train.checkpoint import CKPT_DIR, LAST, load_checkpoint_file

    p = Path(run_or_ckpt)
    ckpt_path = p / CKPT_DIR / LAST if p.is_dir() else p
    if p.is_dir() and not ckpt_path.is_file():
        raise UserError(f"no checkpoint in {p} (expected {ckpt_path})")
    ckpt = load_checkpoint_file(ckpt_path)
    meta = ckpt.get("dinocell")
    if not meta or "config" not in meta:
        raise UserError(f"{ckpt_path} is not a dinocell training checkpoint")
    cfg = config_from_dict(meta["config"])
    cfg.model.pretrained = None
    backbone = build_backbone(cfg.model, img_size=cfg.data.views.global_crop_size)
    prefix = f"meta.{which}.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise UserError(f"{ckpt_path} holds no {which} backbone weights")
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt_path}: backbone keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    backbone.eval()
    backbone.sidecar = {"channel_names": meta.get("channel_names", []),
                        "scaling": meta["config"]["data"]["scaling"]}
    return backbone, cfg


def export_run(run_or_ckpt: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the teacher backbone of a run to ``out`` (.safetensors) with its JSON sidecar."""
    from dinocell.models.backbone import save_backbone

    backbone, cfg = load_run_backbone(run_or_ckpt)
    sidecar = {
        "channel_names": backbone.sidecar.get("channel_names", []),
        "scaling": backbone.sidecar.get("scaling", {}),
        "source_run": str(run_or_ckpt),
        "views": {"global_crop_size": cfg.data.views.global_crop_size},
    }
    return Path(save_backbone(backbone, out, sidecar))
