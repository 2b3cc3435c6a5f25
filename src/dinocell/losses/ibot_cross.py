"""Cross-channel iBOT: the teacher's patch of channel *a* is the target for the student's masked patch
of channel *b* at the same position.

iBOT (Zhou et al., 2022) distils, at each masked position of a crop, the teacher's assignment of the
*same crop's* visible patch.  When the global crops of a field are aligned (one box, one flip; see
``data.views.aligned_globals``) and differ only in their stain, patch ``p`` of every crop shows the
same cells, so the teacher's view of that position through one stain can teach the student looking
through another.  That is a position-wise channel-invariance objective, which the image-level DINO
loss cannot express and which segmentation transfer across stains needs.

The pairing is a (G, G) row-stochastic matrix ``P``: student crop ``k`` learns the mixture
``sum_j P[k, j] · teacher_j``.  Because the cross-entropy is linear in its target, that equals the
mean of the G − 1 pairwise cross-entropies, at the cost of one.  ``P = I`` is plain iBOT.
"""

from __future__ import annotations

import torch

from dinocell.losses.ibot import iBOTPatchLoss

__all__ = ["CrossChannelIBOTLoss", "cross_channel_pairing"]


def cross_channel_pairing(n_crops: int, include_self: bool = False) -> torch.Tensor:
    """(G, G) weights: row k spreads student crop k's target evenly over the teacher crops j ≠ k
    (and over k itself with ``include_self``)."""
    if n_crops < 2:
        raise ValueError(f"cross-channel pairing needs at least 2 aligned crops, got {n_crops}")
    p = torch.ones(n_crops, n_crops)
    if not include_self:
        p.fill_diagonal_(0.0)
    return p / p.sum(dim=1, keepdim=True)


class CrossChannelIBOTLoss:
    """iBOT whose targets at a masked position come from the *other* aligned crops of the field.

    Inputs are laid out crop-major with masks shared across the aligned crops of a sample: the masked
    tokens of crop ``k`` are rows ``k·M .. (k+1)·M − 1`` and row ``k·M + m`` is the same (sample,
    position) for every ``k``.  The cross-entropy itself is :class:`iBOTPatchLoss`'s (one
    implementation of the per-image-weighted masked-patch loss).
    """

    def __init__(self, ibot: iBOTPatchLoss) -> None:
        self.ibot = ibot

    def __call__(self, student_masked_logits: torch.Tensor, teacher_probs_masked: torch.Tensor,
                 masks_weight: torch.Tensor, n_images: int, pairing: torch.Tensor) -> torch.Tensor:
        g = pairing.shape[0]
        rows, k = teacher_probs_masked.shape
        if pairing.shape != (g, g) or rows % g:
            raise ValueError(f"{rows} masked rows cannot be split into {g} aligned crops "
                             f"(pairing {tuple(pairing.shape)}): masks must be shared across aligned crops")
        t = teacher_probs_masked.reshape(g, rows // g, k)
        mixed = torch.einsum("kj,jmc->kmc", pairing.to(t), t).reshape(rows, k)
        return self.ibot.forward_masked(student_masked_logits, mixed, masks_weight, n_images)
