"""Channel consistency, cross-channel retrieval and channel embeddings on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinocell.config import ModelConfig
from dinocell.errors import DataError
from dinocell.evaluate import consistency as cons
from dinocell.models.encode import encode_features


@pytest.fixture(scope="module")
def tiny_backbone():
    from dinocell.models.backbone import build_backbone

    torch.manual_seed(0)
    return build_backbone(ModelConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8), img_size=32).eval()


def test_channel_consistency_hand_case() -> None:
    emb = np.array([[[1.0, 0.0], [1.0, 0.0]],
                    [[0.0, 1.0], [1.0, 1.0]]])
    raw, mat = cons.channel_consistency(emb, centre=False)
    assert raw == pytest.approx((1.0 + 1 / math.sqrt(2)) / 2)
    assert mat.shape == (2, 2)
    assert mat[0, 1] == pytest.approx(mat[1, 0]) and mat[0, 0] == pytest.approx(1.0)
    # centred: the mean over all 4 vectors is (0.75, 0.5)
    f1a, f1b = np.array([-0.75, 0.5]), np.array([0.25, 0.5])
    c1 = f1a @ f1b / (np.linalg.norm(f1a) * np.linalg.norm(f1b))
    centred, _ = cons.channel_consistency(emb, centre=True)
    assert centred == pytest.approx((1.0 + c1) / 2)
    assert c1 == pytest.approx(0.1240, abs=1e-4)


def test_centring_exposes_collapse() -> None:
    rng = np.random.default_rng(0)
    collapsed = np.tile(rng.standard_normal(8), (10, 3, 1)) + 1e-6 * rng.standard_normal((10, 3, 8))
    raw, _ = cons.channel_consistency(collapsed, centre=False)
    centred, _ = cons.channel_consistency(collapsed, centre=True)
    assert raw == pytest.approx(1.0, abs=1e-6)
    assert abs(centred) < 0.3  # only noise left
    invariant = np.repeat(rng.standard_normal((10, 1, 8)), 3, axis=1)  # channels identical per field
    assert cons.channel_consistency(invariant, centre=True)[0] == pytest.approx(1.0)


def test_cross_channel_retrieval_hand_case() -> None:
    e = np.eye(3)
    a = e
    b = np.stack([e[0], e[1], e[1] + 0.1 * e[2]])
    emb = np.stack([a, b], axis=1)  # (F=3, C=2, D=3)
    # a->b: all three hit; b->a: field 2's query (0, 1, .1) is closest to a's field 1 -> miss
    assert cons.cross_channel_retrieval(emb, centre=False) == pytest.approx(5 / 6)
    acc, mat = cons.cross_channel_retrieval_matrix(emb, centre=False)
    assert mat[0, 1] == pytest.approx(1.0) and mat[1, 0] == pytest.approx(2 / 3)
    assert math.isnan(mat[0, 0])


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(DataError, match="at least 2 channels"):
        cons.channel_consistency(np.zeros((4, 1, 8)))
    with pytest.raises(DataError, match="fields, channels, dim"):
        cons.cross_channel_retrieval(np.zeros((4, 8)))


def test_pair_table_lists_off_diagonal() -> None:
    rows = cons.pair_table(np.array([[1, 0.2], [0.3, 1]]), ["DNA", "ER"])
    assert rows == [{"a": "DNA", "b": "ER", "value": 0.2}, {"a": "ER", "b": "DNA", "value": 0.3}]


def test_channel_embeddings_match_direct_encoding(tiny_backbone) -> None:
    g = torch.Generator().manual_seed(1)
    fields = torch.rand(3, 3, 30, 30, generator=g)
    fluo = [True, False, True]
    emb = cons.channel_embeddings(tiny_backbone, fields, fluo, crop_size=30, batch_size=4)
    assert emb.shape == (3, 4, 32)

    def enc(img: torch.Tensor) -> torch.Tensor:  # (F, H, W) -> (F, D), resized 30 -> 32
        x = F.interpolate(img[:, None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return encode_features(tiny_backbone, x)

    for c in range(3):
        assert torch.allclose(emb[:, c], enc(fields[:, c]), atol=1e-5)
    mean_img = (fields[:, 0] + fields[:, 2]) / 2  # brightfield channel 1 excluded
    assert torch.allclose(emb[:, 3], enc(mean_img), atol=1e-5)


def test_channel_embeddings_errors(tiny_backbone) -> None:
    with pytest.raises(DataError, match="fluorescent flags"):
        cons.channel_embeddings(tiny_backbone, torch.rand(1, 2, 16, 16), [True])
    with pytest.raises(DataError, match="at least one fluorescent"):
        cons.channel_embeddings(tiny_backbone, torch.rand(1, 2, 16, 16), [False, False])
