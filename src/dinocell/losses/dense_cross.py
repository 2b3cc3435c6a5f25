"""Dense cross-channel distillation: every patch of one stain learns the teacher's patch of another
stain at the same position.

Segmentation transfer across stains needs the *patch* tokens of one place to agree whatever the stain
that shows it.  The image-level DINO loss acts on the CLS token, and (cross-channel) iBOT acts only on
masked patches, whose student token is a prediction from context rather than the stain's own view of
that place.  When the global crops of a field are aligned (one box, one flip: ``data.views.aligned_
globals``) and differ only in their stain, patch ``p`` of every crop shows the same cells, so the
teacher's token at ``p`` through stain ``a`` is a target for the student's token at ``p`` through stain
``b``, at *every* position, visible or masked.  This is the dense, position-matched counterpart of the
DINO cross-view pairing:

* DenseCL (Wang et al., 2021) and the local objectives of VADeR / PixPro (Pinheiro et al., 2020; Xie
  et al., 2021) learn dense features by matching patch features across two views, with the matches
  given by feature similarity or by known geometry; here the geometry is the identity (aligned crops),
  so the positive of patch ``p`` is patch ``p`` of the other stain;
* iBOT (Zhou et al., 2022) supplies the target form of ``mode="ibot"``: the patch head's prototype
  assignment, centred with Sinkhorn-Knopp over all target patches of the batch (DINOv2/v3), and a
  soft cross-entropy at the student temperature;
* ChannelViT (Bao et al., 2024) and IC-ViT (Lian et al., 2025, Isolated Channel ViTs) treat each stain of a Cell
  Painting image as its own single-channel input sharing one backbone; the loss asks those
  single-channel patch tokens to agree across stains of the same place.

Two target forms (``loss.dense_cross_mode``):

* ``ibot``: ``ibot_head`` logits of the student's patch tokens against the Sinkhorn-centred teacher
  assignments of the *other* crops at the same position (:meth:`DenseCrossChannelLoss.ibot`);
* ``cosine``: a feature-level variant with no head, ``1 - cos`` between the student's patch token and
  the teacher's token of the other crops, both centred per crop over the batch and positions (the
  per-stain offset is removed, as the centred consistency figure does, so the loss cannot be met by a
  shared constant token) (:meth:`DenseCrossChannelLoss.cosine`).

Tensors are crop-major, as the globals of a batch: (G, B, N, ·) with crop ``k`` of sample ``b`` at row
``k·B + b`` of the backbone batch.  The pairing is the (G, G) row-stochastic matrix of
:func:`dinocell.losses.ibot_cross.cross_channel_pairing`: student crop ``k`` learns
``sum_j P[k, j] · teacher_j`` (linear in the target, so for ``ibot`` it is the mean of the pairwise
cross-entropies at the cost of one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinocell.losses.sinkhorn import SinkhornCrossEntropy, sinkhorn_knopp
from dinocell.losses.soft_ce import soft_cross_entropy

__all__ = ["DENSE_CROSS_MODES", "DenseCrossChannelLoss", "mix_crops"]

#: target forms of ``loss.dense_cross_mode``
DENSE_CROSS_MODES = ("ibot", "cosine")


def mix_crops(teacher: torch.Tensor, pairing: torch.Tensor) -> torch.Tensor:
    """(G, ...) teacher tensors -> (G, ...) targets, row ``k`` = ``sum_j pairing[k, j] · teacher[j]``."""
    g = teacher.shape[0]
    if pairing.shape != (g, g):
        raise ValueError(f"pairing must be ({g}, {g}) for {g} aligned crops, got {tuple(pairing.shape)}")
    flat = teacher.reshape(g, -1)
    return (pairing.to(flat) @ flat).reshape(teacher.shape)


def _check_dense(name: str, x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be (G, B, N, C) (crop-major, all patches), got {tuple(x.shape)}")


class DenseCrossChannelLoss(SinkhornCrossEntropy):
    """Position-matched cross-crop distillation on all patch tokens (see the module docstring)."""

    def teacher_probs(self, teacher_patch_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Sinkhorn-centred targets, same shape as the (G, B, N, K) teacher ``ibot_head`` logits.

        Every patch of every crop is one row of the equipartition (iBOT's centring over the batch).
        """
        _check_dense("teacher_patch_logits", teacher_patch_logits)
        k = teacher_patch_logits.shape[-1]
        probs = sinkhorn_knopp(teacher_patch_logits.reshape(-1, k), teacher_temp, self.sinkhorn_iterations)
        return probs.reshape(teacher_patch_logits.shape)

    def ibot(self, student_patch_logits: torch.Tensor, teacher_probs: torch.Tensor,
             pairing: torch.Tensor) -> torch.Tensor:
        """Mean over crops, samples and positions of ``-sum_c q[k,b,n,c] log softmax(s[k,b,n] / tau)[c]``
        with ``q = mix_crops(teacher_probs, pairing)``.

        Args:
            student_patch_logits: (G, B, N, K) student ``ibot_head`` logits at every patch.
            teacher_probs: (G, B, N, K) teacher targets (:meth:`teacher_probs`).
            pairing: (G, G) row-stochastic crop pairing (no self-targets for cross-channel).
        """
        _check_dense("student_patch_logits", student_patch_logits)
        if student_patch_logits.shape != teacher_probs.shape:
            raise ValueError(f"student logits {tuple(student_patch_logits.shape)} and teacher targets "
                             f"{tuple(teacher_probs.shape)} must have the same shape")
        k = student_patch_logits.shape[-1]
        targets = mix_crops(teacher_probs.detach().float(), pairing)
        per_patch = soft_cross_entropy(student_patch_logits.reshape(-1, k), targets.reshape(-1, k),
                                       self.student_temp, self.ce_mode)
        return per_patch.mean()

    @staticmethod
    def cosine(student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor,
               pairing: torch.Tensor) -> torch.Tensor:
        """Mean over crops, samples and positions of ``1 - cos(s~[k,b,n], t~[k,b,n])``.

        ``s~`` is the student token centred per crop (mean over samples and positions removed, with
        gradient), ``t~ = mix_crops(centred teacher tokens, pairing)``.  Centring per crop removes each
        stain's offset, so only the place-specific part of the tokens has to agree.

        Args:
            student_patch_tokens: (G, B, N, D) student backbone patch tokens.
            teacher_patch_tokens: (G, B, N, D) teacher backbone patch tokens (no gradient).
            pairing: (G, G) row-stochastic crop pairing.
        """
        _check_dense("student_patch_tokens", student_patch_tokens)
        if student_patch_tokens.shape != teacher_patch_tokens.shape:
            raise ValueError(f"student tokens {tuple(student_patch_tokens.shape)} and teacher tokens "
                             f"{tuple(teacher_patch_tokens.shape)} must have the same shape")
        s = student_patch_tokens.float()
        t = teacher_patch_tokens.detach().float()
        s = s - s.mean(dim=(1, 2), keepdim=True)
        t = mix_crops(t - t.mean(dim=(1, 2), keepdim=True), pairing)
        return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)).mean()
