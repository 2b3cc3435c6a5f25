"""iBOT masked-patch self-distillation loss.

iBOT (Zhou et al., 2022): some patches of a global crop are replaced by a mask token in the student's
input; at each masked position the student must predict the teacher's prototype assignment of the
*visible* patch.  This is the dense counterpart of the DINO loss and is what gives the patch features
their local semantics.  As in DINOv2 (Oquab et al., 2023) and DINOv3 (Siméoni et al., 2025) the loss is
computed only on the masked patches (gathered as a flat (M, K) tensor), the teacher is centred with
Sinkhorn-Knopp over all masked patches of the (global) batch, and every image weighs the same whatever
its number of masked patches: each patch carries weight ``1 / n_masked(image)`` and the sum is divided
by the number of images.
"""

from __future__ import annotations

import torch

from dinocell.losses.sinkhorn import SinkhornCrossEntropy, sinkhorn_knopp
from dinocell.losses.soft_ce import soft_cross_entropy

__all__ = ["iBOTPatchLoss"]


class iBOTPatchLoss(SinkhornCrossEntropy):
    """Per-image-averaged cross-entropy between teacher and student on masked patches."""

    def teacher_probs(
        self,
        teacher_patch_logits_masked: torch.Tensor,
        teacher_temp: float,
        n_masked_patches: int | None = None,
    ) -> torch.Tensor:
        """Sinkhorn-centred targets (n_masked_patches, K) for the teacher's logits at masked positions.

        Rows past ``n_masked_patches`` (padding, if the caller gathered into a fixed-size buffer) are
        ignored, so the equipartition is over the real masked patches only.
        """
        if teacher_patch_logits_masked.ndim != 2:
            raise ValueError(
                f"teacher_patch_logits_masked must be (M, K), got {tuple(teacher_patch_logits_masked.shape)}"
            )
        n = teacher_patch_logits_masked.shape[0] if n_masked_patches is None else int(n_masked_patches)
        if not 0 <= n <= teacher_patch_logits_masked.shape[0]:
            raise ValueError(
                f"n_masked_patches={n} outside [0, {teacher_patch_logits_masked.shape[0]}] (rows given)"
            )
        return sinkhorn_knopp(teacher_patch_logits_masked[:n], teacher_temp, self.sinkhorn_iterations)

    def forward_masked(
        self,
        student_patch_logits_masked: torch.Tensor,
        teacher_probs_masked: torch.Tensor,
        masks_weight: torch.Tensor,
        n_images: int,
    ) -> torch.Tensor:
        """Scalar loss ``-sum_m w_m sum_k p_t[m,k] log softmax(s[m] / tau)[k] / n_images``.

        Args:
            student_patch_logits_masked: (M, K) student logits at the masked positions.
            teacher_probs_masked: (M, K) teacher targets at the same positions.
            masks_weight: (M,) ``1 / n_masked`` of the image each patch belongs to.
            n_images: number of images the masks were drawn for (all global crops, masked or not,
                as in DINOv2), so the loss is a mean over images.
        """
        s, t, w = student_patch_logits_masked, teacher_probs_masked, masks_weight
        if s.ndim != 2 or s.shape != t.shape:
            raise ValueError(
                f"student/teacher masked logits must both be (M, K); got {tuple(s.shape)}, {tuple(t.shape)}"
            )
        if w.shape != (s.shape[0],):
            raise ValueError(f"masks_weight must be ({s.shape[0]},), got {tuple(w.shape)}")
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        if s.shape[0] == 0:  # nothing masked in this batch: zero, but still part of the graph
            return s.float().sum() * 0.0
        per_patch = soft_cross_entropy(s, t, self.student_temp, self.ce_mode)
        return (per_patch * w.float()).sum() / n_images

    #: the only form: losses on unmasked patches are not used
    forward = forward_masked
