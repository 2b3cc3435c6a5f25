"""Cross-channel transfer: fit a classifier on one stain, test it on another.

The practical promise of a channel-invariant encoder is that a read-out trained on images of one
stain keeps working on another (e.g. phenotype annotations made on DNA images applied to Mito).  For
every ordered pair of channels (a, b) we fit on channel a's embeddings of the training fields and test
on channel b's embeddings of *held-out* fields (a deterministic stratified 50/50 split of fields), so
neither the field nor the channel of a test image was seen during fitting.  The diagonal (a == b) is
the ordinary within-channel accuracy, shown for reference but not averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dinocell.errors import DataError
from dinocell.evaluate.probes import knn_accuracy, linear_probe_accuracy, split_train_test


def _prepare(emb: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray,
             train_mask: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    e = (emb.detach().float().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb, np.float32))
    if e.ndim != 3:
        raise DataError(f"expected embeddings (fields, channels, dim), got shape {e.shape}")
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != e.shape[0]:
        raise DataError(f"{e.shape[0]} fields but {y.shape[0]} labels")
    if np.unique(y).size < 2:
        raise DataError("transfer evaluation needs at least two classes")
    if train_mask is None:
        train_mask = split_train_test(y, 0.5, seed)
    train_mask = np.asarray(train_mask, dtype=bool)
    if train_mask.shape != y.shape or train_mask.all() or not train_mask.any():
        raise DataError("the train/test split must leave fields on both sides")
    return e, y, train_mask


def transfer_matrix(
    emb: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray,
    method: str = "knn",
    k: int = 20,
    temperature: float = 0.07,
    train_mask: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """Accuracy of a read-out fitted on channel a (train fields), tested on channel b (test fields).

    ``method``: ``knn`` (weighted kNN, ``k``, ``temperature``) or ``linear`` (logistic regression).
    Returns the mean over a != b (NaN with a single channel) and the (C, C) matrix (rows = fit channel,
    columns = test channel, diagonal = within-channel accuracy).
    """
    if method not in ("knn", "linear"):
        raise ValueError(f"method must be 'knn' or 'linear', got {method!r}")
    e, y, tr = _prepare(emb, labels, train_mask, seed)
    te = ~tr
    c = e.shape[1]
    mat = np.zeros((c, c))
    for a in range(c):
        for b in range(c):
            if method == "knn":
                mat[a, b] = knn_accuracy(e[tr, a], y[tr], e[te, b], y[te], k=k, temperature=temperature)
            else:
                mat[a, b] = linear_probe_accuracy(e[tr, a], y[tr], e[te, b], y[te], seed=seed)
    off = ~np.eye(c, dtype=bool)
    return (float(mat[off].mean()) if c > 1 else math.nan), mat


def transfer_knn(
    emb: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    train_mask: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """Cross-channel kNN transfer (DINO-style weighted kNN): mean accuracy over a != b and the matrix.

    ``train_mask`` (F,) bool selects the fitting fields; default: a deterministic stratified 50/50
    split (:func:`dinocell.evaluate.probes.split_train_test` with ``seed``).
    """
    return transfer_matrix(emb, labels, "knn", k=k, temperature=temperature, train_mask=train_mask, seed=seed)


def transfer_linear(
    emb: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray,
    train_mask: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """Cross-channel transfer with a linear probe (logistic regression) instead of kNN."""
    return transfer_matrix(emb, labels, "linear", train_mask=train_mask, seed=seed)


__all__ = ["transfer_knn", "transfer_linear", "transfer_matrix"]
