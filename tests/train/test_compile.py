"""``train.compile=true`` compiles blocks in place: names, lr groups and checkpoints do not change."""

from __future__ import annotations

import io

import pytest
import torch

from dinocell.config import load_config
from dinocell.train.meta_arch import MultiViewDINO
from dinocell.train.module import param_groups
from tests_tiny import TINY


def _meta(compiled: bool) -> MultiViewDINO:
    torch.manual_seed(0)
    meta = MultiViewDINO(load_config(None, TINY))
    if compiled:
        meta.compile_blocks(backend="eager")  # dynamo without inductor: fast on CPU, same module tree
    return meta


def _described(meta: MultiViewDINO) -> list[tuple[tuple[str, ...], float, float, bool]]:
    names = {id(p): n for n, p in meta.student.named_parameters()}
    return [(tuple(names[id(p)] for p in g["params"]), g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
            for g in param_groups(meta, meta.cfg)]


def test_param_groups_identical_with_compile_on_and_off() -> None:
    plain, compiled = _meta(False), _meta(True)
    assert all(getattr(b, "_compiled_call_impl", None) is not None
               for b in compiled.student["backbone"].model.blocks)
    groups = _described(plain)
    assert groups == _described(compiled)
    # layer-wise decay really is applied: the blocks get different multipliers
    mults = {lm for names, lm, _, _ in groups if any(".blocks." in n for n in names)}
    assert len(mults) == plain.student["backbone"].n_blocks


def test_state_dict_keys_identical_and_checkpoint_loads_across_the_toggle() -> None:
    plain, compiled = _meta(False), _meta(True)
    assert list(plain.state_dict()) == list(compiled.state_dict())
    with torch.no_grad():  # make the saved weights differ from the fresh ones
        for p in plain.parameters():
            p.add_(0.01)
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    compiled.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = torch.rand(2, 1, 32, 32)
    plain.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled.student["backbone"](x), plain.student["backbone"](x))


def test_wrapped_backbone_is_refused_by_param_groups() -> None:
    meta = _meta(False)
    meta.student["backbone"] = torch.compile(meta.student["backbone"], backend="eager")
    with pytest.raises(AssertionError, match="no layer id"):
        param_groups(meta, meta.cfg)
