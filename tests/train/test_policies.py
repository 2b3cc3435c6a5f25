"""Every view policy through one tiny training step, cross-channel iBOT routing, batch scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinocell.config import load_config
from dinocell.data.masking import collate_multiview
from dinocell.data.sources import open_source
from dinocell.data.views import MultiViewAugmentation, crop_scaled_batch_size
from dinocell.errors import ConfigError
from dinocell.losses.ibot_cross import CrossChannelIBOTLoss
from dinocell.train.datamodule import DinoCellDataModule
from dinocell.train.meta_arch import MultiViewDINO

FLUO = [True] * 5

POLICIES = [
    (["data.views.policy=multiview"], 2),
    (["data.views.policy=single_view"], 2),
    (["data.views.policy=multiview", "data.views.aligned_globals=true"], 2),
    (["data.views.policy=channel_pairs"], 2),
    (["data.views.policy=channel_pairs", "data.views.mean_global=true", "data.views.aligned_globals=true",
      "loss.ibot_cross_channel=true"], 3),
    (["data.views.policy=all_channels"], 6),
    (["data.views.policy=all_channels", "loss.ibot_cross_channel=true"], 6),
]


def _batch(cfg, b: int = 3, seed: int = 0) -> dict:
    aug = MultiViewAugmentation(cfg.data.views, FLUO)
    g = torch.Generator().manual_seed(seed)
    fields = torch.rand(b, 5, 64, 64, generator=g)
    samples = [aug(f, generator=g) for f in fields]
    return collate_multiview(samples, cfg.data.mask, cfg.model.patch_size, rng=seed)


@pytest.mark.parametrize(("overrides", "n_global"), POLICIES)
def test_policy_runs_one_training_step(tiny_overrides: list[str], overrides: list[str], n_global: int) -> None:
    cfg = load_config(None, [*tiny_overrides, "data.mask.mask_sample_probability=1.0", *overrides])
    torch.manual_seed(0)
    model = MultiViewDINO(cfg)
    batch = _batch(cfg)
    b = 3
    assert batch["n_global_crops"] == n_global
    assert batch["global_crops"].shape == (n_global * b, 1, 32, 32)
    assert batch["local_crops"].shape[0] == cfg.data.views.n_local_crops * b
    out = model(batch, teacher_temp=0.04)
    assert out["_teacher_probs"].shape == (n_global, b, cfg.head.prototypes)
    assert out["_teacher_logits"].shape == (n_global, b, cfg.head.prototypes)
    for key in ("dino", "ibot", "koleo", "total"):
        assert torch.isfinite(out[key]), key
    assert out["ibot"].item() > 0
    out["total"].backward()
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)


def test_cross_channel_ibot_routes_targets_across_crops(tiny_overrides: list[str], monkeypatch) -> None:
    cfg = load_config(None, [*tiny_overrides, "data.views.policy=all_channels", "loss.ibot_cross_channel=true",
                             "data.mask.mask_sample_probability=1.0"])
    model = MultiViewDINO(cfg)
    batch = _batch(cfg)
    seen = {}
    original = CrossChannelIBOTLoss.__call__

    def spy(self, s, t, w, n_images, pairing):
        seen["pairing"], seen["rows"], seen["n_images"] = pairing.clone(), t.shape[0], n_images
        return original(self, s, t, w, n_images, pairing)

    monkeypatch.setattr(CrossChannelIBOTLoss, "__call__", spy)
    out = model(batch, teacher_temp=0.04)
    g = 6
    assert seen["n_images"] == g * 3
    assert seen["rows"] == batch["n_masked_patches"] and seen["rows"] % g == 0
    p = seen["pairing"]
    assert p.shape == (g, g)
    assert torch.all(p.diagonal() == 0)
    assert torch.allclose(p.sum(1), torch.ones(g))
    # the cross-channel loss differs from plain iBOT on the same batch and weights
    plain = load_config(None, [*tiny_overrides, "data.views.policy=all_channels",
                               "data.mask.mask_sample_probability=1.0"])
    model2 = MultiViewDINO(plain)
    model2.load_state_dict(model.state_dict())
    assert not torch.allclose(model2(batch, teacher_temp=0.04)["ibot"], out["ibot"])


def test_plain_ibot_when_cross_channel_is_off(tiny_overrides: list[str], monkeypatch) -> None:
    cfg = load_config(None, [*tiny_overrides, "data.views.policy=all_channels"])
    model = MultiViewDINO(cfg)
    assert model.ibot_cross is None

    def boom(*_a, **_k):
        raise AssertionError("cross-channel iBOT called while off")

    monkeypatch.setattr(CrossChannelIBOTLoss, "__call__", boom)
    assert torch.isfinite(model(_batch(cfg), teacher_temp=0.04)["ibot"])


@pytest.mark.parametrize("overrides", [
    ["loss.ibot_cross_channel=true"],
    ["loss.ibot_cross_channel=true", "data.views.policy=channel_pairs"],
    ["loss.ibot_cross_channel=true", "data.views.policy=single_view", "data.views.aligned_globals=true"],
])
def test_cross_channel_ibot_config_errors(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match="ibot_cross_channel"):
        load_config(None, overrides)


def test_crop_scaled_batch_size() -> None:
    assert crop_scaled_batch_size(64, 2) == 64
    assert crop_scaled_batch_size(64, 6) == 21
    assert crop_scaled_batch_size(64, 3) == 42
    assert crop_scaled_batch_size(1, 6) == 1


def test_datamodule_scales_the_batch_and_keeps_the_step_count(tiny_overrides: list[str]) -> None:
    over = [*tiny_overrides, "data.synthetic.n_fields=48", "data.batch_size=6", "data.views.policy=all_channels"]
    base = load_config(None, over)
    scaled = load_config(None, [*over, "data.views.scale_batch_to_crops=true"])
    source = open_source(base.data)
    d0, d1 = DinoCellDataModule(base, source), DinoCellDataModule(scaled, source)
    assert d0.batch_size == 6 and d1.batch_size == 2  # 6 x 2 / 6 globals
    assert d1.cfg.data.batch_size == 6  # one value: the config keeps what the user set
    assert d1.steps_per_epoch == d0.steps_per_epoch
    assert d1.global_batch == 2
    batch = next(iter(d1.train_dataloader()))
    assert batch["global_crops"].shape[0] == 2 * 6
    assert np.all(batch["n_global_crops"] == 6)


@pytest.mark.parametrize("mode", ["ibot", "cosine"])
def test_dense_cross_switch_changes_the_training_loss(tiny_overrides: list[str], mode: str) -> None:
    # RoPE rescaling draws a random factor per forward: off, so the two models see the same geometry
    over = [*tiny_overrides, "data.views.aligned_globals=true", "data.mask.mask_sample_probability=0.0",
            "model.rope_rescale_coords=null"]
    off = load_config(None, over)
    on = load_config(None, [*over, "loss.dense_cross_weight=0.5", f"loss.dense_cross_mode={mode}"])
    torch.manual_seed(0)
    model_off = MultiViewDINO(off)
    model_on = MultiViewDINO(on)
    model_on.load_state_dict(model_off.state_dict())
    assert model_off.dense_cross is None and model_on.dense_cross is not None
    batch = _batch(on)
    assert batch["mask_indices"].numel() == 0  # nothing masked: iBOT is silent, the dense term is not
    out_off, out_on = model_off(batch, teacher_temp=0.04), model_on(batch, teacher_temp=0.04)
    assert out_off["dense_cross"].item() == 0.0 and out_on["ibot"].item() == 0.0
    assert out_on["dense_cross"].item() > 0
    assert torch.allclose(out_on["total"], out_off["total"] + 0.5 * out_on["dense_cross"])
    out_on["total"].backward()
    blocks = model_on.student["backbone"].model.blocks
    grads = [p.grad for p in blocks.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    head_grad = model_on.student["ibot_head"].mlp[0].weight.grad if mode == "ibot" else None
    assert mode == "cosine" or (head_grad is not None and head_grad.abs().sum() > 0)


def test_dense_cross_targets_are_the_other_crop_at_every_position(tiny_overrides: list[str], monkeypatch) -> None:
    from dinocell.losses.dense_cross import DenseCrossChannelLoss

    cfg = load_config(None, [*tiny_overrides, "data.views.policy=all_channels", "loss.dense_cross_weight=1.0"])
    model = MultiViewDINO(cfg)
    batch = _batch(cfg)
    seen = {}
    original = DenseCrossChannelLoss.ibot

    def spy(self, s, t, pairing):
        seen["s"], seen["t"], seen["pairing"] = s.shape, t.shape, pairing.clone()
        return original(self, s, t, pairing)

    monkeypatch.setattr(DenseCrossChannelLoss, "ibot", spy)
    model(batch, teacher_temp=0.04)
    n_patches = (32 // cfg.model.patch_size) ** 2
    assert seen["s"] == seen["t"] == (6, 3, n_patches, cfg.head.prototypes)
    assert torch.all(seen["pairing"].diagonal() == 0)


@pytest.mark.parametrize(("overrides", "match"), [
    (["loss.dense_cross_weight=1.0"], "aligned"),
    (["loss.dense_cross_weight=1.0", "data.views.policy=single_view", "data.views.aligned_globals=true"],
     "channel views"),
    (["loss.dense_cross_weight=-1"], ">= 0"),
    (["loss.dense_cross_mode=l2"], "dense_cross_mode"),
])
def test_dense_cross_config_errors(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_single_channel_inputs_are_covered_by_the_policies() -> None:
    """IC-ViT-style single-channel sampling: every crop is one stain (or the mean), in_chans=1, and
    ``channel_pairs`` trains on two single stains with no mean anchor at all."""
    cfg = load_config(None, ["data.views.policy=channel_pairs", "data.views.global_crop_size=32",
                             "data.views.n_local_crops=2", "data.views.local_crop_size=16"])
    assert cfg.model.in_chans == 1
    aug = MultiViewAugmentation(cfg.data.views, FLUO)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        out = aug(torch.rand(5, 64, 64, generator=g), generator=g)
        assert all(c.shape[0] == 1 for c in out["global_crops"] + out["local_crops"])
        assert all(ch >= 0 for ch in out["global_channels"])
