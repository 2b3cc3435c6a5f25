"""Sinkhorn-Knopp centering of teacher outputs.

DINO (Caron et al., 2021) keeps the teacher from collapsing with an EMA centre; DINOv2 (Oquab et al.,
2023) replaces the centre with a few Sinkhorn-Knopp iterations borrowed from SwAV (Caron et al., 2020):
the teacher's soft assignments of a batch to the K prototypes are rescaled so that every prototype
receives the same total mass (1/K) and every sample the same (1/B).  That equipartition is what stops one
prototype from absorbing the whole batch.  DINOv3 (Siméoni et al., 2025) keeps it unchanged (3 steps).

The iterations only ever rescale rows and columns of ``E = exp(x)`` (x = logits / temperature), so we
keep ``Q = diag(r) E diag(c)`` as two scaling vectors and never rescale E itself, and we choose the
exponent's shift so that E cannot underflow: subtract each prototype's batch maximum, then each row's
remaining maximum (compensated in the first row scaling).  Every row and every column of E then holds
a 1 and no entry exceeds 1, so no row or column sum can vanish (whatever the logit spread: heads without weight norm included) and no
branch on the data, hence no host synchronisation, is needed.  The passes are chunked over rows and
shared: the exp pass also takes the first column sums, each later pass computes a chunk's row scaling
and immediately adds that chunk's contribution to the next column sums, and the last one writes the
targets in place.  Three iterations cost ~7 passes over the (B, K) tensor instead of ~15.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dinocell.errors import ConfigError
from dinocell.losses.chunking import row_chunks
from dinocell.losses.soft_ce import CE_MODES

__all__ = ["sinkhorn_knopp"]


def _distributed() -> bool:
    """True when a default process group with more than one rank is up (sums must cross ranks)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets (B, K) whose rows sum to 1 and whose prototypes are used equally over the batch.

    Args:
        teacher_logits: (B, K) teacher head outputs (any float dtype; computed in float32).
        teacher_temp: the teacher temperature; logits are divided by it before exponentiation.
        n_iterations: alternating prototype/sample normalisation steps (DINOv2/v3 use 3).

    Returns:
        float32 (B, K) probabilities.  Viewed as the matrix Q of DINOv2 before its final ``Q *= B``,
        each row sums to 1/B and, as ``n_iterations`` grows, each column to 1/K; we return ``B * Q``
        (the constant factors 1/B and 1/K of DINOv2's steps cancel in the scaling vectors).  Under
        ``torch.distributed`` (if initialised with >1 rank) the batch is the union of all ranks' rows:
        the column maxima and column sums are all-reduced, as in DINOv2; ranks without rows still join.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (B, K) logits, got shape {tuple(teacher_logits.shape)}")
    if not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")

    distributed = _distributed()
    logits = teacher_logits.detach()
    n, k = logits.shape
    if n == 0 and not distributed:
        return logits.new_zeros((0, k), dtype=torch.float32)
    inv_t = 1.0 / teacher_temp
    chunks = row_chunks(n, k)

    # Pass 1: each prototype's batch maximum (the column shift).
    col_max = torch.full((k,), float("-inf"), dtype=torch.float32, device=logits.device)
    for sl in chunks:
        torch.maximum(col_max, logits[sl].amax(dim=0).float(), out=col_max)
    if distributed:
        dist.all_reduce(col_max, op=dist.ReduceOp.MAX)
    col_max = torch.where(torch.isfinite(col_max), col_max, torch.zeros_like(col_max)) * inv_t

    # Pass 2: E = exp(x - col_max - a) with a the row shift, and the first column sums.  Scaling a
    # column is absorbed by the first column normalisation, scaling a row is not: that iteration
    # starts from r = exp(a) (<= 1; a row whose weight underflows had no say in the sums anyway).
    e = torch.empty((n, k), dtype=torch.float32, device=logits.device)
    col = torch.zeros(k, dtype=torch.float32, device=logits.device)
    for sl in chunks:
        z = torch.mul(logits[sl].float(), inv_t, out=e[sl])
        z.sub_(col_max)
        a = z.amax(dim=1)
        z.sub_(a.unsqueeze(1)).exp_()
        col.addmv_(z.t(), a.exp_())

    # The batch size B stays a tensor (all-reduced across ranks): it keeps the scale of r and c
    # fixed from one iteration to the next (without the 1/B, 1/K factors it drifts by B/K each time).
    n_rows = torch.tensor(float(n), device=logits.device)
    if distributed:
        dist.all_reduce(n_rows)
    # Later passes: c from the column sums, then per chunk r = 1 / (B E c) and its share of E^T r.
    for it in range(n_iterations):
        if distributed:
            dist.all_reduce(col)
        c = col.mul_(k).reciprocal_()  # every prototype gets total mass 1/K over the global batch
        last = it == n_iterations - 1
        col = torch.zeros_like(c)
        for sl in chunks:
            z = e[sl]
            if last:  # targets in place: rows of diag(r) E diag(c) sum to 1 (B * Q of DINOv2)
                z.mul_(c).div_(z.sum(dim=1, keepdim=True))
            else:
                r = z.mv(c).mul_(n_rows).reciprocal_()  # every sample total mass 1/B
                col.addmv_(z.t(), r)
    return e


class SinkhornCrossEntropy(nn.Module):
    """Shared settings of the DINO and iBOT losses: student temperature, Sinkhorn iterations and
    how the cross-entropy is computed (``ce_mode``: one of :data:`dinocell.losses.soft_ce.CE_MODES`)."""

    def __init__(self, student_temp: float = 0.1, sinkhorn_iterations: int = 3, ce_mode: str = "fused") -> None:
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if ce_mode not in CE_MODES:
            raise ConfigError(f"loss.cross_entropy must be one of {', '.join(CE_MODES)}; got {ce_mode!r}")
        self.student_temp = student_temp
        self.sinkhorn_iterations = sinkhorn_iterations
        self.ce_mode = ce_mode
