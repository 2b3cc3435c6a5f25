"""DINO image-level self-distillation loss over multiple views.

DINO (Caron et al., 2021): the student, shown any crop, must predict the teacher's soft prototype
assignment of a *different* crop of the same image: ``-sum_k p_t[k] log softmax(s / tau_s)[k]``.
DINOv2 (Oquab et al., 2023) and DINOv3 (Siméoni et al., 2025) keep that loss and centre the teacher
with Sinkhorn-Knopp (:func:`dinocell.losses.sinkhorn.sinkhorn_knopp`) instead of an EMA centre.

For Cell Painting the two global crops are different *channels* of the same field (global 0 = the mean
of the fluorescent channels, global 1 = one random single channel), so cross-view pairs are what force
channel-invariant embeddings; :func:`multiview_pairs` spells that pairing out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dinocell.losses.sinkhorn import SinkhornCrossEntropy, sinkhorn_knopp
from dinocell.losses.soft_ce import soft_cross_entropy

__all__ = ["DINOLoss", "multiview_pairs"]


def multiview_pairs(n_global: int = 2, n_local: int = 0) -> list[tuple[int, int]]:
    """(student_index, teacher_index) pairs for the multi-crop loss.

    Student crops are indexed ``[global_0 .. global_{G-1}, local_0 .. local_{L-1}]``; teacher crops are
    the G globals.  Each teacher global teaches every *other* student global (no same-view pair: the
    task would be trivial) and every local crop, as in DINO/DINOv2.  With G=2: (1, 0), (0, 1) and
    (G + l, 0), (G + l, 1) for each local l.
    """
    if n_global < 1 or n_local < 0:
        raise ValueError(f"need n_global >= 1 and n_local >= 0, got n_global={n_global}, n_local={n_local}")
    pairs = [(i, j) for i in range(n_global) for j in range(n_global) if i != j]
    pairs += [(n_global + loc, j) for loc in range(n_local) for j in range(n_global)]
    return pairs


class DINOLoss(SinkhornCrossEntropy):
    """Mean over (student, teacher) crop pairs of the batch-mean cross-entropy to the teacher targets.

    Teacher temperature never enters :meth:`forward`: targets are made by :meth:`teacher_probs`, which
    takes ``teacher_temp`` as an argument, because the temperature follows a schedule owned by the
    trainer (:mod:`dinocell.train.schedules`) while this module stays stateless.
    """

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Sinkhorn-centred teacher targets, with the same shape as ``teacher_logits``.

        ``teacher_logits`` is (T, B, K) or (T*B, K).  All teacher crops of the batch are centred together
        (the equipartition constraint is over every teacher row, as in DINOv2).
        """
        if teacher_logits.ndim not in (2, 3):
            raise ValueError(f"teacher_logits must be (T, B, K) or (N, K), got {tuple(teacher_logits.shape)}")
        flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        probs = sinkhorn_knopp(flat, teacher_temp, self.sinkhorn_iterations)
        return probs.reshape(teacher_logits.shape)

    def forward(
        self,
        student_logits: torch.Tensor | Sequence[torch.Tensor],
        teacher_probs: torch.Tensor,
        pairs: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Scalar loss.

        Args:
            student_logits: (S, B, K) tensor or a sequence of S (B, K) tensors, globals first.
            teacher_probs: (T, B, K) targets (e.g. from :meth:`teacher_probs`).
            pairs: explicit (student_index, teacher_index) pairs; default
                ``multiview_pairs(T, S - T)``.
        """
        if isinstance(student_logits, torch.Tensor):
            students = list(student_logits.unbind(0))
        else:
            students = list(student_logits)
        if teacher_probs.ndim != 3:
            raise ValueError(f"teacher_probs must be (T, B, K), got shape {tuple(teacher_probs.shape)}")
        n_student, n_teacher = len(students), teacher_probs.shape[0]
        if pairs is None:
            if n_student < n_teacher:
                raise ValueError(
                    f"default pairing needs the {n_teacher} global crops first among the "
                    f"{n_student} student crops; pass pairs= explicitly"
                )
            pairs = multiview_pairs(n_teacher, n_student - n_teacher)
        if len(pairs) == 0:
            raise ValueError("DINOLoss needs at least one (student, teacher) pair")

        # Group teachers per student: sum_j CE(p_j, s_i) = CE(sum_j p_j, s_i), so each student's
        # log-softmax (the big (B, K) tensor) is computed once however many teachers it has.
        targets: dict[int, list[int]] = {}
        for i, j in pairs:
            if not (0 <= i < n_student and 0 <= j < n_teacher):
                raise ValueError(
                    f"pair ({i}, {j}) out of range for {n_student} student / {n_teacher} teacher crops"
                )
            targets.setdefault(i, []).append(j)

        total = None
        for i, js in targets.items():
            s = students[i]
            if s.shape != teacher_probs.shape[1:]:
                raise ValueError(
                    f"student crop {i} has shape {tuple(s.shape)}, "
                    f"teacher crops {tuple(teacher_probs.shape[1:])}"
                )
            t = teacher_probs[js[0]] if len(js) == 1 else teacher_probs[js].sum(dim=0)
            term = soft_cross_entropy(s, t, self.student_temp, self.ce_mode).mean()
            total = term if total is None else total + term
        assert total is not None
        return total / len(pairs)
