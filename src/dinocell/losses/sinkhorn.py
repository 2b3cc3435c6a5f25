"""Sinkhorn-Knopp centering of teacher outputs.

DINO (Caron et al., 2021) keeps the teacher from collapsing with an EMA centre; DINOv2 (Oquab et al.,
2023) replaces the centre with a few Sinkhorn-Knopp iterations borrowed from SwAV (Caron et al., 2020):
the teacher's soft assignments of a batch to the K prototypes are rescaled so that every prototype
receives the same total mass (1/K) and every sample the same (1/B).  That equipartition is what stops one
prototype from absorbing the whole batch.  DINOv3 (Siméoni et al., 2025) keeps it unchanged (3 steps).

Two paths with the same arithmetic as DINOv2's ``exp`` version.  When the logit spread is small enough
that ``exp(x - max)`` cannot underflow (always, for cosine logits at the usual temperatures), one exp is
taken and the iterations only update row and column scaling vectors (two matrix-vector products each).
Otherwise the iterations run in the log domain, where ``logsumexp`` cannot underflow to an all-zero
prototype, which would turn the next division into NaN.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["sinkhorn_knopp"]


#: Largest logit spread (after dividing by the temperature) for which exp(x - max) stays well above
#: float32's smallest normal number (exp(-80) ~ 1.8e-35 > 1.2e-38), so no column can vanish.
_EXP_SAFE_SPREAD = 80.0


def _distributed() -> bool:
    """True when a default process group with more than one rank is up (sums must cross ranks)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _batch_logsumexp(x: torch.Tensor, distributed: bool) -> torch.Tensor:
    """``log(sum_b exp(x[b, k]))`` over the (global) batch, for each prototype k -> (K,).

    Ranks with no rows still take part in both all-reduces so that collectives never go out of step.
    """
    if x.shape[0] > 0:
        m = x.amax(dim=0)
    else:
        m = torch.full((x.shape[1],), float("-inf"), dtype=x.dtype, device=x.device)
    if distributed:
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=0)
    if distributed:
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets (B, K) whose rows sum to 1 and whose prototypes are used equally over the batch.

    Args:
        teacher_logits: (B, K) teacher head outputs (any float dtype; computed in float32).
        teacher_temp: the teacher temperature; logits are divided by it before exponentiation.
        n_iterations: alternating prototype/sample normalisation steps (DINOv2/v3 use 3).

    Returns:
        float32 (B, K) probabilities.  Viewed as the matrix Q of DINOv2 before its final ``Q *= B``,
        each row sums to 1/B and, as ``n_iterations`` grows, each column to 1/K; we return ``B * Q``.
        Under ``torch.distributed`` (if initialised with >1 rank) the batch is the union of all ranks'
        rows: column sums and B are all-reduced, exactly as in DINOv2.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (B, K) logits, got shape {tuple(teacher_logits.shape)}")
    if not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")

    distributed = _distributed()
    x = teacher_logits.detach().float() / teacher_temp  # log of the unnormalised Q (as B x K)
    n_rows = torch.tensor(float(x.shape[0]), device=x.device)
    if distributed:
        dist.all_reduce(n_rows, op=dist.ReduceOp.SUM)
    total_rows = int(n_rows.item())
    if total_rows == 0:  # nothing to centre anywhere (e.g. no masked patch on any rank)
        return x.new_zeros(x.shape)
    log_b = math.log(total_rows)
    log_k = math.log(x.shape[1])

    # Fast path (DINOv2's exp-domain iterations): one exp, then only matrix-vector products.
    # Exact as long as exp(x - max) cannot underflow to zero, which holds for DINO heads (L2-normalised
    # prototypes keep |logit| <= 1, so the spread is <= 2 / teacher_temp = 50 at 0.04).  The shift is
    # a global max so that every rank scales its rows by the same constant.
    hi = x.amax() if x.numel() else x.new_tensor(float("-inf"))
    lo = x.amin() if x.numel() else x.new_tensor(float("inf"))
    if distributed:
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        lo = -lo
        dist.all_reduce(lo, op=dist.ReduceOp.MAX)
        lo = -lo
    if float(hi - lo) < _EXP_SAFE_SPREAD:
        # Q = diag(r) E diag(c) with E = exp(x - max) never rescaled in place: each iteration is two
        # matrix-vector products (one read of E each) instead of four full passes over a (B, K)
        # tensor, which is what dominates for iBOT's hundreds of patches x 65536 prototypes.
        e = x.sub_(hi).exp_()  # x is our own float copy, and the log-domain path is not taken
        k = float(x.shape[1])
        r = e.new_ones(e.shape[0])
        for _ in range(n_iterations):
            col = e.t().mv(r)  # column sums of diag(r) E
            if distributed:
                dist.all_reduce(col)
            c = 1.0 / (col * k)  # every prototype gets total mass 1/K over the global batch
            r = 1.0 / (e.mv(c) * total_rows)  # every sample total mass 1/B
        e *= (r * total_rows).unsqueeze(1)
        e *= c.unsqueeze(0)
        return e

    for _ in range(n_iterations):  # log domain: any spread of logits, ~3x the exps
        # every prototype gets total mass 1/K over the global batch ...
        x = x - _batch_logsumexp(x, distributed) - log_k
        # ... then every sample total mass 1/B (a purely local operation)
        x = x - torch.logsumexp(x, dim=1, keepdim=True) - log_b
    return torch.exp(x + log_b)


class SinkhornCrossEntropy(nn.Module):
    """Shared settings of the DINO and iBOT losses: student temperature and Sinkhorn iterations."""

    def __init__(self, student_temp: float = 0.1, sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp
        self.sinkhorn_iterations = sinkhorn_iterations
