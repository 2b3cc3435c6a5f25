"""Input scale from object size, feature_blocks, drop_border_objects, and their config keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinocell.config import ModelConfig
from dinocell.errors import ConfigError
from dinocell.models.loading import load_model
from dinocell.segment import predict as predict_mod
from dinocell.segment.config import SegModelConfig, load_segment_config
from dinocell.segment.model import SegmentationNet, take_indices
from dinocell.segment.postprocess import drop_border_objects
from dinocell.segment.scale import auto_scale, field_px, median_diameter, resolve_scale, scaled_post

ARCH = ModelConfig(patch_size=8, embed_dim=32, depth=3, num_heads=2)


def _disks(n: int, r: float, size: int = 200) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    lab = np.zeros((size, size), np.int32)
    for k in range(n):
        cy, cx = 30 + 45 * (k // 4), 30 + 45 * (k % 4)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k + 1
    return lab


def test_median_diameter_and_auto_scale() -> None:
    d = median_diameter([_disks(8, 20.0), _disks(4, 20.0)])
    assert d == pytest.approx(40.0, rel=0.03)
    assert median_diameter([np.zeros((4, 4), np.int32)]) is None
    # 40-px objects, 8-px patches, 2.5 patches across -> 20 px -> scale 0.5
    assert auto_scale(d, 8, 2.5) == pytest.approx(0.5, rel=0.03)
    assert auto_scale(None, 8, 2.5) == 1.0
    assert auto_scale(1.0, 16, 3.0) == 4.0  # clamped
    cfg = load_segment_config()
    assert cfg.model.input_scale == "auto"
    assert resolve_scale(cfg.model, 40.0, 8) == pytest.approx(0.5)
    assert resolve_scale(load_segment_config(None, ["model.input_scale=1.5"]).model, 40.0, 8) == 1.5
    # sizes in network pixels become field pixels
    assert field_px(64, 0.5) == 128 and field_px(64, 2.0) == 32
    post = scaled_post(cfg.post, 0.5)
    assert post.min_distance == 2 * cfg.post.min_distance and post.smooth_sigma == 2 * cfg.post.smooth_sigma
    assert scaled_post(cfg.post, 1.0) is cfg.post


@pytest.mark.parametrize(("item", "match"), [("model.input_scale=big", "'auto' or a number"),
                                             ("model.input_scale=0", "'auto' or a number"),
                                             ("model.object_patches=0", "object_patches"),
                                             ("model.feature_blocks=[]", "at least one block")])
def test_bad_scale_keys(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_segment_config(None, [item])


def test_feature_blocks_feed_chosen_blocks() -> None:
    bb = load_model(None, arch=ARCH).backbone
    assert take_indices(SegModelConfig(blocks=2), 3) == [1, 2]
    assert take_indices(SegModelConfig(feature_blocks=[0, -1]), 3) == [0, 2]
    with pytest.raises(ConfigError, match="feature_blocks.*0..2"):
        take_indices(SegModelConfig(feature_blocks=[3]), 3)
    cfg = load_segment_config(None, ["model.feature_blocks=[0,2]", "model.neck_dim=16", "model.decoder_dim=8"])
    assert cfg.model.feature_blocks == [0, 2]
    net = SegmentationNet(bb, cfg.model)
    x = torch.rand(1, 1, 32, 32)
    feats = net.features(x)
    assert feats.shape == (1, 2 * 32, 4, 4) and net.neck[0].in_channels == 64
    last2 = SegmentationNet(bb, SegModelConfig(blocks=2, neck_dim=16, decoder_dim=8)).features(x)
    assert torch.equal(feats[:, 32:], last2[:, 32:])  # block 2 in both
    assert not torch.allclose(feats[:, :32], last2[:, :32])  # block 0 is not block 1
    assert net(x).shape == (1, 2, 32, 32)


def test_drop_border_objects() -> None:
    lab = np.zeros((20, 20), np.uint16)
    lab[0:4, 5:9] = 1  # touches the top edge
    lab[8:12, 8:12] = 2
    lab[15:20, 15:20] = 3  # touches the corner
    out = drop_border_objects(lab)
    assert out.max() == 1 and (out > 0).sum() == 16 and out.dtype == np.uint16
    assert drop_border_objects(np.zeros((4, 4), np.uint16)).max() == 0


@pytest.mark.parametrize("drop", [False, True])
def test_evaluate_drops_border_objects_on_both_sides(drop: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A predictor that leaves out edge objects (as predict does with the switch on) scores 1.0 when the
    truth drops them too; without the switch those truth objects count as misses."""
    from dinocell.config import DataConfig, SyntheticConfig
    from dinocell.data.sources import open_source

    cfg = load_segment_config(None, [f"task.drop_border_objects={str(drop).lower()}"])
    src = open_source(DataConfig(synthetic=SyntheticConfig(n_fields=2, size=64, n_plates=1, wells_per_plate=4,
                                                           sites_per_well=1)))
    truths = iter([src.generator.field_and_masks(i)[1]["nuclei"] for i in range(2)])

    def fake_segment(net: object, stack: np.ndarray, c: object) -> list[np.ndarray]:
        pred = drop_border_objects(next(truths).astype(np.uint32))
        return [pred for _ in stack]

    monkeypatch.setattr(predict_mod, "segment_image", fake_segment)
    res = predict_mod.evaluate_net(None, cfg, src, "synthetic", channels=["DNA"])  # type: ignore[arg-type]
    s = res["channels"]["DNA"]
    if drop:
        assert s["ap50"] == 1.0 and s["fn50"] == 0
    else:
        assert s["fn50"] > 0 and s["ap50"] < 1.0


def test_segment_image_drops_border_objects() -> None:
    from dinocell.segment.infer import segment_image

    cfg = load_segment_config(None, ["task.drop_border_objects=true", "model.input_scale=1", "infer.tile=32",
                                     "post.foreground_threshold=0.0", "model.neck_dim=16", "model.decoder_dim=8"])
    net = SegmentationNet(load_model(None, arch=ARCH).backbone, cfg.model)
    img = np.random.default_rng(0).random((48, 48), dtype=np.float32)

    def edge(lab: np.ndarray) -> np.ndarray:
        return np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])

    assert not edge(segment_image(net, img, cfg)).any()
    cfg.task.drop_border_objects = False
    assert edge(segment_image(net, img, cfg)).any()  # the same maps do have edge objects


def test_scale_override_at_predict_time_rescales_the_model() -> None:
    from dinocell.segment.run import apply_overrides

    cfg = load_segment_config(None, ["model.input_scale=0.5", "model.neck_dim=16", "model.decoder_dim=8"])
    net = SegmentationNet(load_model(None, arch=ARCH).backbone, cfg.model)
    assert net.input_scale == 0.5
    assert apply_overrides(net, cfg, []) is cfg
    cfg2 = apply_overrides(net, cfg, ["model.input_scale=1", "task.drop_border_objects=true"])
    assert net.input_scale == 1.0 and cfg2.task.drop_border_objects
