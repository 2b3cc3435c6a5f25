"""Stand-in backbone shared by the extraction tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MeanPatchModel(torch.nn.Module):
    """Stand-in backbone: patch token = (mean intensity of the patch, 1); CLS = mean of the tokens."""

    patch_size = 4
    embed_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = F.avg_pool2d(x, self.patch_size).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens, torch.ones_like(tokens)], -1)
        return {"x_norm_clstoken": tokens.mean(1), "x_norm_patchtokens": tokens}
