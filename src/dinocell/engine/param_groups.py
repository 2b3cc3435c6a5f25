"""AdamW parameter groups for a ViT backbone: layer-wise lr decay, patch-embed lr multiplier and dinov3's
weight-decay rule, for pretraining and for fine-tuning a segmenter alike.

Why here and not in ``train``: ``segment fit`` fine-tunes the same backbone with the same layer-wise
decay; both callers hand over ``(name, parameter)`` pairs, so neither needs the other's model classes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

# dinov3 ``train/param_groups.py``: no weight decay on names ending in ``bias`` or containing ``norm``, ``gamma``
# (LayerScale) or ``fourier_w``; everything else decays -- the CLS, register (storage) and mask tokens included.
_NO_DECAY_SUBSTRINGS = ("norm", "gamma", "fourier_w")

# Top-level names a backbone parameter may start with (after the timm ``model.`` prefix).  Anything else
# (e.g. ``_orig_mod.`` from wrapping the backbone in torch.compile) would silently fall into the last
# layer-decay bucket, so param_groups refuses it.
_BACKBONE_PREFIXES = ("blocks.", "patch_embed.", "cls_token", "reg_token", "mask_token", "pos_embed", "norm_pre.",
                      "norm.", "fc_norm.", "head.")


def no_weight_decay(name: str) -> bool:
    """dinov3's rule for a parameter name (tokens *are* decayed, unlike DINOv2-era code)."""
    return name.endswith("bias") or any(k in name for k in _NO_DECAY_SUBSTRINGS)


def _backbone_layer_id(backbone: torch.nn.Module, sub: str) -> int:
    """``backbone.layer_id(sub)``, after checking the name is one the layer-wise decay knows."""
    bare = sub.removeprefix("model.")
    if not bare.startswith(_BACKBONE_PREFIXES):
        raise AssertionError(f"backbone parameter {sub!r} has no layer id for layer-wise lr decay (a wrapper "
                             "renamed it? compile blocks in place with MultiViewDINO.compile_blocks)")
    return backbone.layer_id(sub)


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], backbone: Any, layerwise_decay: float,
                 patch_embed_lr_mult: float, prefix: str = "backbone.") -> list[dict[str, Any]]:
    """AdamW groups for ``named`` parameters, the caller's selection (e.g. those requiring grad).

    Names starting with ``prefix`` belong to ``backbone`` (a :class:`dinocell.models.backbone.DinoBackbone`:
    ``n_blocks``, ``layer_id``): lr x ``layerwise_decay ** (n_layers - layer_id)``, patch embedding x
    ``patch_embed_lr_mult``.  Other parameters get lr x1.  Weight decay follows :func:`no_weight_decay`.
    Each group carries ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer`` (the DINO prototypes, frozen
    early) and ``is_backbone``; ``lr`` and ``weight_decay`` start at 0 and are set every step by the
    caller's schedule.  Groups come in the order their first parameter does (optimizer states of earlier
    checkpoints stay aligned)."""
    n_layers = backbone.n_blocks + 1
    groups: dict[tuple[float, float, bool, bool], list[torch.Tensor]] = defaultdict(list)
    for name, p in named:
        is_backbone = name.startswith(prefix)
        if is_backbone:
            sub = name[len(prefix):]
            lr_mult = layerwise_decay ** (n_layers - _backbone_layer_id(backbone, sub))
            if "patch_embed" in sub:
                lr_mult *= patch_embed_lr_mult
        else:
            lr_mult = 1.0
        is_last = "last_layer" in name
        groups[(lr_mult, 0.0 if no_weight_decay(name) else 1.0, is_last, is_backbone)].append(p)
    return [
        {"params": ps, "lr_multiplier": lm, "wd_multiplier": wm, "is_last_layer": last, "is_backbone": bb,
         "lr": 0.0, "weight_decay": 0.0}
        for (lm, wm, last, bb), ps in groups.items()
    ]


__all__ = ["no_weight_decay", "param_groups"]
