"""Soft-target cross-entropy ``-sum_k t[k] log softmax(s / tau)[k]`` per row: fused or compiled.

This is the cross-entropy of DINO (Caron et al., 2021) and iBOT (Zhou et al., 2022) between a
student's logits and the teacher's (Sinkhorn-centred) targets.  With 65536 prototypes and hundreds of
masked patches every element-wise pass over the (rows x 65536) float32 tensors costs as much as a
small matrix product, and plain autograd keeps the log-softmax (and its product with the targets)
alive until backward.

Three paths with the same value and gradient (tested to 1e-5):

* ``"fused"`` (default): :class:`_SoftCrossEntropy`, a custom autograd function.  Forward keeps two
  numbers per row (``lse(z)`` and ``sum(t)``, ``z = s / tau``) and no (rows x K) tensor;
  backward recomputes ``softmax(z)`` and writes ``(softmax(z) * sum(t) - t) / tau`` in place into the
  gradient: four full-size operations each way, over row chunks of bounded size
  (:mod:`dinocell.losses.chunking`) so temporaries stay chunk-sized.
* ``"compiled"``: the plain form under ``torch.compile`` (inductor generates one loop per pass, so
  the element-wise chain never reaches memory); pays on a CPU once its one-off compile is amortised.
* ``"reference"``: the plain autograd form, what the other two are tested against.

No path synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dinocell.losses.chunking import row_chunks

__all__ = ["CE_MODES", "soft_cross_entropy"]

CE_MODES = ("fused", "compiled", "reference")


class _SoftCrossEntropy(torch.autograd.Function):
    """Per-row soft-target cross-entropy; gradient for the logits only (targets are constants)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
        n, k = logits.shape
        inv_t = 1.0 / temp
        rows = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(rows)
        t_sum = torch.empty_like(rows)
        for sl in row_chunks(n, k):
            z = logits[sl].float().mul(inv_t)
            log_p = torch.log_softmax(z, dim=1)
            t = targets[sl].float()
            # -<t, log_p> per row
            torch.neg(torch.linalg.vecdot(t, log_p, dim=1), out=rows[sl])
            torch.sum(t, dim=1, out=t_sum[sl])
            torch.sub(z[:, 0], log_p[:, 0], out=lse[sl])  # log-sum-exp of z, read off one column
        ctx.save_for_backward(logits, targets, lse, t_sum)
        ctx.inv_t = inv_t
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        logits, targets, lse, t_sum = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        inv_t = ctx.inv_t
        coef = (grad_rows.float() * inv_t).unsqueeze(1)
        scale = coef * t_sum.unsqueeze(1)
        grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        n, k = logits.shape
        for sl in row_chunks(n, k):
            g = grad[sl]
            torch.add(lse[sl].unsqueeze(1).neg(), logits[sl], alpha=inv_t, out=g)  # z - lse
            g.exp_().mul_(scale[sl])  # softmax(z) * sum(t) * dL/drow / tau
            g.addcmul_(targets[sl], coef[sl], value=-1.0)
        return grad.to(logits.dtype), None, None


def _reference(logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    return -(targets.float() * F.log_softmax(logits.float() / temp, dim=-1)).sum(dim=-1)


_compiled: Callable[..., torch.Tensor] | None = None


def _compiled_reference() -> Callable[..., torch.Tensor]:
    """The reference under ``torch.compile``, built on first use (dynamic: the masked count varies)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_reference, dynamic=True)
    return _compiled


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temp: float, mode: str = "fused"
) -> torch.Tensor:
    """float32 (N,) ``-sum_k targets[n, k] * log_softmax(logits[n] / temp)[k]``.

    ``logits`` and ``targets`` are (N, K); gradients flow to ``logits`` only.  ``mode`` is one of
    :data:`CE_MODES` (see the module docstring).
    """
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must both be (N, K); got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if not temp > 0:
        raise ValueError(f"temp must be > 0, got {temp}")
    targets = targets.detach()
    if mode == "fused":
        return _SoftCrossEntropy.apply(logits, targets, float(temp))
    if mode == "compiled":
        return _compiled_reference()(logits, targets, float(temp))
    if mode == "reference":
        return _reference(logits, targets, temp)
    raise ValueError(f"mode must be one of {CE_MODES}, got {mode!r}")
