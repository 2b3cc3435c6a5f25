"""Gram anchoring of patch features.

DINOv3 (Siméoni et al., 2025) observes that long self-distillation runs degrade dense features: patch
similarities drift and become noisy even as global metrics improve.  Gram anchoring fixes the *pairwise
similarity structure* of the student's patches to that of an earlier, frozen "Gram teacher": the loss
is the mean squared difference between the Gram matrices of L2-normalised patch features.  Only
similarities are constrained, so the features themselves remain free to move.

The Gram matrix is T x T per image; to cap that quadratic cost we compare a random subset of at most
``max_tokens`` patch positions (the same positions for student and teacher, and for every image of the
batch, so the two matrices stay comparable entry by entry).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GramLoss", "resize_patch_tokens"]


def resize_patch_tokens(tokens: torch.Tensor, n_tokens: int, mode: str = "bicubic") -> torch.Tensor:
    """(B, N, D) patch tokens on a square grid resampled to ``n_tokens`` (a square number).

    dinov3 feeds the Gram teacher its own higher-resolution global crops (``crops.gram_teacher_crops_size``)
    and resizes its patch features back to the student's grid (``gram.global_teacher_resize_method``
    bicubic, no antialias, ``align_corners=False``) so the two Gram matrices compare entry by entry.
    """
    b, n, d = tokens.shape
    if n == n_tokens:
        return tokens
    side, side_out = math.isqrt(n), math.isqrt(n_tokens)
    if side * side != n or side_out * side_out != n_tokens:
        raise ValueError(f"resize_patch_tokens needs square grids, got {n} -> {n_tokens} tokens")
    grid = tokens.transpose(1, 2).reshape(b, d, side, side)
    out = F.interpolate(grid.float(), size=(side_out, side_out), mode=mode, align_corners=False, antialias=False)
    return out.flatten(2).transpose(1, 2).to(tokens.dtype)


class GramLoss(nn.Module):
    """MSE between per-image Gram matrices of normalised student and Gram-teacher patch features.

    Args:
        max_tokens: largest number of patches per image entering the Gram matrix (None: all).
        remove_neg: clamp negative similarities to 0 in both matrices (a DINOv3 option; off by default).
    """

    def __init__(self, max_tokens: int | None = 256, remove_neg: bool = False) -> None:
        super().__init__()
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self.max_tokens = max_tokens
        self.remove_neg = remove_neg

    def select_tokens(self, n_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Indices of the patch positions to keep (sorted), or None when all ``n_tokens`` are kept."""
        if self.max_tokens is None or n_tokens <= self.max_tokens:
            return None
        device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randperm(n_tokens, generator=generator, device=device)[: self.max_tokens]
        return idx.sort().values

    def forward(
        self,
        student_patches: torch.Tensor,
        teacher_patches: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scalar loss for (B, N, D) student and (B, N, D') frozen-teacher patch tokens.

        The teacher side is detached: the Gram teacher is frozen and never receives gradients.
        """
        if student_patches.ndim != 3 or teacher_patches.ndim != 3:
            raise ValueError(
                f"GramLoss expects (B, N, D) patch features, got {tuple(student_patches.shape)} and "
                f"{tuple(teacher_patches.shape)}"
            )
        if student_patches.shape[:2] != teacher_patches.shape[:2]:
            raise ValueError(
                f"student and teacher must have the same (B, N); got {tuple(student_patches.shape[:2])} "
                f"and {tuple(teacher_patches.shape[:2])}"
            )
        idx = self.select_tokens(student_patches.shape[1], generator)
        s = student_patches.float()
        t = teacher_patches.detach().float()
        if idx is not None:
            idx = idx.to(s.device)
            s = s.index_select(1, idx)
            t = t.index_select(1, idx)
        s = F.normalize(s, dim=-1)
        t = F.normalize(t, dim=-1)
        gram_s = s @ s.transpose(1, 2)
        gram_t = t @ t.transpose(1, 2)
        if self.remove_neg:
            gram_s = gram_s.clamp(min=0.0)
            gram_t = gram_t.clamp(min=0.0)
        return F.mse_loss(gram_s, gram_t)
