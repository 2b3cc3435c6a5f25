"""KoLeo regulariser: spread the batch's embeddings uniformly on the sphere.

The Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al., 2019, "Spreading vectors
for similarity search") is, up to constants, ``-mean_i log d_i`` where ``d_i`` is the distance from
sample i to its nearest neighbour in the batch.  Minimising it pushes nearest neighbours apart, which
DINOv2 (Oquab et al., 2023) adds (weight 0.1, on the student's pre-head CLS of global crops) to keep
features from crowding and to help retrieval; DINOv3 (Siméoni et al., 2025) keeps it.

With several global crops the estimator runs per crop (nearest neighbours within one view of the
batch) and the per-crop losses are *summed*: dinov3 averages them and then multiplies by
``koleo_scale = n_global_crops``, so the weight 0.1 applies to the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)`` on L2-normalised rows of x (B, D).

    For ``(n_crops, B, D)`` input it is computed per crop and summed over the crops (see module doc).
    A batch of one sample has no neighbour: the loss is then 0 (still attached to the graph, so a
    tiny last batch or a per-GPU batch of one never stops training).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return torch.stack([self._single(c) for c in x.unbind(0)]).sum()
        if x.ndim != 2:
            raise ValueError(f"KoLeoLoss expects (B, D) or (n_crops, B, D) features, got shape {tuple(x.shape)}")
        return self._single(x)

    def _single(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
        if x.shape[0] < 2:
            return x.sum() * 0.0
        with torch.no_grad():
            # on the unit sphere the nearest neighbour is the one with the largest inner product
            sim = x @ x.t()
            sim.fill_diagonal_(float("-inf"))
            nn_idx = sim.argmax(dim=1)
        # the distance itself is recomputed with gradients; PairwiseDistance adds eps inside the norm,
        # which keeps the gradient finite for exact duplicates
        dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=self.eps)
        return -torch.log(dist + self.eps).mean()
