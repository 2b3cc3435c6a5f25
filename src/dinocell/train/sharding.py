"""FSDP2 sharding of the meta-architecture and per-module gradient clipping.

DINOv3 (facebookresearch/dinov3, ``fsdp/ac_compile_parallelize.py`` and ``train/train.py``) shards every
transformer block and each top-level module (backbone, DINO head, iBOT head) with ``fully_shard`` --
the student *and* the inference-only EMA / Gram teachers, so the EMA update stays an element-wise op
on matching local shards -- and clips the gradient norm of each student module to ``optim.clip_grad``
separately.  Per-module clipping matters: the heads' gradients are far larger than the backbone's, so
one global norm would let them dictate the backbone's step size.

``torch.nn.utils.clip_grad_norm_`` is correct in every mode we run: plain tensors (one process, or DDP
after its all-reduce) and FSDP2's DTensor gradients, whose norm it reduces across the shards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["clip_grad_norm_per_module", "shard_meta"]


def _unique(modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Drop repeated modules (a shared DINO/iBOT head is clipped, and sharded, once)."""
    seen: set[int] = set()
    out: dict[str, nn.Module] = {}
    for name, m in modules.items():
        if id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out


def clip_grad_norm_per_module(modules: Mapping[str, nn.Module], max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each module's gradients to ``max_norm`` (L2) on its own; return the pre-clip norms.

    The norms are 0-d tensors on the parameters' device (no host sync here); modules without any
    gradient are skipped.  With FSDP2 every rank must call this (the norm is a collective).
    """
    norms: dict[str, torch.Tensor] = {}
    for name, module in _unique(modules).items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)  # DTensor under FSDP2
        norms[name] = full() if full is not None else norm
    return norms


def shard_meta(meta: Any, mesh: Any) -> None:
    """``fully_shard`` blocks, backbones and heads of student, EMA teacher and Gram teacher over ``mesh``.

    The meta-architecture calls ``backbone.forward_features``, not ``forward``; it is registered as an
    FSDP forward method so its parameters are gathered around it.  Every unit reshards after its
    forward, roots included (FSDP2 keeps a root gathered by default): a teacher has no backward to
    reshard it, and the EMA update needs sharded parameters on both sides.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    trees = [meta.student, meta.teacher]
    backbones = [t["backbone"] for t in trees]
    if getattr(meta, "gram_teacher", None) is not None:
        backbones.append(meta.gram_teacher)
    for backbone in backbones:
        for blk in backbone.model.blocks:
            fully_shard(blk, mesh=mesh, reshard_after_forward=True)
        fully_shard(backbone, mesh=mesh, reshard_after_forward=True)
        register_fsdp_forward_method(backbone, "forward_features")
    for tree in trees:
        for head in _unique({k: v for k, v in tree.items() if k != "backbone"}).values():
            fully_shard(head, mesh=mesh, reshard_after_forward=True)
