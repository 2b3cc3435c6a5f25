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
    assert d0.cfg.data.batch_size == 6 and d1.cfg.data.batch_size == 2  # 6 x 2 / 6 globals
    assert d1.steps_per_epoch == d0.steps_per_epoch
    assert d1.global_batch == 2
    batch = next(iter(d1.train_dataloader()))
    assert batch["global_crops"].shape[0] == 2 * 6
    assert np.all(batch["n_global_crops"] == 6)
