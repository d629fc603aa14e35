"""The competition metric, pixel IoU and the probability-threshold sweep, vectorized in NumPy.

Competition metric per image (TGS Salt Identification): if the true mask is empty, 1 when the predicted
mask is empty too and 0 otherwise; else, with IoU the intersection over union of the two masks, the mean
over t in 0.50, 0.55, ..., 0.95 of [IoU > t]. The score of a set is the mean over its images.

Comparisons are exact: "IoU > t" is evaluated as 100 * intersection > k * union with integer k in 50..95,
so an IoU of exactly 0.55 does not pass t = 0.55 whatever floating point makes of 0.55.
"""

from __future__ import annotations

import numpy as np

from salt_tf.data.splits import coverage_class

IOU_THRESHOLDS_PERCENT = np.arange(50, 100, 5, dtype=np.int64)  # 0.50 ... 0.95
DEFAULT_SWEEP = np.round(np.linspace(0.02, 0.98, 49), 4)        # probability thresholds for the sweep


def _flat(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    return masks.reshape(masks.shape[0], -1)


def scores_from_counts(intersection: np.ndarray, union: np.ndarray, truth_pixels: np.ndarray,
                       predicted_pixels: np.ndarray) -> np.ndarray:
    """Per-image competition score from integer counts; all arrays broadcast together."""
    intersection = np.asarray(intersection, dtype=np.int64)
    union = np.asarray(union, dtype=np.int64)
    hits = (100 * intersection[..., None] > IOU_THRESHOLDS_PERCENT * union[..., None]).mean(axis=-1)
    return np.where(np.asarray(truth_pixels) == 0, (np.asarray(predicted_pixels) == 0).astype(np.float64), hits)


def image_scores(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per-image competition score of binary masks [N, ...] -> [N] float64."""
    truth, predicted = _flat(truth).astype(bool), _flat(predicted).astype(bool)
    intersection = np.count_nonzero(truth & predicted, axis=1)
    union = np.count_nonzero(truth | predicted, axis=1)
    return scores_from_counts(intersection, union, truth.sum(axis=1), predicted.sum(axis=1))


def competition_metric(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean competition score of binary masks [N, ...]."""
    return float(image_scores(truth, predicted).mean())


def pixel_iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """IoU of all pixels of the set pooled together (1.0 when both are empty)."""
    truth, predicted = np.asarray(truth).astype(bool), np.asarray(predicted).astype(bool)
    union = np.count_nonzero(truth | predicted)
    return 1.0 if union == 0 else np.count_nonzero(truth & predicted) / union


def threshold_counts(truth: np.ndarray, probabilities: np.ndarray,
                     thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every image and threshold t (pixel predicted positive iff p > t): intersection, predicted
    pixels and true pixels, as [T, N], [T, N] and [N] int64.

    One pass over the pixels: each pixel's bin is the number of thresholds below its probability, so a
    histogram per image over bins, summed from the top, counts the pixels above every threshold at once.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    assert np.all(np.diff(thresholds) > 0), "thresholds must increase"
    truth = _flat(truth).astype(bool)
    probabilities = _flat(probabilities)
    n, t = truth.shape[0], len(thresholds)
    bins = np.searchsorted(thresholds, probabilities, side="left")      # p > thresholds[j] iff j < bin
    flat = (np.arange(n)[:, None] * (t + 1) + bins).ravel()
    all_hist = np.bincount(flat, minlength=n * (t + 1)).reshape(n, t + 1)
    true_hist = np.bincount(flat[truth.ravel()], minlength=n * (t + 1)).reshape(n, t + 1)
    # above[:, j] = number of pixels with bin > j, i.e. p > thresholds[j].
    predicted = np.cumsum(all_hist[:, ::-1], axis=1)[:, ::-1][:, 1:].T
    intersection = np.cumsum(true_hist[:, ::-1], axis=1)[:, ::-1][:, 1:].T
    return intersection, predicted, truth.sum(axis=1)


def threshold_sweep(truth: np.ndarray, probabilities: np.ndarray,
                    thresholds: np.ndarray = DEFAULT_SWEEP) -> tuple[np.ndarray, np.ndarray]:
    """Competition metric at every probability threshold: returns (thresholds, scores [T])."""
    intersection, predicted, truth_pixels = threshold_counts(truth, probabilities, thresholds)
    union = predicted + truth_pixels[None, :] - intersection
    scores = scores_from_counts(intersection, union, truth_pixels[None, :], predicted)
    return np.asarray(thresholds), scores.mean(axis=1)


def best_threshold(truth: np.ndarray, probabilities: np.ndarray,
                   thresholds: np.ndarray = DEFAULT_SWEEP) -> tuple[float, float]:
    """(threshold, score) maximizing the competition metric; ties go to the threshold nearest 0.5."""
    thresholds, scores = threshold_sweep(truth, probabilities, thresholds)
    best = np.flatnonzero(scores == scores.max())
    pick = best[np.argmin(np.abs(thresholds[best] - 0.5))]
    return float(thresholds[pick]), float(scores[pick])


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for binary `labels`: the probability that a random positive scores
    above a random negative, ties counting one half (Mann-Whitney U / (n_pos * n_neg), from average ranks).
    NaN when one class is absent."""
    labels = np.asarray(labels, bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average rank (1-based) of every run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


# Coverage groups for the per-group scores (TensorBoard, predict evaluate): what a user asks ("does it
# miss small salt?"). Each group is a range of the split's coverage classes (data.splits.coverage_class).
COVERAGE_GROUPS = {"empty": (0, 0), "small": (1, 1), "medium": (2, 5), "large": (6, 10)}


def coverage_group_scores(truth: np.ndarray, image_scores: np.ndarray) -> dict[str, float]:
    """Mean per-image competition score within each coverage group (groups absent from the set are left
    out)."""
    classes = coverage_class(truth.reshape(len(truth), -1).mean(axis=1))
    scores = {}
    for name, (low, high) in COVERAGE_GROUPS.items():
        members = (classes >= low) & (classes <= high)
        if members.any():
            scores[name] = float(image_scores[members].mean())
    return scores
