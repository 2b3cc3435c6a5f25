"""Soft-target cross-entropy ``-sum_k t[k] log softmax(s / tau)[k]`` per row, fused and chunked.

This is the cross-entropy of DINO (Caron et al., 2021) and iBOT (Zhou et al., 2022) between a
student's logits and the teacher's (Sinkhorn-centred) targets.  With 65536 prototypes and hundreds of
masked patches, the plain autograd form -- divide, log-softmax, multiply by the targets, sum, and the
backward of each -- makes about fifteen passes over (rows x 65536) float32 tensors and keeps the
log-softmax alive until backward, which costs more than the head's own matrix product on a CPU.

:class:`_SoftCrossEntropy` uses ``loss = lse(z) * sum(t) - <t, z>`` with ``z = s / tau`` and
``d loss / d s = (softmax(z) * sum(t) - t) / tau``: the forward reads s and t once and keeps only
three numbers per row; the backward recomputes the softmax from s and those numbers and writes the
gradient in the same chunked pass.  Row chunks stay in cache (:mod:`dinocell.losses.chunking`), so the
intermediate element-wise results never reach main memory.  No host synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dinocell.losses.chunking import row_chunks

__all__ = ["soft_cross_entropy"]


class _SoftCrossEntropy(torch.autograd.Function):
    """Per-row soft-target cross-entropy; gradient for the logits only (targets are constants)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
        n, k = logits.shape
        inv_t = 1.0 / temp
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        dot = torch.empty_like(lse)
        t_sum = torch.empty_like(lse)
        for sl in row_chunks(n, k):
            z = logits[sl].float().mul(inv_t)
            t = targets[sl].float()
            torch.sum(t * z, dim=1, out=dot[sl])
            torch.sum(t, dim=1, out=t_sum[sl])
            torch.logsumexp(z, dim=1, out=lse[sl])
        ctx.save_for_backward(logits, targets, lse, t_sum)
        ctx.inv_t = inv_t
        return lse * t_sum - dot

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        logits, targets, lse, t_sum = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        inv_t = ctx.inv_t
        coef = grad_rows.float() * inv_t
        grad = torch.empty_like(logits)
        n, k = logits.shape
        for sl in row_chunks(n, k):
            p = logits[sl].float().mul(inv_t).sub_(lse[sl].unsqueeze(1)).exp_()  # softmax(z)
            p.mul_(t_sum[sl].unsqueeze(1)).sub_(targets[sl]).mul_(coef[sl].unsqueeze(1))
            grad[sl] = p
        return grad, None, None


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temp: float, fused: bool = True
) -> torch.Tensor:
    """float32 (N,) ``-sum_k targets[n, k] * log_softmax(logits[n] / temp)[k]``.

    ``logits`` and ``targets`` are (N, K); gradients flow to ``logits`` only.  ``fused=False`` is the
    plain autograd form (the reference the fused path is tested against, to 1e-5).
    """
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must both be (N, K); got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if not temp > 0:
        raise ValueError(f"temp must be > 0, got {temp}")
    if not fused:
        return -(targets.float() * F.log_softmax(logits.float() / temp, dim=-1)).sum(dim=-1)
    return _SoftCrossEntropy.apply(logits, targets.detach(), float(temp))
