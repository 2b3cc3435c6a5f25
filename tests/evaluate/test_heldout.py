"""The one held-out evaluation: the view builder, the dense figures on constructed tokens, and the
summary / ``eval/*`` callback / ``dinocell evaluate`` giving identical figures on one checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinocell.config import ModelConfig
from dinocell.errors import DataError, UserError
from dinocell.evaluate import heldout as H
from dinocell.models.loading import Preprocess


@pytest.fixture(scope="module")
def tiny_backbone():
    from dinocell.models.backbone import build_backbone

    torch.manual_seed(0)
    return build_backbone(ModelConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8, layerscale_init=0.5),
                          img_size=32).eval()


class _Rec:
    def __init__(self, key: str, label: object = None, plate: str = "P") -> None:
        self.key, self.plate = key, plate
        self.metadata = {} if label is None else {"label": label}


class _Src:
    """A FieldSource stand-in: fields built by ``make(i)``; keys in ``bad`` fail like unreadable files."""

    def __init__(self, fields: list[np.ndarray], labels: list[object] | None = None, bad: tuple[int, ...] = ()):
        self.fields = fields
        self.records = [_Rec(f"f{i}", None if labels is None else labels[i]) for i in range(len(fields))]
        self.channels = [f"c{i}" for i in range(fields[0].shape[0])]
        self.fluorescent = [True] * len(self.channels)
        self.bad = {f"f{i}" for i in bad}

    def load(self, rec: _Rec) -> np.ndarray:
        if rec.key in self.bad:
            raise DataError(f"cannot decode {rec.key}")
        return self.fields[int(rec.key[1:])]


def test_view_builder_crops_square_then_resizes() -> None:
    x = np.zeros((2, 8, 16), np.float32)
    x[..., 4:12] = 1.0  # the centred 8x8 square is all ones
    out = H.heldout_input(x, Preprocess(patch_size=2, crop_size=4))
    assert out.shape == (2, 4, 4) and torch.allclose(out, torch.ones(2, 4, 4))
    assert H.input_size(Preprocess(patch_size=8, crop_size=30)) == 32  # rounded to the patch size
    raw = np.stack([np.arange(64, dtype=np.float32).reshape(8, 8)] * 2) * 100
    scaled = H.heldout_input(raw, Preprocess(patch_size=4, crop_size=8), scaled=False)  # the model's scaling
    assert 0.0 <= float(scaled.min()) and float(scaled.max()) <= 1.0 and float(scaled.max()) > 0.9
    with pytest.raises(UserError, match="1-channel model"):
        H.heldout_input(x, Preprocess(in_chans=2, patch_size=2, crop_size=4))


def test_spread_and_labels() -> None:
    assert H.spread_indices(10, None).tolist() == list(range(10))
    assert H.spread_indices(10, 3).tolist() == [0, 4, 9]  # rounded, ends included
    assert H.labels_of([_Rec("a", 1), _Rec("b", 0)]) == [1, 0]
    assert H.labels_of([_Rec("a", 1), _Rec("b", -1)]) is None  # -1: unknown phenotype
    assert H.labels_of([_Rec("a", 1), _Rec("b")]) is None
    named = [_Rec("a"), _Rec("b")]
    named[0].metadata, named[1].metadata = {"Metadata_Label": "x"}, {"Metadata_Label": "w"}
    assert H.labels_of(named) == [1, 0]


def test_patch_figures_identical_tokens_score_one() -> None:
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(3, 1, 16, 8, generator=g).expand(3, 4, 16, 8)  # every channel the same tokens
    f = H.patch_figures(tok)
    assert f["patch_consistency"] == pytest.approx(1.0)
    assert f["patch_retrieval_top1"] == pytest.approx(1.0)
    assert f["patch_chance"] == pytest.approx(1 / 16) and f["patch_fields"] == 3
    assert np.allclose(f["patch_consistency_matrix"], 1.0)


def test_patch_figures_shuffled_locations_score_low() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 64, 16, generator=g)
    perm = torch.roll(torch.arange(64), 1)  # a derangement: no location keeps its token
    tok = torch.stack([a, a[:, perm]], dim=1)  # channel b = channel a with locations shifted
    f = H.patch_figures(tok)
    assert f["patch_retrieval_top1"] == 0.0  # the nearest patch is always the shifted one
    assert abs(f["patch_consistency"]) < 0.1  # unrelated random tokens at each location
    # a constant offset shared by all tokens is removed by centring
    assert H.patch_figures(torch.stack([a, a], 1) + 100.0)["patch_consistency"] == pytest.approx(1.0)


def test_patch_figures_hand_case() -> None:
    # 1 field, 2 channels, 2 locations, 2-D tokens; the mean token is (0.5, 0.5)
    tok = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.2], [0.0, 1.0]]]])
    f = H.patch_figures(tok)
    u = tok - tok.reshape(-1, 2).mean(0)
    cos0 = torch.nn.functional.cosine_similarity(u[0, 0, 0], u[0, 1, 0], dim=0)
    assert f["patch_consistency"] == pytest.approx(float((cos0 + 1.0) / 2))
    assert f["patch_retrieval_top1"] == 1.0
    with pytest.raises(DataError, match=">= 2 channels"):
        H.patch_figures(torch.zeros(1, 1, 2, 2))


def test_heldout_figures_one_channel_keeps_knn_only() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 6)
    emb = (np.array([[5.0, 0.0], [0.0, 5.0]])[y] + 0.1 * rng.standard_normal((12, 2)))[:, None]
    f = H.heldout_figures(torch.as_tensor(emb), y.tolist(), ["DNA"])
    assert f["knn_accuracy"] == 1.0 and f["channel_consistency"] is None and f["transfer_knn_accuracy"] is None
    assert H.primary(f) == ("knn_accuracy", 1.0)
    assert H.primary(H.heldout_figures(torch.as_tensor(emb), None, ["DNA"])) is None


def test_measure_on_identical_channels_and_skips_bad_fields(tiny_backbone) -> None:
    rng = np.random.default_rng(0)
    fields = [np.repeat(rng.random((1, 40, 40), dtype=np.float32), 3, axis=0) for _ in range(6)]
    src = _Src(fields, labels=[0, 1] * 3, bad=(2,))
    fs = H.HeldoutFields(src, Preprocess(patch_size=8, crop_size=32), limit=None)
    res = H.measure(tiny_backbone, fs, batch_size=7)
    f = res.figures
    assert f["n_fields"] == 5 and len(res.skipped) == 1 and "f2" in res.skipped[0]
    assert f["channel_consistency"] == pytest.approx(1.0) and f["cross_channel_retrieval_top1"] == 1.0
    assert f["patch_consistency"] == pytest.approx(1.0) and f["patch_retrieval_top1"] == 1.0
    assert f["patch_chance"] == pytest.approx(1 / 16)
    again = H.measure(tiny_backbone, fs, batch_size=7)  # cached inputs, same numbers
    assert again.figures == f and torch.equal(again.emb, res.emb)
    with pytest.raises(DataError, match="at least 2 readable"):
        H.measure(tiny_backbone, H.HeldoutFields(_Src(fields[:2], bad=(0,)), Preprocess(patch_size=8, crop_size=32)))


def test_dense_subset_is_bounded(tiny_backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(H, "MAX_PATCH_FIELDS", 3)
    rng = np.random.default_rng(1)
    src = _Src([rng.random((2, 32, 32), dtype=np.float32) for _ in range(7)])
    res = H.evaluate_heldout(tiny_backbone, src, preprocess=Preprocess(patch_size=8, crop_size=32))
    assert res.figures["n_fields"] == 7 and res.figures["patch_fields"] == 3
    assert res.figures["transfer_knn_accuracy"] is None  # no labels
