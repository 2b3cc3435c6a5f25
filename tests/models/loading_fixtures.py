"""A fake run folder (config + Lightning-style checkpoint with a random teacher) for loader/export tests.

A plain module (not conftest) so test files import it by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dinocell.config import Config, load_config, save_config, to_dict

TINY_MODEL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
              "data.views.global_crop_size=32", "data.scaling.low_percentile=1.0",
              "data.scaling.high_percentile=99.0"]
CHANNELS = ["DNA", "ER", "RNA"]


def fake_run(root: Path, seed: int = 3, extra: list[str] | tuple[str, ...] = ()) -> tuple[Path, Config, torch.nn.Module]:
    """``root/run`` with ``config.yaml`` and ``checkpoints/last.ckpt``; returns (run, cfg, teacher).

    ``extra``: more ``key=value`` settings of the training config (e.g. its data section)."""
    from dinocell.models.backbone import build_backbone

    cfg = load_config(None, [*TINY_MODEL, *extra])
    run = root / "run"
    save_config(cfg, run)
    torch.manual_seed(seed)
    teacher = build_backbone(cfg.model, img_size=32).eval()
    with torch.no_grad():  # not the zero-init LayerScale: every block must matter
        for blk in teacher.model.blocks:
            blk.gamma_1.fill_(0.5)
            blk.gamma_2.fill_(0.5)
    student = build_backbone(cfg.model, img_size=32)
    state = {f"meta.teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"meta.student.backbone.{k}": v for k, v in student.state_dict().items()})
    state["meta.teacher.dino_head.w"] = torch.zeros(2)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": state, "dinocell": {"config": to_dict(cfg), "channel_names": CHANNELS}},
               run / "checkpoints" / "last.ckpt")
    return run, cfg, teacher


def write_old_export(backbone: torch.nn.Module, path: Path, sidecar: dict | None = None) -> Path:
    """An export in the retired single-file format (``FILE.safetensors`` + ``FILE.safetensors.json``), written
    here byte for byte as dinocell wrote it before the folder became the one format: dinocell still reads
    these, and no code in ``src`` writes them any more."""
    import json

    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
    if backbone.model.rope is not None:
        tensors["rope_periods"] = backbone.model.rope.periods.detach().float().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "dinocell-backbone"})
    meta = {"format": "dinocell-backbone", "format_version": 1, "model": dict(backbone.arch), **(sidecar or {})}
    Path(f"{path}.json").write_text(json.dumps(meta, indent=2))
    return path
