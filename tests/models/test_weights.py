"""The one safe torch.load and the one state-dict fit check."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from dinocell.errors import UserError
from dinocell.models.weights import check_state_fits, load_state_checked, load_weights_file, state_mismatch


def test_plain_weights_load(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_weights_file(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_code_is_refused_and_errors_are_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(UserError, match="refusing to load .*weights_only=True"):
        load_weights_file(tmp_path / "evil.ckpt")
    assert not marker.exists()
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="cannot read checkpoint") as e:
        load_weights_file(tmp_path / "cut.ckpt")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="pretrained weights not found"):
        load_weights_file(tmp_path / "nope.pth", "pretrained weights")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="does not hold a state dict"):
        load_weights_file(tmp_path / "list.pt")


def test_fit_check_names_missing_unexpected_and_shapes() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = dict(net.state_dict())
    assert state_mismatch(net.state_dict(), state) == []
    state["0.weight"] = torch.zeros(4, 2)
    state.pop("1.bias")
    state["2.weight"] = torch.zeros(1)
    parts = state_mismatch(net.state_dict(), state)
    assert parts == ["1 missing keys (1.bias)", "1 unexpected keys (2.weight)",
                     "1 shape-mismatched keys (0.weight (4, 2) vs (3, 2))"]
    with pytest.raises(UserError, match=r"weights in x\.pt do not fit the net: 1 missing keys"):
        check_state_fits(net, state, "x.pt", "the net")
    before = net[0].weight.detach().clone()
    with pytest.raises(UserError):
        load_state_checked(net, state, "x.pt")
    assert torch.equal(net[0].weight, before)  # nothing loaded on a mismatch
