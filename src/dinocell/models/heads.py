"""Projection heads for DINO and iBOT.

DINO head (Caron et al. 2021, arXiv:2104.14294; DINOv2/v3 defaults): an MLP (``nlayers`` linear
layers with GELU, hidden 2048, bottleneck 256), L2 normalisation of the bottleneck, then a linear
"prototype" layer without bias whose rows are weight-normalised with the norm fixed at 1.  The logits
are therefore cosine similarities to K prototypes, which keeps them bounded before the temperature
and is what makes the centring/Sinkhorn-Knopp targets well behaved.  (The DINOv3 code base dropped
weight norm for FSDP2 convenience; we keep DINO/DINOv2's fixed-norm version.)

The trainer builds one instance for the image-level DINO loss and a separate one for iBOT patch
tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, bias: bool = True) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised prototypes (norm frozen at 1) -> logits (B, K).

    ``last_layer`` is ``weight_norm(Linear(bottleneck_dim, out_dim, bias=False))``; its magnitude
    ``last_layer.parametrizations.weight.original0`` is 1 and not trained, its direction
    ``...original1`` is.  Trainers that freeze the last layer early on should match names
    containing ``"last_layer"``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1 or nlayers < 1:
            raise ValueError("DINOHead dimensions and nlayers must be >= 1")
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, bias=mlp_bias)
        self.mlp.apply(self._init_weights)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        if not norm_last_layer:  # DINOv3: a plain linear prototype layer, free to sharpen its logits
            self.last_layer = last
            return
        self.last_layer = weight_norm(last)  # dim=0: one norm per prototype row
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, no_last_layer: bool = False, only_last_layer: bool = False
    ) -> torch.Tensor:
        """Logits (..., K).  ``no_last_layer`` returns the normalised bottleneck (..., bottleneck_dim);
        ``only_last_layer`` applies just the prototypes to an already normalised bottleneck."""
        if not only_last_layer:
            x = self.mlp(x)
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = F.normalize(x, dim=-1, p=2, eps=eps)
        if not no_last_layer:
            x = self.last_layer(x)
        return x


__all__ = ["DINOHead"]
