"""The one tiny exported backbone every evaluation test embeds with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def export_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export folder (``dinocell export``'s one format) of a ViT (dim 32, depth 2, patch 8) with its
    preprocessing for 5-channel Cell Painting at 32 px; LayerScale 0.5 so that its embeddings depend on the input."""
    from dinocell.config import ModelConfig
    from dinocell.models.backbone import build_backbone
    from dinocell.models.loading import Preprocess
    from dinocell.models.timm_export import save_timm

    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8, layerscale_init=0.5),
                        img_size=32)
    out = tmp_path_factory.mktemp("model") / "export" / "backbone"
    return save_timm(bb, out, Preprocess(patch_size=8, crop_size=32, channel_names=["DNA", "ER", "RNA", "AGP", "Mito"]))
