"""Tests for the DINOv3 backbone wrapper: forward, masking, official-weight loading, export folders, old exports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed

from dinocell.config import ModelConfig
from dinocell.errors import ConfigError, DataError, UserError
from dinocell.models.backbone import (
    DinoBackbone,
    build_backbone,
    load_export_backbone,
    load_official_weights,
)

D, DEPTH, HEADS = 64, 2, 2


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(name="vit_small_patch16_dinov3", in_chans=1, patch_size=8, embed_dim=D, depth=DEPTH,
                num_heads=HEADS)
    base.update(kw)
    return ModelConfig(**base)


def randomised(bb: DinoBackbone, seed: int = 0) -> DinoBackbone:
    """Give every parameter O(1) random values: LayerScale's 1e-5 init would hide mis-loaded blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return bb.eval()


def to_official(bb: DinoBackbone, qkv_k_junk: bool = False) -> dict[str, torch.Tensor]:
    """Invert timm's DINOv3 conversion: our module's weights in the layout of Meta's released .pth."""
    out: dict[str, torch.Tensor] = {}
    for k, v in bb.model.state_dict().items():
        v = v.clone()
        if k == "reg_token":
            out["storage_tokens"] = v
        elif k.endswith(".attn.q_bias") or k.endswith(".attn.v_bias"):
            continue  # folded into qkv.bias below
        else:
            out[k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")] = v
    for i, blk in enumerate(bb.model.blocks):
        attn = blk.attn
        zeros = torch.zeros(bb.embed_dim)
        q = attn.q_bias.detach().clone() if attn.q_bias is not None else zeros
        vb = attn.v_bias.detach().clone() if attn.v_bias is not None else zeros
        k_part = torch.full((bb.embed_dim,), 7.0) if qkv_k_junk else zeros  # masked out by bias_mask
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, k_part, vb])
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones_like(zeros), zeros, torch.ones_like(zeros)])
    out["mask_token"] = bb.mask_token.detach().clone()
    out["rope_embed.periods"] = bb.model.rope.periods.clone()
    return out


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------- forward


def test_forward_features_shapes_and_matches_timm(images):
    bb = randomised(build_backbone(tiny_cfg(), img_size=32))
    assert (bb.embed_dim, bb.patch_size, bb.num_prefix_tokens, bb.n_blocks) == (D, 8, 5, DEPTH)
    out = bb.forward_features(images)
    n = (32 // 8) ** 2
    assert out["x_norm_clstoken"].shape == (2, D)
    assert out["x_norm_regtokens"].shape == (2, 4, D)
    assert out["x_norm_patchtokens"].shape == (2, n, D)
    assert out["x_prenorm"].shape == (2, 1 + 4 + n, D)
    # our re-assembled forward equals timm's own forward_features token for token
    ref = bb.model.forward_features(images)
    torch.testing.assert_close(torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"],
                                          out["x_norm_patchtokens"]], 1), ref)
    torch.testing.assert_close(bb(images), ref[:, 0])


@pytest.mark.parametrize("hw", [(16, 16), (64, 64), (32, 48)])
def test_dynamic_image_size(hw):
    bb = build_backbone(tiny_cfg(), img_size=32).eval()
    out = bb.forward_features(torch.rand(1, 1, *hw))
    assert out["x_norm_patchtokens"].shape == (1, (hw[0] // 8) * (hw[1] // 8), D)


def test_bad_input_size_and_channels():
    bb = build_backbone(tiny_cfg(), img_size=32)
    with pytest.raises(DataError, match="not a multiple of the patch size 8"):
        bb.forward_features(torch.rand(1, 1, 30, 32))
    with pytest.raises(DataError, match="expects 1 input channel"):
        bb.forward_features(torch.rand(1, 3, 32, 32))


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown timm model 'vit_nope_dinov3'"):
        build_backbone(tiny_cfg(name="vit_nope_dinov3"))
    with pytest.raises(ConfigError, match="not a DINOv3 ViT"):
        build_backbone(tiny_cfg(name="resnet18"))
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_backbone(tiny_cfg(embed_dim=60, num_heads=2))  # head dim 30
    with pytest.raises(ConfigError, match="must be an integer"):
        build_backbone(tiny_cfg(embed_dim=65, num_heads=2))


def test_training_checkpoint_wrapper_is_unwrapped(tmp_path, images):
    src = randomised(build_backbone(tiny_cfg(), img_size=32))
    official = to_official(src)
    wrapped = {"teacher": {**{f"backbone.{k}": v for k, v in official.items()},
                           "dino_head.mlp.0.weight": torch.zeros(3, 3)}, "iteration": torch.tensor(5)}
    torch.save(wrapped, tmp_path / "train_ckpt.pth")
    dst = build_backbone(tiny_cfg(), img_size=32)
    load_official_weights(dst, tmp_path / "train_ckpt.pth")
    torch.testing.assert_close(dst.eval()(images), src(images))


def test_masked_patches_use_mask_token(images):
    bb = randomised(build_backbone(tiny_cfg(), img_size=32))
    n = 16
    # all patches masked: the output no longer depends on the image at all
    all_masked = torch.ones(2, n, dtype=torch.bool)
    a = bb.forward_features(images, all_masked)["x_prenorm"]
    b = bb.forward_features(torch.rand_like(images), all_masked)["x_prenorm"]
    torch.testing.assert_close(a, b)
    # masking patch 0 makes the output blind to pixels inside patch 0 only
    m = torch.zeros(2, n, dtype=torch.bool)
    m[:, 0] = True
    changed = images.clone()
    changed[:, :, :8, :8] = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(bb.forward_features(images, m)["x_prenorm"],
                               bb.forward_features(changed, m)["x_prenorm"])
    assert not torch.allclose(bb.forward_features(images)["x_prenorm"], bb.forward_features(changed)["x_prenorm"])
    # all-False masks == no masks; and the mask token receives gradient when used
    torch.testing.assert_close(bb.forward_features(images, torch.zeros(2, n, dtype=torch.bool))["x_prenorm"],
                               bb.forward_features(images)["x_prenorm"])
    bb.forward_features(images, m)["x_norm_patchtokens"].sum().backward()
    assert bb.mask_token.grad is not None and bb.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="masks must have shape"):
        bb.forward_features(images, torch.zeros(2, 5, dtype=torch.bool))


def test_activation_checkpointing_same_gradients(images):
    plain = randomised(build_backbone(tiny_cfg(), img_size=32)).train()
    ckpt = build_backbone(tiny_cfg(act_checkpointing=True), img_size=32).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.model.grad_checkpointing
    for bb in (plain, ckpt):
        bb.forward_features(images)["x_norm_patchtokens"].pow(2).mean().backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def test_last_selfattention_reproduces_block_output(images):
    bb = randomised(build_backbone(tiny_cfg(), img_size=32))
    attn_p = bb.get_last_selfattention(images)
    t = 1 + 4 + 16
    assert attn_p.shape == (2, HEADS, t, t)
    torch.testing.assert_close(attn_p.sum(-1), torch.ones(2, HEADS, t))
    # attn @ v -> proj must equal the block's own attention branch
    tok, rope = bb.prepare_tokens(images)
    for blk in bb.model.blocks[:-1]:
        tok = blk(tok, rope=rope)
    last = bb.model.blocks[-1]
    h = last.norm1(tok)
    v = F.linear(h, last.attn.qkv.weight)[..., 2 * D:].reshape(2, t, HEADS, -1).transpose(1, 2)
    mine = last.attn.proj((attn_p @ v).transpose(1, 2).reshape(2, t, D))
    torch.testing.assert_close(mine, last.attn(h, rope=rope), atol=1e-5, rtol=1e-4)


def test_layer_ids():
    bb = build_backbone(tiny_cfg(), img_size=32)
    ids = {n: bb.layer_id(n) for n, _ in bb.named_parameters()}
    assert ids["mask_token"] == 0 and ids["model.patch_embed.proj.weight"] == 0 and ids["model.cls_token"] == 0
    assert ids["model.blocks.1.mlp.fc1.weight"] == 2
    assert ids["model.norm.weight"] == DEPTH + 1


# ------------------------------------------------------------------------------ official weights


def test_official_layout_roundtrip(tmp_path, images):
    src = randomised(build_backbone(tiny_cfg(), img_size=32))
    path = tmp_path / "dinov3_tiny.pth"
    torch.save(to_official(src), path)
    dst = build_backbone(tiny_cfg(), img_size=32)
    report = load_official_weights(dst, path)
    assert report["checkpoint_in_chans"] == 1 and report["checkpoint_patch_size"] == 8
    dst.eval()
    torch.testing.assert_close(dst.mask_token, src.mask_token)
    m = torch.zeros(2, 16, dtype=torch.bool)
    m[:, 3:7] = True
    for key in ("x_prenorm", "x_norm_patchtokens"):
        torch.testing.assert_close(dst.forward_features(images, m)[key], src.forward_features(images, m)[key])
    # via the config, too
    via_cfg = build_backbone(tiny_cfg(pretrained=str(path)), img_size=32).eval()
    torch.testing.assert_close(via_cfg(images), src(images))


def test_official_qkv_bias_masked(tmp_path, images):
    src = randomised(build_backbone(tiny_cfg(name="vit_small_patch16_dinov3_qkvb"), img_size=32))
    assert src.model.blocks[0].attn.q_bias is not None
    path = tmp_path / "qkvb.pth"
    torch.save(to_official(src, qkv_k_junk=True), path)  # non-zero k slot that bias_mask removes
    dst = build_backbone(tiny_cfg(name="vit_small_patch16_dinov3_qkvb"), img_size=32)
    load_official_weights(dst, path)
    torch.testing.assert_close(dst.eval()(images), src(images))
    # non-zero biases cannot go into a model without biases
    with pytest.raises(UserError, match="non-zero qkv biases.*_qkvb"):
        load_official_weights(build_backbone(tiny_cfg(), img_size=32), path)


def test_rgb_checkpoint_into_grey_model_equals_repeated_grey(tmp_path, images):
    src = randomised(build_backbone(tiny_cfg(in_chans=3), img_size=32))
    path = tmp_path / "rgb.pth"
    torch.save(to_official(src), path)
    rgb = build_backbone(tiny_cfg(in_chans=3), img_size=32)
    load_official_weights(rgb, path)
    grey = build_backbone(tiny_cfg(in_chans=1), img_size=32)
    report = load_official_weights(grey, path)
    assert report["checkpoint_in_chans"] == 3
    assert grey.model.patch_embed.proj.weight.shape[1] == 1
    rgb.eval(), grey.eval()
    torch.testing.assert_close(rgb(images.repeat(1, 3, 1, 1)), src(images.repeat(1, 3, 1, 1)))
    torch.testing.assert_close(grey.forward_features(images)["x_prenorm"],
                               rgb.forward_features(images.repeat(1, 3, 1, 1))["x_prenorm"],
                               atol=1e-5, rtol=1e-4)


def test_patch16_checkpoint_into_patch8_model_flexivit(tmp_path):
    src = randomised(build_backbone(tiny_cfg(patch_size=16), img_size=32))
    path = tmp_path / "p16.pth"
    torch.save(to_official(src), path)
    p8 = build_backbone(tiny_cfg(patch_size=8), img_size=32)
    report = load_official_weights(p8, path)
    assert report["checkpoint_patch_size"] == 16
    assert p8.model.patch_embed.proj.weight.shape == (D, 1, 8, 8)
    # FlexiViT: an 8-px patch of the half-size image embeds like the 16-px patch of the full image
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    img = (torch.cos(2 * torch.pi * 1.4 * xx) + torch.sin(2 * torch.pi * 2.2 * yy) + xx * yy)[None, None]
    small = F.interpolate(img, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    w16, w8 = src.model.patch_embed.proj.weight.detach(), p8.model.patch_embed.proj.weight.detach()
    e16 = F.conv2d(img, w16, stride=16)
    e8 = F.conv2d(small, w8, stride=8)
    assert ((e16 - e8).norm() / e16.norm()).item() < 0.2
    # and the kernel is exactly timm's pseudo-inverse resampling (not a plain interpolation)
    torch.testing.assert_close(w8, resample_patch_embed(w16, [8, 8], interpolation="bicubic", antialias=True))


def test_other_architecture_fails_with_key_listing(tmp_path):
    src = randomised(build_backbone(tiny_cfg(depth=3), img_size=32))
    path = tmp_path / "deeper.pth"
    torch.save(to_official(src), path)
    with pytest.raises(UserError, match=r"do not fit .*depth=2.*\d+ unexpected keys \(model\.blocks\.2\."):
        load_official_weights(build_backbone(tiny_cfg(), img_size=32), path)
    wider = tmp_path / "wider.pth"
    torch.save(to_official(randomised(build_backbone(tiny_cfg(embed_dim=128, num_heads=4), img_size=32))), wider)
    with pytest.raises(UserError, match=r"shape-mismatched keys .*\(1, 1, 128\) vs \(1, 1, 64\)"):
        load_official_weights(build_backbone(tiny_cfg(), img_size=32), wider)
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, resnet)
    with pytest.raises(UserError) as ei:
        load_official_weights(build_backbone(tiny_cfg(), img_size=32), resnet)
    msg = str(ei.value)
    assert "\n" not in msg and "missing keys" in msg and ", ..." in msg and "2 unexpected keys" in msg and "not an official DINOv3" in msg


def test_missing_and_malicious_files(tmp_path):
    bb = build_backbone(tiny_cfg(), img_size=32)
    with pytest.raises(UserError, match="pretrained weights not found: .*nope.pth"):
        load_official_weights(bb, tmp_path / "nope.pth")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil.pth"
    torch.save({"cls_token": Evil()}, evil)
    with pytest.raises(UserError, match=r"refusing to load .*evil.pth.*weights_only=True: .*GLOBAL") as ei:
        load_official_weights(bb, evil)
    assert "\n" not in str(ei.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- export


def test_export_folder_roundtrip(tmp_path, images):
    """The one export writer: timm's files plus the mask token and RoPE periods timm does not load, so
    dinocell gets back exactly the backbone it wrote (and a config can continue from the folder)."""
    from dinocell.models.loading import Preprocess, load_model
    from dinocell.models.timm_export import save_timm

    src = randomised(build_backbone(tiny_cfg(), img_size=32))
    with torch.no_grad():
        src.model.rope.periods.mul_(1.01)  # e.g. official bf16 periods: must survive the export
    out = tmp_path / "export" / "backbone"
    assert save_timm(src, out, Preprocess(patch_size=8, crop_size=32, channel_names=["DNA", "ER"])) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dinocell.safetensors", "model.safetensors"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["architecture"] == "vit_small_patch16_dinov3" and conf["model_args"]["embed_dim"] == D
    loaded = load_model(out)
    assert not loaded.backbone.training and loaded.channel_names == ["DNA", "ER"] and loaded.kind == "export"
    assert torch.equal(loaded.backbone.mask_token, src.mask_token)
    assert torch.equal(loaded.backbone.model.rope.periods, src.model.rope.periods)
    m = torch.zeros(2, 16, dtype=torch.bool)
    m[:, :4] = True
    torch.testing.assert_close(loaded.backbone.forward_features(images, m)["x_prenorm"],
                               src.forward_features(images, m)["x_prenorm"])
    # a config pointing at the folder loads it as well (continued pretraining), mask token included
    via_cfg = build_backbone(tiny_cfg(pretrained=str(out)), img_size=32).eval()
    torch.testing.assert_close(via_cfg(images), src(images))
    assert torch.equal(via_cfg.mask_token, src.mask_token)
    with pytest.raises(UserError, match="do not fit"):
        build_backbone(tiny_cfg(depth=3, pretrained=str(out)), img_size=32)
    # a folder of an older `--format timm` export (no dinocell.safetensors) still loads: zero mask token
    (out / "dinocell.safetensors").unlink()
    assert not load_model(out).backbone.mask_token.any()
    torch.testing.assert_close(build_backbone(tiny_cfg(pretrained=str(out)), img_size=32).eval()(images),
                               load_model(out).backbone(images))


def test_old_export_still_loads_and_its_errors(tmp_path, images):
    """Old ``.safetensors`` + JSON sidecar exports are read (never written): rebuilt, or loaded by a config."""
    from loading_fixtures import write_old_export

    src = randomised(build_backbone(tiny_cfg(), img_size=32))
    with torch.no_grad():
        src.model.rope.periods.mul_(1.01)
    out = write_old_export(src, tmp_path / "export" / "backbone.safetensors", {"channels": ["DNA", "ER"]})
    loaded = load_export_backbone(out)
    assert not loaded.training and loaded.sidecar["channels"] == ["DNA", "ER"]
    torch.testing.assert_close(loaded(images), src(images))
    torch.testing.assert_close(build_backbone(tiny_cfg(pretrained=str(out)), img_size=32).eval()(images), src(images))
    with pytest.raises(UserError, match="do not fit"):
        build_backbone(tiny_cfg(depth=3, pretrained=str(out)), img_size=32)
    with pytest.raises(UserError, match="exported backbone not found"):
        load_export_backbone(tmp_path / "none.safetensors")
    Path(f"{out}.json").unlink()
    with pytest.raises(UserError, match="has no sidecar backbone.safetensors.json"):
        load_export_backbone(out)


def test_layerscale_init_override() -> None:
    """DINOv3's LayerScale starts at 1e-5; a from-scratch demo may start it larger."""
    from dinocell.config import load_config

    base = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8"]
    default = build_backbone(load_config(None, base).model, 32)
    assert torch.allclose(default.model.blocks[0].gamma_1, torch.full((32,), 1e-5))
    bigger = build_backbone(load_config(None, base + ["model.layerscale_init=0.1"]).model, 32)
    assert torch.allclose(bigger.model.blocks[1].gamma_2, torch.full((32,), 0.1))


def test_rope_rescale_is_train_mode_only_and_validated() -> None:
    """model.rope_rescale_coords: a random coordinate scale per train-mode forward, none in eval mode."""
    from dinocell.config import ModelConfig
    from dinocell.errors import ConfigError
    from dinocell.models.backbone import build_backbone

    bb = build_backbone(ModelConfig(embed_dim=32, depth=1, num_heads=2, patch_size=8), img_size=32)
    bb.set_rope_rescale(2.0)
    bb.train()
    a, b = bb.model.rope.get_embed(shape=(4, 4)), bb.model.rope.get_embed(shape=(4, 4))
    assert not torch.equal(a, b)
    bb.eval()
    assert torch.equal(bb.model.rope.get_embed(shape=(4, 4)), bb.model.rope.get_embed(shape=(4, 4)))
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(bb(x), bb(x))
    with pytest.raises(ConfigError, match="rope_rescale_coords"):
        bb.set_rope_rescale(0.5)
