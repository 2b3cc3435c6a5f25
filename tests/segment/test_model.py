"""Backbone loading, the decoder's shapes, frozen / fine-tune parameter groups, the config tree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinocell.config import ModelConfig
from dinocell.errors import ConfigError, UserError
from dinocell.models.backbone import build_backbone
from dinocell.models.loading import Preprocess, load_model
from dinocell.models.timm_export import save_timm
from dinocell.segment.config import SegModelConfig, load_segment_config
from dinocell.segment.model import SegmentationNet
from dinocell.segment.module import param_groups, segmentation_loss

ROOT = Path(__file__).resolve().parents[2]
ARCH = ModelConfig(patch_size=8, embed_dim=32, depth=3, num_heads=2)


def _net(**kw: object) -> SegmentationNet:
    cfg = SegModelConfig(arch=ARCH, neck_dim=16, decoder_dim=8, **kw)  # type: ignore[arg-type]
    return SegmentationNet(load_model(None, arch=ARCH).backbone, cfg)


def test_backbone_sources(tmp_path: Path) -> None:
    bb = build_backbone(ARCH)
    path = save_timm(bb, tmp_path / "bb", Preprocess(patch_size=bb.patch_size, crop_size=32))
    loaded = load_model(str(path), arch=ModelConfig()).backbone  # the export carries its own arch
    assert loaded.embed_dim == 32
    for k, v in bb.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    other = build_backbone(ModelConfig(patch_size=8, embed_dim=48, depth=3, num_heads=2))
    torch.save(other.model.state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="do not fit"):
        load_model(str(tmp_path / "other.pth"), arch=ARCH)


@pytest.mark.parametrize(("size", "scale"), [((32, 48), 1.0), ((36, 44), 1.0), ((20, 28), 2.0)])
def test_output_is_full_resolution(size: tuple[int, int], scale: float) -> None:
    net = _net(input_scale=scale, flow_head=True, blocks=2)
    out = net(torch.rand(2, 1, *size))
    assert out.shape == (2, 4, *size)


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval() -> None:
    net = _net()
    net.train()
    assert not net.backbone.training and net.neck.training
    x = torch.rand(2, 1, 32, 32)
    target = torch.rand(2, 2, 32, 32).round()
    segmentation_loss(net(x), target, load_segment_config().optim)["loss"].backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert net.head.weight.grad is not None
    groups = param_groups(net, load_segment_config())
    backbone_ids = {id(p) for p in net.backbone.parameters()}
    assert not any(id(p) in backbone_ids for g in groups for p in g["params"])


def test_finetune_groups_use_layerwise_decay() -> None:
    net = _net(mode="finetune")
    cfg = load_segment_config(overrides=["model.mode=finetune", "optim.layerwise_decay=0.5",
                                         "optim.backbone_lr_mult=0.1", "optim.patch_embed_lr_mult=1.0"])
    groups = param_groups(net, cfg)
    mult = {}
    for g in groups:
        for p in g["params"]:
            mult[id(p)] = g["lr_multiplier"]
    n_layers = net.backbone.n_blocks + 1
    for name, p in net.backbone.named_parameters():
        expected = 0.1 * 0.5 ** (n_layers - net.backbone.layer_id(name))
        assert mult[id(p)] == pytest.approx(expected), name
    assert mult[id(net.head.weight)] == 1.0
    assert len(mult) == sum(1 for _ in net.parameters())


def test_config_tree() -> None:
    cfg = load_segment_config(ROOT / "configs" / "segment_synthetic.yaml", ["task.objects=cells", "task.channel=AGP"])
    assert cfg.model.arch.embed_dim == 192 and cfg.task.objects == "cells" and cfg.data.synthetic.size == 64
    with pytest.raises(ConfigError, match="did you mean 'task.channel'"):
        load_segment_config(overrides=["task.chanel=DNA"])
    with pytest.raises(ConfigError, match="model.mode"):
        load_segment_config(overrides=["model.mode=partial"])
