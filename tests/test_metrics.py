"""The competition metric against hand-computed cases and a per-image brute-force reference."""

from fractions import Fraction

import numpy as np
import pytest

from salt_tf import metrics


def reference_score(truth, predicted):
    """Per-image score written from the competition's definition, with exact fractions."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    if not truth.any():
        return 1.0 if not predicted.any() else 0.0
    iou = Fraction(int((truth & predicted).sum()), int((truth | predicted).sum()))
    thresholds = [Fraction(k, 100) for k in range(50, 100, 5)]
    return sum(iou > t for t in thresholds) / len(thresholds)


def masks_with(truth_pixels, predicted_pixels, overlap, size=20):
    truth = np.zeros(size * size, bool)
    predicted = np.zeros(size * size, bool)
    truth[:truth_pixels] = True
    start = truth_pixels - overlap
    predicted[start:start + predicted_pixels] = True
    return truth.reshape(size, size), predicted.reshape(size, size)


@pytest.mark.parametrize("truth_empty, pred_empty, expected", [
    (True, True, 1.0), (True, False, 0.0), (False, True, 0.0)])
def test_empty_combinations(truth_empty, pred_empty, expected):
    truth = np.zeros((1, 5, 5)) if truth_empty else np.ones((1, 5, 5))
    predicted = np.zeros((1, 5, 5)) if pred_empty else np.eye(5)[None]
    assert metrics.competition_metric(truth, predicted) == expected


@pytest.mark.parametrize("truth_pixels, predicted_pixels, overlap, expected", [
    (100, 100, 100, 1.0),       # perfect
    (20, 20, 10, 0.0),          # IoU = 10/30 < 0.5
    (10, 10, 10, 1.0),
    (100, 50, 50, 0.0),         # IoU exactly 0.50: not > 0.50
    (100, 51, 51, 0.1),         # IoU 0.51: passes 0.50 only
    (20, 11, 11, 0.1),          # IoU exactly 0.55: passes 0.50 but not 0.55
    (100, 95, 95, 0.9),         # IoU exactly 0.95: passes all but 0.95
    (100, 96, 96, 1.0),
    (40, 30, 30, 0.5),          # IoU = 0.75: passes 0.50..0.70
])
def test_hand_computed_iou_cases(truth_pixels, predicted_pixels, overlap, expected):
    truth, predicted = masks_with(truth_pixels, predicted_pixels, overlap)
    assert metrics.image_scores(truth[None], predicted[None])[0] == pytest.approx(expected, abs=1e-12)
    assert reference_score(truth, predicted) == pytest.approx(expected, abs=1e-12)


def test_matches_reference_on_random_masks():
    rng = np.random.default_rng(0)
    truth = rng.random((60, 13, 13)) < rng.random((60, 1, 1))
    truth[:10] = False
    predicted = truth ^ (rng.random(truth.shape) < 0.15 * rng.random((60, 1, 1)))
    predicted[5:8] = False
    expected = np.mean([reference_score(t, p) for t, p in zip(truth, predicted)])
    assert metrics.competition_metric(truth, predicted) == pytest.approx(expected, abs=1e-12)


def test_pixel_iou():
    truth, predicted = masks_with(30, 20, 10)
    assert metrics.pixel_iou(truth, predicted) == pytest.approx(10 / 40)
    assert metrics.pixel_iou(np.zeros((2, 3)), np.zeros((2, 3))) == 1.0


def test_threshold_sweep_matches_thresholding_each_time():
    rng = np.random.default_rng(1)
    truth = rng.random((40, 11, 11)) < 0.4
    truth[:8] = False
    probabilities = np.clip(truth * 0.6 + rng.random(truth.shape) * 0.6 - 0.1, 0, 1).astype(np.float32)
    probabilities[0, 0, 0] = 0.5  # a pixel exactly at a threshold: predicted only for t < 0.5
    thresholds = np.round(np.linspace(0.05, 0.95, 19), 4)
    got_thresholds, got = metrics.threshold_sweep(truth, probabilities, thresholds)
    expected = [np.mean([reference_score(t, p > th) for t, p in zip(truth, probabilities)]) for th in thresholds]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    best_t, best_s = metrics.best_threshold(truth, probabilities, thresholds)
    assert best_s == pytest.approx(max(expected)) and best_t in thresholds


def brute_force_auc(labels, scores):
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_roc_auc_against_pair_counting():
    rng = np.random.default_rng(3)
    for n in (2, 7, 50):
        labels = rng.random(n) < 0.4
        labels[0], labels[1] = True, False
        scores = np.round(rng.random(n), 1)  # rounding makes ties
        assert metrics.roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_roc_auc_hand_cases():
    assert metrics.roc_auc([True, False], [0.9, 0.1]) == 1.0
    assert metrics.roc_auc([True, False], [0.1, 0.9]) == 0.0
    assert metrics.roc_auc([True, False, True], [0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(metrics.roc_auc([True, True], [0.1, 0.2]))


def test_best_threshold_ties_go_to_the_threshold_nearest_half():
    # Salt pixels at 0.9, the rest at 0.1: every threshold in [0.1, 0.9) scores a perfect 1.0, so the tie is
    # broken towards 0.5 (in the sweep); thresholds at or above 0.9 lose the salt.
    truth = np.zeros((2, 10, 10), bool)
    truth[0, :4, :4] = True
    probabilities = np.where(truth, 0.9, 0.1)
    threshold, score = metrics.best_threshold(truth, probabilities)
    assert (threshold, score) == (0.5, 1.0)
    # Perfect only in [0.1, 0.3): the tie is broken towards 0.5 within that range, i.e. the highest of it.
    probabilities = np.where(truth, 0.3, 0.1)
    threshold, score = metrics.best_threshold(truth, probabilities)
    assert (threshold, score) == (0.28, 1.0)
