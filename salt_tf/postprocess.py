"""From probabilities to masks: threshold, small-component removal, and the "empty if tiny" rule.

    masks = apply(probabilities, PostProcessing(threshold=0.45, min_component=20, min_salt=60))

1. threshold: a pixel is salt iff p > threshold (the convention of `metrics.threshold_sweep`);
2. min_component N: 8-connected salt components with fewer than N pixels are removed (0 = off);
3. min_salt K: an image left with fewer than K salt pixels becomes empty (0 = off);
4. min_has_salt t: with a model's image-level head (--deep_supervision), an image whose "has salt"
   probability is below t becomes empty (0 = off).

The competition metric scores an image with no salt 1 only when the prediction is exactly empty, so a few
stray pixels on an empty image cost a whole point; rules 2 and 3 trade those against small real salt
bodies. `choose_postprocessing` decides on validation images: the threshold from `metrics.best_threshold`,
then each rule (with its N or K from a small grid) is kept only if it strictly improves the validation
metric. The choice is a small dataclass saved as JSON (in `<run_dir>/ensemble.json`) and applied by predict.

NumPy and OpenCV only (no TensorFlow).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from salt_tf import metrics

COMPONENT_GRID = (5, 10, 20, 40, 80, 160)   # candidate N for min_component
EMPTY_GRID = (5, 10, 20, 40, 80, 160, 320)  # candidate K for min_salt
GATE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # candidate t for min_has_salt


@dataclasses.dataclass(frozen=True)
class PostProcessing:
    threshold: float = 0.5   # salt iff probability > threshold
    min_component: int = 0   # remove 8-connected components with fewer pixels (0 = off)
    min_salt: int = 0        # empty the mask if fewer salt pixels remain (0 = off)
    min_has_salt: float = 0.0  # empty the mask if the image head's salt probability is below (0 = off)
    # Validation scores behind the choice (informational; not used to apply it).
    scores: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.min_component < 0 or self.min_salt < 0:
            raise ValueError("min_component and min_salt must be >= 0")
        if not 0.0 <= self.min_has_salt < 1.0:
            raise ValueError(f"min_has_salt must be in [0, 1), got {self.min_has_salt}")

    def to_dict(self) -> dict:
        return {"threshold": float(self.threshold), "min_component": int(self.min_component),
                "min_salt": int(self.min_salt), "min_has_salt": float(self.min_has_salt),
                "scores": {k: float(v) for k, v in self.scores.items()}}

    @classmethod
    def from_dict(cls, payload: dict) -> "PostProcessing":
        return cls(threshold=float(payload["threshold"]), min_component=int(payload.get("min_component", 0)),
                   min_salt=int(payload.get("min_salt", 0)), min_has_salt=float(payload.get("min_has_salt", 0.0)),
                   scores=dict(payload.get("scores", {})))

    def without_rules(self) -> "PostProcessing":
        """This choice with its rules off: the threshold alone, with the score it had alone on the same images
        (`scores["threshold_only"]`, which `choose_postprocessing` records) as its final score."""
        alone = self.scores["threshold_only"]
        return PostProcessing(threshold=self.threshold, scores={"threshold_only": alone, "final": alone})

    def describe(self) -> str:
        parts = [f"threshold {self.threshold:.2f}"]
        parts.append(f"components < {self.min_component} px removed" if self.min_component else
                     "no component removal")
        parts.append(f"empty if < {self.min_salt} px" if self.min_salt else "no empty rule")
        if self.min_has_salt:
            parts.append(f"empty if image head < {self.min_has_salt:.2f}")
        return ", ".join(parts)


def component_areas(masks: np.ndarray) -> np.ndarray:
    """For binary masks [N,H,W]: each salt pixel's 8-connected component size (0 off salt), int32 [N,H,W].

    Computed once, it answers every min_component at once: `masks & (areas >= n)`.
    """
    masks = np.asarray(masks).astype(np.uint8, copy=False)
    areas = np.zeros(masks.shape, dtype=np.int32)
    for k in np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1)):
        _, labels, stats, _ = cv2.connectedComponentsWithStats(masks[k], connectivity=8)
        sizes = stats[:, cv2.CC_STAT_AREA].astype(np.int32)
        sizes[0] = 0  # label 0 is the background
        areas[k] = sizes[labels]
    return areas


def remove_small_components(masks: np.ndarray, min_size: int) -> np.ndarray:
    """Binary masks [N,H,W] without their 8-connected components of fewer than min_size pixels."""
    masks = np.asarray(masks).astype(bool)
    if min_size <= 0:
        return masks
    return masks & (component_areas(masks) >= min_size)


def empty_if_small(masks: np.ndarray, min_salt: int) -> np.ndarray:
    """Binary masks [N,H,W] with every mask of fewer than min_salt salt pixels emptied."""
    masks = np.asarray(masks).astype(bool)
    if min_salt <= 0:
        return masks
    small = masks.reshape(len(masks), -1).sum(axis=1) < min_salt
    return masks & ~small[:, None, None]


def gate(masks: np.ndarray, has_salt: np.ndarray | None, min_has_salt: float) -> np.ndarray:
    """Binary masks [N,H,W] with every image whose "has salt" probability [N] is below min_has_salt emptied."""
    masks = np.asarray(masks).astype(bool)
    if min_has_salt <= 0:
        return masks
    if has_salt is None:
        raise ValueError(f"the post-processing gates on the image head (min_has_salt {min_has_salt}) but the "
                         "models have no image head (--deep_supervision)")
    return masks & (np.asarray(has_salt) >= min_has_salt)[:, None, None]


def apply(probabilities: np.ndarray, choice: PostProcessing, has_salt: np.ndarray | None = None) -> np.ndarray:
    """Probabilities [N,H,W] (and the image head's salt probabilities [N], if any) -> bool masks [N,H,W] under
    the post-processing `choice`."""
    masks = np.asarray(probabilities) > choice.threshold
    masks = remove_small_components(masks, choice.min_component)
    return gate(empty_if_small(masks, choice.min_salt), has_salt, choice.min_has_salt)


def choose_postprocessing(truth: np.ndarray, probabilities: np.ndarray,
                          component_grid=COMPONENT_GRID, empty_grid=EMPTY_GRID,
                          thresholds=metrics.DEFAULT_SWEEP, has_salt: np.ndarray | None = None,
                          gate_grid=GATE_GRID) -> PostProcessing:
    """Chooses the post-processing on labelled images: truth [N,H,W] (or [N,H,W,1]), probabilities [N,H,W],
    and the image head's salt probabilities [N] if the models have one.

    The threshold maximizes the competition metric (`metrics.best_threshold`); then small-component
    removal with the best N of `component_grid` is kept only if it beats the threshold alone, then the
    empty rule with the best K of `empty_grid` only if it beats what is kept so far, and then (with
    `has_salt`) the image-head gate with the best t of `gate_grid` likewise. Ties keep the simpler
    choice (rule off, or the smaller N/K/t).
    """
    truth = np.asarray(truth).reshape(np.shape(probabilities)).astype(bool)
    probabilities = np.asarray(probabilities)
    threshold, base = metrics.best_threshold(truth, probabilities, thresholds)
    masks = probabilities > threshold
    scores = {"threshold_only": base}

    min_component, best = 0, base
    if len(component_grid):
        areas = component_areas(masks)
        for n in sorted(component_grid):
            score = metrics.competition_metric(truth, masks & (areas >= n))
            if score > best:
                min_component, best = int(n), score
        masks = masks & (areas >= min_component)
    scores["with_component_rule"] = best

    min_salt = 0
    counts = masks.reshape(len(masks), -1).sum(axis=1)
    for k in sorted(empty_grid):
        score = metrics.competition_metric(truth, masks & ~(counts < k)[:, None, None])
        if score > best:
            min_salt, best = int(k), score
    scores["with_empty_rule"] = best

    min_has_salt = 0.0
    if has_salt is not None and len(gate_grid):
        masks = masks & ~(counts < min_salt)[:, None, None] if min_salt else masks
        for t in sorted(gate_grid):
            score = metrics.competition_metric(truth, gate(masks, has_salt, t))
            if score > best:
                min_has_salt, best = float(t), score
        scores["with_image_gate"] = best
    scores["final"] = best
    return PostProcessing(threshold=float(threshold), min_component=min_component, min_salt=min_salt,
                          min_has_salt=min_has_salt, scores=scores)
