"""AP / F1 with one-to-one matching on hand-made label images."""

from __future__ import annotations

import numpy as np
import pytest

from dinocell.segment.metrics import (
    THRESHOLDS,
    evaluate_pair,
    iou_matrix,
    match_counts,
    scores,
    sum_counts,
    true_positives,
)


def _squares(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint16)
    for k, (y0, x0, y1, x1) in enumerate(boxes, start=1):
        out[y0:y1, x0:x1] = k
    return out


TRUTH = _squares((40, 40), [(2, 2, 12, 12), (2, 20, 12, 30), (20, 5, 30, 15)])


@pytest.mark.parametrize("rows,hits", [(19, 10), (14, 5), (10, 1), (9, 0)])
def test_ap_is_the_mean_over_iou_0_5_to_0_95_inclusive(rows: int, hits: int) -> None:
    """A 20x10 truth against a rows x 10 prediction inside it: IoU rows/20 is a hit at every threshold up to
    it, edges included (0.95 and 0.5 exactly), so mean AP counts the hits among the ten COCO thresholds."""
    truth = _squares((24, 12), [(2, 1, 22, 11)])
    pred = _squares((24, 12), [(2, 1, 2 + rows, 11)])
    counts = match_counts(truth, pred)
    assert sorted(counts) == list(THRESHOLDS)
    assert sum(tp for tp, _, _ in counts.values()) == hits
    s = scores(counts)
    assert s["ap"] == pytest.approx(hits / 10) and s["ap50"] == (1.0 if hits else 0.0)


def test_perfect() -> None:
    s = evaluate_pair(TRUTH, TRUTH)
    assert s["ap50"] == 1.0 and s["ap"] == 1.0 and s["f1_50"] == 1.0


def test_labels_need_not_match_or_be_consecutive() -> None:
    pred = np.where(TRUTH > 0, TRUTH * 7 + 100, 0)
    assert evaluate_pair(TRUTH, pred)["ap"] == 1.0


def test_shifted() -> None:
    # 10x10 squares shifted by 2 px: IoU = 80 / 120 = 0.667 -> a hit at 0.5 and 0.65, a miss from 0.7
    pred = _squares((40, 40), [(2, 4, 12, 14), (2, 22, 12, 32), (20, 7, 30, 17)])
    iou = iou_matrix(TRUTH, pred)
    assert iou.shape == (3, 3)
    np.testing.assert_allclose(np.diag(iou), 80 / 120)
    counts = match_counts(TRUTH, pred)
    assert counts[0.5] == (3, 0, 0) and counts[0.65] == (3, 0, 0) and counts[0.7] == (0, 3, 3)
    s = scores(counts)
    assert s["ap50"] == 1.0
    assert s["ap"] == pytest.approx((4 * 1.0 + 6 * 0.0) / 10)  # hits at 0.5..0.65, then AP 0/(0+3+3)


def test_merged() -> None:
    # two true objects covered by one prediction: at most one match, IoU 100/ (2*100 + 80 bridge) < 0.5
    truth = _squares((20, 40), [(0, 0, 10, 10), (0, 14, 10, 24)])
    pred = _squares((20, 40), [(0, 0, 10, 24)])
    c = match_counts(truth, pred)[0.5]
    assert c == (0, 1, 2)
    assert evaluate_pair(truth, pred)["ap50"] == 0.0
    # a merge that still overlaps one object by more than half of the union
    pred2 = _squares((20, 40), [(0, 0, 10, 13)])
    assert match_counts(truth, pred2)[0.5] == (1, 0, 1)
    assert evaluate_pair(truth, pred2)["ap50"] == pytest.approx(0.5)


def test_split() -> None:
    # one true object predicted as two halves: each half has IoU 0.5 -> exactly one can match at 0.5
    truth = _squares((20, 20), [(0, 0, 10, 10)])
    pred = _squares((20, 20), [(0, 0, 10, 5), (0, 5, 10, 10)])
    assert match_counts(truth, pred)[0.5] == (1, 1, 0)
    assert evaluate_pair(truth, pred)["ap50"] == pytest.approx(0.5)
    assert evaluate_pair(truth, pred)["f1_50"] == pytest.approx(2 / 3)


def test_one_to_one_assignment_beats_greedy() -> None:
    # greedy (best IoU first) takes (0, 0) and leaves truth 1 unmatched; the assignment finds two pairs
    iou = np.array([[0.6, 0.4], [0.5, 0.0]])
    assert true_positives(iou, 0.3) == 2
    assert true_positives(iou, 0.55) == 1
    assert true_positives(np.zeros((0, 3)), 0.5) == 0


def test_empty_prediction() -> None:
    empty = np.zeros_like(TRUTH)
    assert match_counts(TRUTH, empty)[0.5] == (0, 0, 3)
    assert evaluate_pair(TRUTH, empty) == pytest.approx(
        {"ap50": 0.0, "ap": 0.0, "f1_50": 0.0, "tp50": 0, "fp50": 0, "fn50": 3})


def test_empty_truth() -> None:
    empty = np.zeros_like(TRUTH)
    assert match_counts(empty, TRUTH)[0.5] == (0, 3, 0)
    assert evaluate_pair(empty, TRUTH)["ap50"] == 0.0
    assert evaluate_pair(empty, empty)["ap50"] == 1.0  # nothing to find, nothing found


def test_sum_counts_pools_images() -> None:
    a = match_counts(TRUTH, TRUTH)
    b = match_counts(TRUTH, np.zeros_like(TRUTH))
    pooled = scores(sum_counts([a, b]))
    assert pooled["ap50"] == pytest.approx(3 / 6)


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        iou_matrix(TRUTH, TRUTH[:10])
