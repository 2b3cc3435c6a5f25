"""Targets, post-processing and sliding-window coverage."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dinocell.segment.config import PostprocessConfig
from dinocell.segment.infer import blend_window, sliding_window
from dinocell.segment.metrics import evaluate_pair
from dinocell.segment.postprocess import instances
from dinocell.segment.targets import distance_map, flow_field, make_targets


def _discs(shape: tuple[int, int], centres: list[tuple[int, int]], r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, dtype=np.uint16)
    for k, (cy, cx) in enumerate(centres, start=1):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return out


def test_distance_map_peaks_at_one_per_object_and_separates_touching() -> None:
    lab = _discs((40, 60), [(20, 15), (20, 29), (20, 45)], 7.5)  # first two touch
    d = distance_map(lab)
    assert d.dtype == np.float32 and d.min() == 0.0
    for k in (1, 2, 3):
        assert d[lab == k].max() == 1.0 and d[lab == k].min() > 0
    assert d[lab == 0].max() == 0.0
    assert d[20, 22] < 0.3  # the valley between the touching discs


def test_make_targets_and_flows() -> None:
    lab = _discs((32, 32), [(16, 16)], 8)
    t = make_targets(lab, flows=True)
    assert t.shape == (4, 32, 32)
    np.testing.assert_array_equal(t[1], (lab > 0).astype(np.float32))
    f = flow_field(t[0])
    assert f[0, 10, 16] > 0.9  # above the centre the distance grows downwards: +dy
    assert f[1, 16, 10] > 0.9


def test_instances_recover_touching_objects_from_ideal_maps() -> None:
    lab = _discs((48, 64), [(20, 15), (20, 29), (35, 50), (8, 52)], 7)
    d = distance_map(lab)
    pred = instances(d, (lab > 0).astype(np.float32), PostprocessConfig())
    assert int(pred.max()) == 4
    assert evaluate_pair(lab, pred)["ap50"] == 1.0


def test_instances_empty_and_min_size() -> None:
    cfg = PostprocessConfig(min_size=30)
    empty = instances(np.zeros((16, 16)), np.zeros((16, 16)), cfg)
    assert empty.max() == 0 and empty.shape == (16, 16)
    lab = _discs((32, 32), [(8, 8)], 2) + _discs((32, 32), [(20, 20)], 6) * 2
    pred = instances(distance_map(lab), (lab > 0).astype(np.float32), cfg)
    assert int(pred.max()) == 1 and pred[20, 20] == 1 and pred[8, 8] == 0


class _Identity(nn.Module):
    """Returns logit(x) so that activate(net(x)) == x: blending must then reproduce the input exactly."""

    n_outputs = 2

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        z = torch.logit(x.clamp(1e-4, 1 - 1e-4))
        return torch.cat([z, -z], 1)


def test_sliding_window_non_square_fields_exact() -> None:
    rng = np.random.default_rng(0)
    for h, w in ((45, 61), (61, 45), (20, 70), (10, 12)):  # 904x1224-like aspect, thin, smaller than a tile
        img = rng.uniform(0.05, 0.95, (h, w)).astype(np.float32)
        net = _Identity()
        out = sliding_window(net, img, tile=16, overlap=0.25, batch_size=5)  # type: ignore[arg-type]
        assert out.shape == (2, h, w)
        np.testing.assert_allclose(out[0], img, atol=1e-4)
        np.testing.assert_allclose(out[1], 1 - img, atol=1e-4)
        assert all(s[-2:] == (16, 16) for s in net.calls)


def test_sliding_window_stack() -> None:
    rng = np.random.default_rng(1)
    imgs = rng.uniform(0.1, 0.9, (3, 30, 50)).astype(np.float32)
    out = sliding_window(_Identity(), imgs, tile=16, overlap=0.5)  # type: ignore[arg-type]
    assert out.shape == (3, 2, 30, 50)
    np.testing.assert_allclose(out[:, 0], imgs, atol=1e-4)


def test_blend_window_centre_heavy() -> None:
    win = blend_window(8, 12)
    assert win.shape == (8, 12) and win.min() > 0
    assert win[4, 6] > win[0, 0]
