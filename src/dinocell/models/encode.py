"""One encoder for evaluation, profiling and extraction: ``encode_features``.

Every consumer of embeddings (demo summary, ``dinocell evaluate``, ``embed``, volume extraction) goes
through this function so pooling, eval mode and dtype handling cannot drift apart.  It lives in
``models`` (not ``extract``) because evaluation and extraction both sit above it.
"""

from __future__ import annotations

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


__all__ = ["POOLS", "encode_features"]
