"""kNN / linear probes and cross-channel transfer on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from dinocell.errors import DataError
from dinocell.evaluate import probes
from dinocell.evaluate.transfer import transfer_knn, transfer_linear, transfer_matrix

E = np.eye(3)


def test_knn_weighting_by_temperature() -> None:
    v = np.array([0.8, 0.6, 0.0])  # cos 0.8 with e1
    train = np.stack([E[0], v, v])
    y = [0, 1, 1]
    # T=0.07: exp(1/.07) > 2 exp(.8/.07) -> class 0; T=10: exp(.1) < 2 exp(.08) -> class 1
    assert probes.knn_predict(train, y, E[:1], k=3, temperature=0.07).tolist() == [0]
    assert probes.knn_predict(train, y, E[:1], k=3, temperature=10.0).tolist() == [1]
    assert probes.knn_predict(train, y, E[:1], k=1).tolist() == [0]
    assert probes.knn_predict(train, y, E[:1], k=50, temperature=10.0).tolist() == [1]  # k capped at 3


def test_knn_accuracy_and_errors() -> None:
    assert probes.knn_accuracy(E[:2], [0, 1], E[:2], [0, 1], k=1) == 1.0
    assert probes.knn_accuracy(E[:2], [0, 1], E[:2], [1, 0], k=1) == 0.0
    with pytest.raises(ValueError, match="labels"):
        probes.knn_predict(E, [0, 1], E)


def test_split_train_test_is_stratified_and_deterministic() -> None:
    y = np.array([0] * 6 + [1] * 4 + [2] * 2)
    m = probes.split_train_test(y, 0.5, seed=3)
    assert m.dtype == bool and m.sum() == 6
    for c, n in ((0, 3), (1, 2), (2, 1)):
        assert m[y == c].sum() == n
    assert np.array_equal(m, probes.split_train_test(y, 0.5, seed=3))
    with pytest.raises(DataError, match="non-empty"):
        probes.split_train_test([])


def test_linear_probe_separable() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 0.5, (20, 4)), rng.normal(2, 0.5, (20, 4))])
    y = np.array([0] * 20 + [1] * 20)
    assert probes.linear_probe_accuracy(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    with pytest.raises(DataError, match="two classes"):
        probes.linear_probe_accuracy(x[:10], y[:10], x, y)


def _transfer_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """F=4 fields, C=2 channels; train fields 0, 2 (labels 0, 1), test fields 1, 3 (labels 0, 1)."""
    emb = np.zeros((4, 2, 3))
    emb[0, 0], emb[2, 0] = E[0], E[1]  # channel a, train
    emb[1, 0], emb[3, 0] = E[0], E[1]  # channel a, test: both right
    emb[0, 1], emb[2, 1] = E[0], E[1]  # channel b, train
    emb[1, 1], emb[3, 1] = E[0], E[0]  # channel b, test: field 3 looks like class 0
    return emb, np.array([0, 0, 1, 1]), np.array([True, False, True, False])


def test_transfer_knn_hand_case() -> None:
    emb, y, tr = _transfer_case()
    acc, mat = transfer_knn(emb, y, k=20, train_mask=tr)
    # fit a -> test b: 1/2; fit b -> test a: 2/2; diagonals a->a 1, b->b 1/2
    assert mat.tolist() == [[1.0, 0.5], [1.0, 0.5]]
    assert acc == pytest.approx(0.75)


def test_transfer_default_split_and_linear() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    centres = rng.normal(0, 3, (3, 16))
    emb = centres[y][:, None, :] + 0.3 * rng.standard_normal((30, 3, 16))  # same class geometry on all channels
    acc, mat = transfer_knn(emb, y)
    assert acc == 1.0 and mat.shape == (3, 3)
    lin, lmat = transfer_linear(emb, y)
    assert lin == 1.0 and lmat.shape == (3, 3)


def test_transfer_errors() -> None:
    emb, y, _ = _transfer_case()
    with pytest.raises(DataError, match="two classes"):
        transfer_knn(emb, np.zeros(4, dtype=int))
    with pytest.raises(DataError, match="4 fields but 3 labels"):
        transfer_knn(emb, [0, 1, 1])
    with pytest.raises(DataError, match="both sides"):
        transfer_knn(emb, y, train_mask=np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="method"):
        transfer_matrix(emb, y, method="svm")
