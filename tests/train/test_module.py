from __future__ import annotations

import pytest

from dinocell.config import load_config
from dinocell.train.meta_arch import MultiViewDINO
from dinocell.train.module import param_groups


@pytest.fixture(scope="module")
def groups() -> tuple[MultiViewDINO, list[dict]]:
    from tests_tiny import TINY

    cfg = load_config(None, TINY)
    meta = MultiViewDINO(cfg)
    return meta, param_groups(meta, cfg)


def _group_of(groups: list[dict], param) -> dict:
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_no_weight_decay_on_bias_norm_layerscale_tokens(groups) -> None:
    meta, gs = groups
    named = dict(meta.student.named_parameters())
    for name, p in named.items():
        if not p.requires_grad:
            continue
        g = _group_of(gs, p)
        nodecay = name.endswith("bias") or "norm" in name or "gamma" in name or "token" in name
        if nodecay:
            assert g["wd_multiplier"] == 0.0, name
        elif p.ndim == 2 and "weight" in name:
            assert g["wd_multiplier"] == 1.0, name


def test_layerwise_decay_and_patch_embed(groups) -> None:
    meta, gs = groups
    named = dict(meta.student.named_parameters())
    depth = meta.student["backbone"].n_blocks  # 2 in the tiny config
    d = 0.9
    assert _group_of(gs, named["backbone.model.blocks.1.attn.qkv.weight"])["lr_multiplier"] == pytest.approx(d ** 1)
    assert _group_of(gs, named["backbone.model.blocks.0.attn.qkv.weight"])["lr_multiplier"] == pytest.approx(d ** 2)
    pe = _group_of(gs, named["backbone.model.patch_embed.proj.weight"])["lr_multiplier"]
    assert pe == pytest.approx(d ** (depth + 1) * 0.2)
    assert _group_of(gs, named["dino_head.mlp.0.weight"])["lr_multiplier"] == 1.0


def test_last_layer_flagged_and_frozen_norm_excluded(groups) -> None:
    meta, gs = groups
    flagged = [p for g in gs if g["is_last_layer"] for p in g["params"]]
    names = {id(p): n for n, p in meta.student.named_parameters()}
    assert flagged and all("last_layer" in names[id(p)] for p in flagged)
    all_params = {id(p) for g in gs for p in g["params"]}
    frozen = [n for n, p in meta.student.named_parameters() if not p.requires_grad]
    assert frozen and all(id(dict(meta.student.named_parameters())[n]) not in all_params for n in frozen)
