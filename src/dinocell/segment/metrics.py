"""Instance segmentation metrics: AP at IoU thresholds as cellpose and StarDist define it.

For one image and a threshold t, predicted and true objects are matched one-to-one so that the number
of pairs with IoU >= t is maximal (Hungarian assignment on the IoU matrix, ``scipy.optimize.
linear_sum_assignment``); then ``AP = TP / (TP + FP + FN)`` and ``F1 = 2TP / (2TP + FP + FN)``
(Stringer et al. 2021, Cellpose; Schmidt et al. 2018, StarDist).  Both empty -> 1 (nothing to find,
nothing found).  Over a set of images the counts are summed before dividing (StarDist's
``by_image=False``), so images with many objects weigh more.

Why not a library: cellpose's ``metrics`` and StarDist's ``matching`` implement exactly this, but
installing either pulls a training stack (cellpose: its GUI/segment_anything deps; StarDist:
TensorFlow + csbdeep) for ~60 lines of scipy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2).tolist())


def _sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    ids, inv = np.unique(np.asarray(labels).ravel(), return_inverse=True)
    if ids.size and ids[0] == 0:
        return inv.reshape(labels.shape), int(ids.size - 1)
    return (inv + 1).reshape(labels.shape), int(ids.size)


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(n_true, n_pred) IoU of every pair of objects (labels need not be consecutive)."""
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    t, nt = _sequential(true)
    p, n_p = _sequential(pred)
    overlap = np.bincount((t * (n_p + 1) + p).ravel(), minlength=(nt + 1) * (n_p + 1)).reshape(nt + 1, n_p + 1)
    area_t, area_p = overlap.sum(1, keepdims=True), overlap.sum(0, keepdims=True)
    union = area_t + area_p - overlap
    iou = overlap / np.maximum(union, 1)
    return iou[1:, 1:]


def true_positives(iou: np.ndarray, threshold: float) -> int:
    """Largest number of one-to-one pairs with IoU >= ``threshold``."""
    if iou.size == 0:
        return 0
    hit = iou >= threshold
    if not hit.any():
        return 0
    # maximise the number of hits; IoU breaks ties (scaled so it never outweighs one hit)
    cost = -(hit.astype(np.float64) + iou / (2.0 * max(iou.shape)))
    rows, cols = linear_sum_assignment(cost)
    return int(hit[rows, cols].sum())


def match_counts(true: np.ndarray, pred: np.ndarray,
                 thresholds: Sequence[float] = THRESHOLDS) -> dict[float, tuple[int, int, int]]:
    """``{threshold: (TP, FP, FN)}`` of one image."""
    iou = iou_matrix(np.asarray(true), np.asarray(pred))
    n_true, n_pred = iou.shape
    out = {}
    for th in thresholds:
        tp = true_positives(iou, th)
        out[float(th)] = (tp, n_pred - tp, n_true - tp)
    return out


def scores(counts: dict[float, tuple[int, int, int]]) -> dict[str, float]:
    """AP50, mean AP over 0.5:0.95 and F1 at 0.5 from summed (TP, FP, FN) counts."""
    def ap(tp: int, fp: int, fn: int) -> float:
        return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)

    def f1(tp: int, fp: int, fn: int) -> float:
        return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)

    aps = [ap(*c) for c in counts.values()]
    c50 = counts[0.5]
    return {"ap50": ap(*c50), "ap": float(np.mean(aps)), "f1_50": f1(*c50),
            "tp50": c50[0], "fp50": c50[1], "fn50": c50[2]}


def sum_counts(per_image: Iterable[dict[float, tuple[int, int, int]]]) -> dict[float, tuple[int, int, int]]:
    """Element-wise sum of per-image counts (dataset-level AP)."""
    total: dict[float, list[int]] = {}
    for counts in per_image:
        for th, c in counts.items():
            acc = total.setdefault(th, [0, 0, 0])
            for k in range(3):
                acc[k] += c[k]
    return {th: (a[0], a[1], a[2]) for th, a in total.items()}


def evaluate_pair(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """AP50, AP 0.5:0.95 and F1@0.5 of one image."""
    return scores(match_counts(true, pred))
