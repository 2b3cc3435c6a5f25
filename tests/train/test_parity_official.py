"""Parity with the official DINOv3 training code.

Every reference value below was computed by running the official pure-torch/numpy functions of
facebookresearch/dinov3 at commit 6876159a11b4df116f30f667f8c9888617df0751 on seeded inputs, in a scratch
folder outside this repository (no upstream code is copied here):

* ``dinov3/data/collate.py::collate_data_and_cast`` with ``data/masking.py::MaskingGenerator``
  (mask ratio (0.1, 0.5), mask probability 0.5): total masked patches of a batch;
* ``dinov3/train/cosine_lr_scheduler.py::CosineScheduler`` as ``train/train.py::build_schedulers`` builds the
  teacher-temperature schedule (0.04 -> 0.07 over 30 epochs of 10 iterations);
* ``linear_warmup_cosine_decay`` (the ``gram.loss_weight_schedule``);
* the Gram-teacher refresh condition of ``train/train.py::do_train`` simulated over the iterations;
* ``dinov3/train/param_groups.py::get_params_groups_with_decay`` (weight decay multipliers by name);
* ``dinov3/layers/rope_position_encoding.py::RopePositionEmbedding`` (embed 64, 2 heads, base 100,
  ``rescale_coords=2``, float32) in train mode after ``torch.manual_seed(123)``, and in eval mode, H=3, W=4.
"""

from __future__ import annotations

import pytest
import torch

from dinocell.config import LossConfig, MaskConfig, ModelConfig, OptimConfig
from dinocell.data.masking import collate_multiview
from dinocell.engine.param_groups import no_weight_decay
from dinocell.models.backbone import build_backbone
from dinocell.train import schedules as sched

UPSTREAM = "6876159a11b4df116f30f667f8c9888617df0751"

# (grid side, number of global crops) -> official total of masked patches (upperbound == n_masked_patches)
OFFICIAL_MASKED_TOTAL = {(14, 98): 2900, (14, 64): 1906, (14, 128): 3771, (2, 8): 4, (2, 4): 3, (3, 8): 10,
                         (4, 16): 39}


def _samples(b: int, g: int) -> list[dict]:
    return [{"global_crops": [torch.zeros(1, g, g)] * 2, "local_crops": [], "global_channels": [-1, 0],
             "local_channels": []} for _ in range(b)]


@pytest.mark.parametrize(("grid", "n_crops"), sorted(OFFICIAL_MASKED_TOTAL))
def test_masked_patch_totals_match_official(grid: int, n_crops: int) -> None:
    """torch.linspace semantics: 98 crops of 14x14 give 2900 masked patches (numpy's linspace gave 2901);
    tiny grids mask none where int(N * p) is 0 (we used to force one)."""
    out = collate_multiview(_samples(n_crops // 2, grid * 8), MaskConfig(), patch_size=8, rng=0)
    assert out["n_masked_patches"] == OFFICIAL_MASKED_TOTAL[(grid, n_crops)]


def test_teacher_temperature_warmup_is_not_compressed() -> None:
    """Official: np.linspace(0.04, 0.07, 300) over 30 epochs x 10 iterations, whatever the run length."""
    official = {0: 0.04, 1: 0.04010033444816054, 50: 0.04501672240802676, 100: 0.05003344481605351,
                299: 0.07, 300: 0.07, 1000: 0.07}
    loss = LossConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    sch = sched.from_config(OptimConfig(), loss, steps_per_epoch=10, epochs=5, global_batch=64)  # 50-step run
    for step, value in official.items():
        assert sch.at(step)["teacher_temp"] == pytest.approx(value, rel=1e-12), step
    assert sch.at(49)["teacher_temp"] < 0.0455  # the 50-step run ends early in the warm-up, as upstream


def test_gram_loss_weight_schedule_matches_official() -> None:
    official = [0.0, 0.3333333333, 0.6666666667, 1.0, 1.1464466094, 1.5, 1.8535533906, 2.0]  # (0, 1, 2, 3, 8)
    ours = [sched.gram_weight(s, 8, 1.0, start=0.0, end=2.0, warmup_steps=3) for s in range(8)]
    assert ours == pytest.approx(official, abs=1e-9)
    official = [0.5, 0.4267766953, 0.25, 0.0732233047, 0.0]  # (0.5, 0.5, 0.0, 0, 5)
    assert [sched.gram_weight(s, 5, 0.5, start=0.5, end=0.0) for s in range(5)] == pytest.approx(official, abs=1e-9)


@pytest.mark.parametrize(("first", "every", "cap", "n_iter", "official"), [
    (0, 10, None, 45, [10, 20, 30, 40]),
    (25, 10, 2, 100, [30, 40]),
    (7, 5, 3, 60, [10, 15, 20]),
])
def test_gram_refreshes_match_official_loop(first: int, every: int, cap: int | None, n_iter: int,
                                            official: list[int]) -> None:
    """Upstream refreshes *after* iteration it when (it + 1) qualifies; ours before step it + 1 (same weights)."""
    ours = [s for s in range(1, n_iter + 1) if sched.gram_refresh_due(s, 0, every, first, cap)]
    assert ours == official


def test_weight_decay_rule_matches_official_param_groups() -> None:
    official = {"backbone.cls_token": 1.0, "backbone.storage_tokens": 1.0, "backbone.mask_token": 1.0,
                "backbone.blocks.0.ls1.gamma": 0.0, "backbone.blocks.0.norm1.weight": 0.0,
                "backbone.blocks.0.norm1.bias": 0.0, "backbone.blocks.0.fc.weight": 1.0,
                "backbone.blocks.0.fc.bias": 0.0, "backbone.norm.weight": 0.0, "dino_head.last_layer.weight": 1.0}
    for name, wd in official.items():
        assert (0.0 if no_weight_decay(name) else 1.0) == wd, name


ROPE_TRAIN = {"sin0_0:4": [0.015851, -0.979109, -0.840644, -0.532441], "sin0_8:12": [0.399098, -0.910332,
              -0.901525, -0.590491], "cos11_8:12": [-0.916908, -0.413879, 0.432727, 0.807044]}
ROPE_EVAL = {"sin0_0:4": [0.866025, -0.707577, -0.969849, -0.677886], "sin0_8:12": [1.0, -0.472056, -0.996753,
             -0.743303]}


def _rope_sin_cos(train: bool, rescale: float | None = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    bb = build_backbone(ModelConfig(embed_dim=64, depth=1, num_heads=2, patch_size=8), img_size=32)
    bb.set_rope_rescale(rescale)
    bb.train(train)
    torch.manual_seed(123)
    emb = bb.model.rope.get_embed(shape=(3, 4))
    sin, cos = emb.chunk(2, dim=-1)
    return sin, cos


def test_rope_rescale_matches_official_train_mode_draw() -> None:
    """timm's rope_rescale_coords draws the same single log-uniform factor in [1/2, 2] as dinov3 (same
    RNG order, float32 on the CPU), so seeded train-mode embeddings equal upstream's."""
    sin, cos = _rope_sin_cos(train=True)
    assert sin.shape == (12, 32)
    assert sin[0, :4].tolist() == pytest.approx(ROPE_TRAIN["sin0_0:4"], abs=2e-6)
    assert sin[0, 8:12].tolist() == pytest.approx(ROPE_TRAIN["sin0_8:12"], abs=2e-6)
    assert cos[11, 8:12].tolist() == pytest.approx(ROPE_TRAIN["cos11_8:12"], abs=2e-6)


def test_rope_eval_is_deterministic_and_unscaled() -> None:
    sin, _ = _rope_sin_cos(train=False)
    assert sin[0, :4].tolist() == pytest.approx(ROPE_EVAL["sin0_0:4"], abs=2e-6)
    assert sin[0, 8:12].tolist() == pytest.approx(ROPE_EVAL["sin0_8:12"], abs=2e-6)
    off, _ = _rope_sin_cos(train=True, rescale=None)  # switched off: train mode equals eval
    assert torch.equal(off, sin)


def test_rope_rescale_default_is_the_official_dinov3_value() -> None:
    assert ModelConfig().rope_rescale_coords == 2.0
