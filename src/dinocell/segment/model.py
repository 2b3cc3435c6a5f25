"""The segmenter: a dinocell backbone, a light neck and an upsampling decoder to full resolution.

Patch tokens of the last ``blocks`` blocks -- or of the blocks listed in ``feature_blocks``, e.g. an
intermediate block whose tokens still carry local texture -- (timm ``forward_intermediates``, already
(B, D, h, w)) are concatenated, projected by a 1x1 + 3x3 neck, then doubled in resolution ``ceil(log2(patch))`` times
by (bilinear x2, 3x3 conv, GroupNorm, GELU) stages -- the DPT/DINOCell recipe minus the fusion of
early layers, which a tiny frozen backbone does not need.  Heads: a normalised distance map and a
foreground logit (DINOCell, SAMCell), optionally a Cellpose-style flow field.  The decoder sees only
backbone features (no raw-pixel skip), so what it learns on one channel transfers to another exactly
as far as the backbone's features do -- the point of the benchmark.

:func:`segmentation_model` is the one place the segmenter obtains a backbone (through the one loader,
:func:`dinocell.models.loading.load_model`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinocell.config import DataConfig
from dinocell.errors import ConfigError
from dinocell.models.backbone import DinoBackbone
from dinocell.models.loading import LoadedModel, load_model
from dinocell.segment.scale import numeric_scale

log = logging.getLogger(__name__)


def segmentation_model(cfg: Any) -> LoadedModel:
    """The backbone a segmenter trains on, through the one loader: ``cfg.model.backbone`` (an export, a
    timm folder, a pretraining run folder or checkpoint -- the teacher --, an official DINOv3 ``.pth``
    loaded into ``cfg.model.arch``), or ``cfg.model.arch`` randomly initialised when it is unset.

    A backbone that records its training preprocessing also sets ``cfg.data``'s illumination, scaling
    and stain settings (:meth:`Preprocess.data_config`): the segmenter is then trained, and later
    predicts, on fields finished exactly as the backbone saw them in pretraining."""
    m = load_model(cfg.model.backbone or None, arch=cfg.model.arch)
    if m.trained_preprocess:
        adopted = m.preprocess.data_config(cfg.data)
        default = DataConfig()
        for key in ("illum", "scaling", "stain"):
            given, used = getattr(cfg.data, key), getattr(adopted, key)
            if given != used:  # loud only when the segment config asked for something else on purpose
                (log.warning if given != getattr(default, key) else log.info)(
                    "data.%s: using the backbone's training setting %s instead of %s (%s)", key, used, given,
                    m.description)
        cfg.data = adopted
    return m


def take_indices(cfg: Any, n_blocks: int) -> list[int]:
    """Absolute block indices feeding the neck: ``cfg.feature_blocks`` (negative = from the end) or the
    last ``cfg.blocks``; an index outside the backbone is a one-line ConfigError."""
    listed = getattr(cfg, "feature_blocks", None)
    if not listed:
        n = max(1, min(int(cfg.blocks), n_blocks))
        return list(range(n_blocks - n, n_blocks))
    out = []
    for i in listed:
        j = int(i) + n_blocks if int(i) < 0 else int(i)
        if not 0 <= j < n_blocks:
            raise ConfigError(f"config key 'model.feature_blocks' has block {i}; this backbone has blocks "
                              f"0..{n_blocks - 1}")
        out.append(j)
    return sorted(dict.fromkeys(out))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


class SegmentationNet(nn.Module):
    """(B, 1, H, W) image in [0, 1] -> (B, K, H, W) maps: distance logit, foreground logit[, flows]."""

    def __init__(self, backbone: DinoBackbone, cfg: Any) -> None:
        super().__init__()
        if backbone.in_chans != 1:
            from dinocell.errors import UserError

            raise UserError(f"the segmenter feeds one channel; this backbone expects {backbone.in_chans}")
        self.backbone = backbone
        self.frozen = cfg.mode == "frozen"
        self.take = take_indices(cfg, backbone.n_blocks)
        self.blocks = len(self.take)
        self.input_scale = numeric_scale(cfg.input_scale)
        self.flows = bool(cfg.flow_head)
        if self.frozen:
            backbone.requires_grad_(False)
            backbone.eval()
        d, neck = backbone.embed_dim * self.blocks, int(cfg.neck_dim)
        self.neck = nn.Sequential(nn.Conv2d(d, neck, 1), _norm(neck), nn.GELU(),
                                  nn.Conv2d(neck, neck, 3, padding=1), _norm(neck), nn.GELU())
        n_up = max(0, math.ceil(math.log2(backbone.patch_size)))
        dims = [neck] + [max(int(cfg.decoder_dim), neck >> (i + 1)) for i in range(n_up)]
        dims[-1] = int(cfg.decoder_dim) if n_up else neck
        self.up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, padding=1), _norm(dims[i + 1]), nn.GELU())
            for i in range(n_up))
        self.head = nn.Conv2d(dims[-1], 4 if self.flows else 2, 1)

    @property
    def n_outputs(self) -> int:
        return self.head.out_channels

    def train(self, mode: bool = True) -> SegmentationNet:
        super().train(mode)
        if self.frozen:  # a frozen backbone stays in eval mode (no drop-path) whatever Lightning does
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated patch-token maps of the selected blocks, (B, D * blocks, h, w)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.backbone.model.forward_intermediates(
                x, indices=list(self.take), norm=True, output_fmt="NCHW", intermediates_only=True)
        return torch.cat(list(maps), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        p = self.backbone.patch_size
        # resize to the nearest patch multiple of the scaled size (RoPE takes any grid)
        sh = max(p, round(h * self.input_scale / p) * p)
        sw = max(p, round(w * self.input_scale / p) * p)
        xs = x if (sh, sw) == (h, w) else F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
        y = self.neck(self.features(xs))
        for stage in self.up:
            y = stage(F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False))
        y = self.head(y)
        if y.shape[-2:] != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return y


def activate(logits: torch.Tensor) -> torch.Tensor:
    """Logits -> maps: distance and foreground through a sigmoid, flows through tanh."""
    out = torch.sigmoid(logits[:, :2])
    if logits.shape[1] > 2:
        out = torch.cat([out, torch.tanh(logits[:, 2:])], dim=1)
    return out
