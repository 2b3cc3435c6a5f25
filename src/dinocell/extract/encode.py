"""One encoder for evaluation, profiling and extraction: ``encode_features``.

Every consumer of embeddings (demo summary, ``dinocell evaluate``, ``embed``, volume extraction) goes
through this function so pooling, eval mode and dtype handling cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

POOLS = ("cls", "mean", "patch")


def _pool(out: dict[str, torch.Tensor], pool: str, grid: tuple[int, int]) -> torch.Tensor:
    if pool == "cls":
        return out["x_norm_clstoken"]
    patches = out["x_norm_patchtokens"]
    if pool == "mean":
        return patches.mean(dim=1)
    b, _, d = patches.shape
    return patches.transpose(1, 2).reshape(b, d, grid[0], grid[1])


@torch.no_grad()
def encode_features(
    model: nn.Module,
    x: torch.Tensor,
    pool: str = "cls",
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Embed images ``x`` (N, C, H, W) in batches, without gradients, in eval mode.

    ``pool``: ``cls`` -> (N, D) normalised CLS token; ``mean`` -> (N, D) mean of normalised patch
    tokens; ``patch`` -> (N, D, H/p, W/p) patch-feature maps.  The output is on the CPU in ``dtype``
    (fp16/bf16 halve storage for large extractions).  The model's train/eval mode is restored.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    p = int(getattr(model, "patch_size", 1))
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    outs = []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device, non_blocking=True).float()
            out = model.forward_features(xb)
            outs.append(_pool(out, pool, grid).to("cpu", dtype))
    finally:
        model.train(was_training)
    if not outs:
        d = int(getattr(model, "embed_dim", 0))
        shape = (0, d) if pool != "patch" else (0, d, *grid)
        return torch.empty(shape, dtype=dtype)
    return torch.cat(outs)


def cache_features(
    loader: Iterable[Any],
    out_path: str | os.PathLike[str],
    model: nn.Module,
    pool: str = "cls",
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Encode every batch of ``loader`` (tensors, or tuples/dicts whose first/"image" item is the
    image batch) and save the stacked features to ``out_path`` (.npy), atomically."""
    feats = []
    for batch in loader:
        if isinstance(batch, dict):
            xb = batch["image"]
        elif isinstance(batch, (list, tuple)):
            xb = batch[0]
        else:
            xb = batch
        feats.append(encode_features(model, xb, pool=pool, dtype=dtype))
    arr = torch.cat(feats) if feats else torch.empty(0)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npy")
    np_arr = arr.float().numpy().astype(np.float16 if dtype == torch.float16 else np.float32)
    np.save(tmp, np_arr)
    os.replace(tmp, out)
    return out
