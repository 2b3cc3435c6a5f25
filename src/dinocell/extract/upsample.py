"""Upsample patch-grid features (or logits) to voxels on the model's device, inside a training step.

Why not upsample at extraction time: per-voxel float16 features of a ViT-S are 768 bytes per voxel
(1.6 GB per 128^3 volume), so loading them costs about as much as recomputing them.  The patch store
keeps the ViT's grid (256x smaller for patch 16) and the training loop upsamples on the GPU, where
trilinear interpolation of a batch is a few milliseconds — or upsamples only the logits of a small
head, which is cheaper still.

Trilinear with ``align_corners=False`` on the patch store's ``(C, D, H/p, W/p)`` features gives the
same values as the voxel store's per-slice bilinear upsampling (the depth axis is not resampled).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinocell.errors import ConfigError

MODES = ("trilinear", "nearest")


class Upsample(nn.Module):
    """``(B, C, d, h, w)`` or ``(C, d, h, w)`` -> same layout at ``size`` = (D, H, W) voxels.

    No parameters: it runs wherever its input is (move the batch to the GPU first).  ``trilinear``
    for features / logits, ``nearest`` for labels or masks (exact for any dtype: it gathers, it
    does not interpolate).  Half-precision input on the CPU is computed in float32 and cast back.
    """

    def __init__(self, size: Sequence[int], mode: str = "trilinear") -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"Upsample mode must be one of {', '.join(MODES)}; got '{mode}'")
        if len(size) != 3 or min(int(s) for s in size) < 1:
            raise ConfigError(f"Upsample size needs 3 positive sides (D, H, W); got {list(size)}")
        self.size = tuple(int(s) for s in size)
        self.mode = mode

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], mode: str = "trilinear") -> Upsample:
        """Upsample to the volume shape recorded in a volume's metadata (gt/mask resolution)."""
        grid = meta.get("grid")
        size = grid["volume_shape"] if grid else meta["shapes"]["mask"][1:]
        return cls(size, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 4
        if unbatched:
            x = x[None]
        if x.dim() != 5:
            raise ValueError(f"Upsample expects (B, C, d, h, w) or (C, d, h, w); got shape {tuple(x.shape)}")
        if tuple(x.shape[2:]) == self.size:
            out = x
        elif self.mode == "nearest":
            out = _nearest(x, self.size)
        else:
            if not x.is_floating_point():
                raise ValueError("trilinear upsampling needs floating-point input; use mode='nearest' for labels")
            dtype = x.dtype
            if x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            out = F.interpolate(x, size=self.size, mode="trilinear", align_corners=False).to(dtype)
        return out[0] if unbatched else out

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}"


def _nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize by gathering (``F.interpolate(mode="nearest")``'s source indices).

    Gathering keeps integer ids exact (interpolate would route them through float32).
    """
    for axis, n_out in zip((2, 3, 4), size, strict=True):
        n_in = x.shape[axis]
        if n_in != n_out:
            idx = (torch.arange(n_out, device=x.device) * (n_in / n_out)).floor().long().clamp(max=n_in - 1)
            x = x.index_select(axis, idx)
    return x
