"""Frozen-feature probes: weighted kNN (as in DINO's kNN evaluation) and a linear probe.

kNN follows Wu et al. 2018 (arXiv:1805.01978) as used by DINO (Caron et al. 2021, arXiv:2104.14294,
``eval_knn.py``): features are L2-normalised, the ``k`` nearest training samples by cosine similarity
vote for their class with weight ``exp(cos / T)``, ``T = 0.07``.  No training, no hyper-parameters
beyond ``k``: a direct read-out of how the embedding space is organised.

The linear probe is multinomial logistic regression (scikit-learn) on standardised features, the
usual "is the information linearly decodable" complement to kNN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.errors import DataError


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).detach().float().cpu()


def split_train_test(labels: Sequence[int] | np.ndarray, train_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Deterministic stratified split: a boolean ``train`` mask over samples.

    Within each class the samples are permuted with ``seed`` and the first ``round(n * fraction)`` go to
    training (at least one, and at least one left for testing when the class has two or more), so
    every class is represented on both sides whenever possible.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise DataError("need a non-empty 1-D array of labels to split")
    rng = np.random.default_rng(seed)
    train = np.zeros(y.shape[0], dtype=bool)
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(idx.size)]
        n = int(round(idx.size * train_fraction))
        n = max(1, min(n, idx.size - 1)) if idx.size > 1 else 1
        train[idx[:n]] = True
    return train


@torch.no_grad()
def knn_predict(
    train_x: np.ndarray | torch.Tensor,
    train_y: Sequence[int] | np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    n_classes: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Predicted class per test row by similarity-weighted kNN (cosine, weights ``exp(cos/T)``).

    ``k`` is capped at the number of training samples.  Ties go to the lower class id.
    """
    xtr = F.normalize(_as_tensor(train_x), dim=-1)
    xte = F.normalize(_as_tensor(test_x), dim=-1)
    ytr = torch.as_tensor(np.asarray(train_y)).long().reshape(-1)
    if xtr.shape[0] != ytr.shape[0]:
        raise ValueError(f"{xtr.shape[0]} training features but {ytr.shape[0]} labels")
    if xtr.shape[0] == 0:
        raise DataError("kNN needs at least one training sample")
    if int(ytr.min()) < 0:
        raise ValueError("kNN labels must be non-negative class ids")
    n_cls = int(n_classes if n_classes is not None else int(ytr.max()) + 1)
    kk = max(1, min(int(k), xtr.shape[0]))
    preds = []
    for i in range(0, xte.shape[0], chunk):
        sim = xte[i:i + chunk] @ xtr.T
        top_sim, top_idx = sim.topk(kk, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], n_cls)
        votes.scatter_add_(1, ytr[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def knn_accuracy(
    train_x: np.ndarray | torch.Tensor,
    train_y: Sequence[int] | np.ndarray,
    test_x: np.ndarray | torch.Tensor,
    test_y: Sequence[int] | np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` on ``(test_x, test_y)``."""
    ty = np.asarray(test_y).reshape(-1)
    if ty.size == 0:
        raise DataError("kNN evaluation needs at least one test sample")
    n_cls = int(max(np.max(np.asarray(train_y)), np.max(ty))) + 1
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, n_classes=n_cls)
    return float((pred == ty).mean())


def linear_probe_accuracy(
    train_x: np.ndarray | torch.Tensor,
    train_y: Sequence[int] | np.ndarray,
    test_x: np.ndarray | torch.Tensor,
    test_y: Sequence[int] | np.ndarray,
    c: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
) -> float:
    """Accuracy of L2-regularised multinomial logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ytr = np.asarray(train_y).reshape(-1)
    yte = np.asarray(test_y).reshape(-1)
    if np.unique(ytr).size < 2:
        raise DataError("a linear probe needs at least two classes in the training split")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    clf.fit(_as_tensor(train_x).numpy(), ytr)
    return float((clf.predict(_as_tensor(test_x).numpy()) == yte).mean())


__all__ = ["knn_accuracy", "knn_predict", "linear_probe_accuracy", "split_train_test"]
