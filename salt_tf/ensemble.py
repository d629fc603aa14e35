"""Combining several models' probabilities: the mean, or a stacked meta-model, and an honest evaluation.

Stacking: a per-pixel logistic regression on the M models' logits,

    p(salt) = sigmoid(w_1 * logit(p_1) + ... + w_M * logit(p_M) + b),   logit(p) = log(p / (1 - p)),

with each p_m the model's TTA-averaged probability clipped to [CLIP, 1 - CLIP]. It learns how much to trust
each snapshot (a weight near 0 ignores one, weights summing above 1 sharpen the ensemble). It is fitted by
Newton's method (IRLS) in float64 on the mean per-pixel log-loss plus L2 on the weights (not the bias), in
pure NumPy; M is small, so each step solves an (M+1)x(M+1) system.

It must be fitted on OUT-OF-SAMPLE predictions only: the run's validation images, which no snapshot
trained on. Its score is then estimated by k-fold cross-validation over those IMAGES (`evaluate`): the
meta-model, the threshold and the post-processing are fitted on k-1 folds and scored on the held-out fold,
next to the plain mean of the snapshots scored the same way. `evaluate` also returns the final choice
(`Ensemble`), fitted on all the validation images, which `<run_dir>/ensemble.json` stores for predict.

NumPy only (no TensorFlow): the model side is in `salt_tf.tta` and the command in `salt_tf.predict`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from salt_tf import metrics, postprocess, rundir

CLIP = 1e-5          # probabilities are clipped to [CLIP, 1 - CLIP] before the logit (|logit| <= 11.5)
DEFAULT_L2 = 1e-3    # L2 on the weights, relative to the MEAN per-pixel log-loss
DEFAULT_FOLDS = 5
BOOTSTRAP_SAMPLES = 2000  # resamples of the images for the interval of an ensemble's gain
FORMAT_VERSION = 1
_CHUNK = 1 << 20     # rows per chunk when accumulating gradient and Hessian


def logits(probabilities: np.ndarray, clip: float = CLIP) -> np.ndarray:
    """logit(p) of probabilities clipped to [clip, 1 - clip], float64."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), clip, 1.0 - clip)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


# ---------------------------------------------------------------------------------------------------------
# Logistic regression (Newton / IRLS).


def _objective(x: np.ndarray, y: np.ndarray, theta: np.ndarray, l2: float, derivatives: bool = True):
    """Mean log-loss + 0.5 * l2 * |w|^2 at theta = [w..., b]; with `derivatives`, also its gradient and
    Hessian. One pass over the rows, in chunks (bounded memory), in float64."""
    m, n = x.shape[1], x.shape[0]
    loss, grad, hess = 0.0, np.zeros(m + 1), np.zeros((m + 1, m + 1))
    for start in range(0, n, _CHUNK):
        xc = np.empty((min(_CHUNK, n - start), m + 1))
        xc[:, :m] = x[start:start + _CHUNK]
        xc[:, m] = 1.0
        yc = np.asarray(y[start:start + _CHUNK], dtype=np.float64)
        z = xc @ theta
        e = np.exp(-np.abs(z))                                   # stable for any z
        loss += float(np.sum(np.maximum(z, 0.0) + np.log1p(e) - yc * z))
        if derivatives:
            p = np.where(z >= 0, 1.0, e) / (1.0 + e)             # sigmoid(z)
            grad += xc.T @ (p - yc)
            hess += (xc * (p * (1.0 - p))[:, None]).T @ xc
    penalty = np.r_[np.full(m, l2), 0.0]
    loss = loss / n + 0.5 * float(np.sum(penalty * theta**2))
    if not derivatives:
        return loss, None, None
    return loss, grad / n + penalty * theta, hess / n + np.diag(penalty)


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = DEFAULT_L2, max_iter: int = 50,
                 tol: float = 1e-7) -> tuple[np.ndarray, float]:
    """Logistic regression of labels [P] in {0,1} on features [P, M]: returns (weights [M], bias).

    Minimizes mean(log(1 + e^z) - y z) + l2/2 |w|^2 with z = features @ w + b, by Newton steps with a
    backtracking line search (so it also behaves on separable data, where l2 keeps the optimum finite).
    Stops when a step moves no parameter by more than `tol`.
    """
    x = np.asarray(features)
    y = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"features must be [P, M] and labels [P]; got {x.shape} and {y.shape}")
    theta = np.zeros(x.shape[1] + 1)
    loss, grad, hess = _objective(x, y, theta, l2)
    for _ in range(max_iter):
        # A tiny ridge keeps the system solvable when a feature is constant or features are collinear.
        step = -np.linalg.solve(hess + 1e-12 * np.eye(len(theta)), grad)
        decrease = float(grad @ step)  # < 0: the Newton direction descends
        scale = 1.0
        new_loss, new_grad, new_hess = _objective(x, y, theta + step, l2)
        while new_loss > loss + 1e-4 * scale * decrease and scale > 1e-6:
            scale *= 0.5
            new_loss, _, _ = _objective(x, y, theta + scale * step, l2, derivatives=False)
            new_grad = None
        theta = theta + scale * step
        if new_grad is None:
            new_loss, new_grad, new_hess = _objective(x, y, theta, l2)
        loss, grad, hess = new_loss, new_grad, new_hess
        if np.max(np.abs(scale * step)) < tol:
            break
    return theta[:-1].copy(), float(theta[-1])


@dataclasses.dataclass
class Stacker:
    """The meta-model: weights over the models' logits (in `models` order), a bias, and how it was fitted."""

    weights: np.ndarray
    bias: float
    models: list[str]
    l2: float = DEFAULT_L2
    clip: float = CLIP

    @classmethod
    def fit(cls, probabilities: np.ndarray, truth: np.ndarray, models: Sequence[str],
            l2: float = DEFAULT_L2, clip: float = CLIP) -> "Stacker":
        """probabilities [M, N, H, W] of M models on N out-of-sample images, truth [N, H, W]."""
        probabilities = np.asarray(probabilities)
        m = probabilities.shape[0]
        if len(models) != m:
            raise ValueError(f"{len(models)} model names for {m} probability maps")
        features = logits(probabilities.reshape(m, -1), clip).T   # [P, M]
        weights, bias = fit_logistic(features, np.asarray(truth).reshape(-1) > 0, l2)
        return cls(weights=weights, bias=bias, models=list(models), l2=l2, clip=clip)

    def logit(self, probabilities) -> np.ndarray:
        """The meta-model's logit for probabilities [M, ...] (or a list of M arrays), float64 [...]."""
        if len(probabilities) != len(self.weights):
            raise ValueError(f"the meta-model combines {len(self.weights)} models, got {len(probabilities)}")
        z = np.full(np.shape(probabilities[0]), self.bias, dtype=np.float64)
        for w, p in zip(self.weights, probabilities):
            z += w * logits(p, self.clip)
        return z

    def predict(self, probabilities) -> np.ndarray:
        """Stacked probabilities, float32, shaped like one model's."""
        return sigmoid(self.logit(probabilities)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"weights": [float(w) for w in self.weights], "bias": float(self.bias),
                "models": list(self.models), "l2": float(self.l2), "clip": float(self.clip)}

    @classmethod
    def from_dict(cls, payload: dict) -> "Stacker":
        return cls(weights=np.asarray(payload["weights"], dtype=np.float64), bias=float(payload["bias"]),
                   models=list(payload["models"]), l2=float(payload.get("l2", DEFAULT_L2)),
                   clip=float(payload.get("clip", CLIP)))


# ---------------------------------------------------------------------------------------------------------
# The saved choice: how predict combines the models and post-processes.


@dataclasses.dataclass
class Ensemble:
    models: list[dict]            # [{"name": "snapshots/snapshot-1", "epoch": 12}, ...] in feature order
    tta: list[str]                # views the probabilities were averaged over, e.g. ["none", "hflip"]
    combine: str                  # "mean" or "stacked"
    postprocessing: postprocess.PostProcessing
    stacker: Stacker | None = None
    scores: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.combine not in ("mean", "stacked"):
            raise ValueError(f"combine must be 'mean' or 'stacked', got {self.combine!r}")
        if self.combine == "stacked" and self.stacker is None:
            raise ValueError("a stacked ensemble needs its meta-model")

    def combine_probabilities(self, probabilities) -> np.ndarray:
        """[M, ...] (or a list of M arrays) in `models` order -> combined probabilities float32 [...]."""
        if self.combine == "stacked":
            return self.stacker.predict(probabilities)
        return np.mean(np.asarray(probabilities, dtype=np.float32), axis=0)

    def masks(self, probabilities, has_salt=None) -> np.ndarray:
        """Masks of the combined probabilities; `has_salt` [N]: the models' mean image-head probability."""
        return postprocess.apply(self.combine_probabilities(probabilities), self.postprocessing, has_salt)

    def to_dict(self) -> dict:
        return {"version": FORMAT_VERSION, "models": self.models, "tta": list(self.tta),
                "combine": self.combine, "stacker": self.stacker.to_dict() if self.stacker else None,
                "postprocessing": self.postprocessing.to_dict(), "scores": self.scores}

    @classmethod
    def from_dict(cls, payload: dict) -> "Ensemble":
        return cls(models=list(payload["models"]), tta=list(payload["tta"]), combine=payload["combine"],
                   postprocessing=postprocess.PostProcessing.from_dict(payload["postprocessing"]),
                   stacker=Stacker.from_dict(payload["stacker"]) if payload.get("stacker") else None,
                   scores=dict(payload.get("scores", {})))

    def save(self, path: str) -> None:
        """Writes the JSON atomically (rundir.write_json)."""
        rundir.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "Ensemble":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a readable ensemble file ({type(e).__name__}: {e}); "
                             "rerun python -m salt_tf.predict evaluate") from None


# ---------------------------------------------------------------------------------------------------------
# Cross-validated evaluation over images.


def image_folds(truth: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold 0..k-1 of each image, stratified by salt coverage (data.splits.kfold); k = min(folds, N)."""
    from salt_tf.data import splits

    n = len(truth)
    folds = min(folds, n)
    coverage = np.asarray(truth).reshape(n, -1).mean(axis=1)
    return splits.kfold([str(i) for i in range(n)], coverage, folds, seed)["fold"].to_numpy()


def _threshold_scores(truth, train_p, test_truth, test_p) -> np.ndarray:
    """Per-image scores of test_p at the threshold that is best on (truth, train_p)."""
    threshold, _ = metrics.best_threshold(truth, train_p)
    return metrics.image_scores(test_truth, test_p > threshold)


def _pp_scores(truth, train_p, test_truth, test_p, train_h=None, test_h=None) -> np.ndarray:
    """Per-image scores of test_p under the post-processing chosen on (truth, train_p); train_h/test_h: the
    image head's salt probabilities of the same images (None: no head, no gate)."""
    choice = postprocess.choose_postprocessing(truth, train_p, has_salt=train_h)
    return metrics.image_scores(test_truth, postprocess.apply(test_p, choice, test_h))


@dataclasses.dataclass
class Row:
    name: str
    at_half: float | None      # metric at threshold 0.5
    tuned: float | None        # metric at the best threshold chosen on the same images (optimistic)
    threshold: float | None    # that threshold
    cv: float | None           # threshold / meta-model / post-processing fitted on k-1 folds, held-out fold
    cv_scores: np.ndarray | None = dataclasses.field(default=None, repr=False)  # per image, behind `cv`


def plain_row(name, truth, p, folds_of) -> Row:
    """One prediction's row: metric at 0.5, at the threshold tuned on all the images (optimistic), and `cv`:
    each image scored at the threshold chosen on the images of the other folds, never on its own.

    Args:
        name: the row's name.
        truth: masks [N,H,W].
        p: probabilities [N,H,W].
        folds_of: fold [N] of each image (image_folds).

    Returns:
        The Row, with the per-image held-out scores in `cv_scores`.
    """
    threshold, tuned = metrics.best_threshold(truth, p)
    scores = np.zeros(len(truth))
    for f in np.unique(folds_of):
        tr, te = folds_of != f, folds_of == f
        scores[te] = _threshold_scores(truth[tr], p[tr], truth[te], p[te])
    return Row(name, metrics.competition_metric(truth, p > 0.5), tuned, threshold, float(scores.mean()), scores)


def paired_bootstrap(differences: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of per-image score differences (two predictions scored on the same
    images), resampling images with replacement: is a gain larger than the luck of these images?"""
    d = np.asarray(differences, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(d), size=(samples, len(d)))
    means = d[draws].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def compare_with_best_single(chosen_scores: np.ndarray, single_rows: Sequence[Row], seed: int = 0) -> dict:
    """The chosen ensemble's held-out per-image scores against the single-model row with the best `cv`.
    Picking that row after seeing the scores flatters it, so the comparison leans against the ensemble."""
    best = max(single_rows, key=lambda r: r.cv)
    difference = np.asarray(chosen_scores, dtype=np.float64) - best.cv_scores
    low, high = paired_bootstrap(difference, seed=seed)
    return {"model": best.name, "cv": best.cv, "difference": float(difference.mean()), "ci95": [low, high]}


def cross_validate(truth: np.ndarray, probabilities: np.ndarray, folds_of: np.ndarray, names: Sequence[str],
                   l2: float = DEFAULT_L2, has_salt: np.ndarray | None = None) -> dict:
    """k-fold over images for the mean and (M >= 2) the stacked ensemble of probabilities [M,N,H,W].

    For each fold, everything is fitted on the other folds only: the meta-model, the threshold, the
    post-processing (with `has_salt` [N], the image-head gate among it). Returns per-image held-out scores [N] ("mean_postprocessed", "stacked" at the
    training folds' threshold, "stacked_postprocessed") and the out-of-fold stacked probabilities
    "stacked_oof" [N,H,W] (None and Nones with one model).
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    m, n = probs.shape[:2]
    mean = probs.mean(axis=0)
    out = {"mean_postprocessed": np.zeros(n), "stacked_oof": None, "stacked": None, "stacked_postprocessed": None}
    if m >= 2:
        out.update(stacked_oof=np.zeros_like(mean), stacked=np.zeros(n), stacked_postprocessed=np.zeros(n))
    heads = (lambda index: None) if has_salt is None else (lambda index: has_salt[index])  # noqa: E731
    for f in np.unique(folds_of):
        tr, te = folds_of != f, folds_of == f
        out["mean_postprocessed"][te] = _pp_scores(truth[tr], mean[tr], truth[te], mean[te], heads(tr), heads(te))
        if m >= 2:
            stacker = Stacker.fit(probs[:, tr], truth[tr], names, l2)
            train_p, test_p = stacker.predict(probs[:, tr]), stacker.predict(probs[:, te])
            out["stacked_oof"][te] = test_p
            out["stacked"][te] = _threshold_scores(truth[tr], train_p, truth[te], test_p)
            out["stacked_postprocessed"][te] = _pp_scores(truth[tr], train_p, truth[te], test_p, heads(tr),
                                                          heads(te))
    return out


def views_label(tta: Sequence[str]) -> str:
    """("none", "hflip") -> "hflip": the TTA views beyond the identity, as the table names them."""
    return "+".join(v for v in tta if v != "none") or "none"


def evaluate(truth: np.ndarray, tta_probabilities: np.ndarray, names: Sequence[str],
             plain_probabilities: np.ndarray | None = None, tta: Sequence[str] = ("none", "hflip"),
             folds: int = DEFAULT_FOLDS, seed: int = 0, l2: float = DEFAULT_L2,
             model_info: Sequence[dict] | None = None,
             has_salt: np.ndarray | None = None) -> tuple[list[Row], Ensemble]:
    """The evaluation table and the final ensemble choice.

    truth [N,H,W] (or [N,H,W,1]) of out-of-sample images; tta_probabilities [M,N,H,W] of M models with TTA
    (and plain_probabilities [M,N,H,W] without, for the per-model plain rows). Rows: each model plain,
    each with TTA, the mean, the stacked meta-model (out-of-fold predictions; n/a with one model), and both
    after post-processing. The choice goes by the cross-validated score among four candidates, in this order
    of simplicity: the mean at its threshold alone, the mean with post-processing rules, the stacked
    ensemble at its threshold alone, the stacked one with rules; a later candidate is chosen only if strictly
    better. (The rules are kept when they gain on the images they are chosen on; on the held-out fold they can
    lose: measured on a 5-fold ensemble's 3,200 out-of-fold images, rules cv 0.7557 against the threshold
    alone 0.7575, so "with rules" must win its place by cv.) The choice is then refitted on all N images, the
    post-processing of a stacked ensemble chosen on its out-of-fold probabilities. `has_salt` [N]: the mean
    image-head salt probability of the models that have a head; with it the post-processing may gate on it.
    scores["cv_chosen"] is the chosen candidate's cv.
    """
    probs = np.asarray(tta_probabilities, dtype=np.float32)
    m, n = probs.shape[:2]
    truth = np.asarray(truth).reshape(probs.shape[1:]).astype(bool)
    if len(names) != m:
        raise ValueError(f"{len(names)} names for {m} models")
    folds_of = image_folds(truth, folds, seed)
    k = len(np.unique(folds_of))
    tta_label = views_label(tta)
    suffix = "" if tta_label == "none" else f" (tta {tta_label})"

    rows = []  # the single-model rows first
    if plain_probabilities is not None:
        plain = np.asarray(plain_probabilities, dtype=np.float32)
        rows += [plain_row(f"{name} (plain)", truth, plain[i], folds_of) for i, name in enumerate(names)]
    if tta_label != "none" or plain_probabilities is None:
        rows += [plain_row(f"{name} (tta {tta_label})", truth, probs[i], folds_of)
                 for i, name in enumerate(names)]

    n_single = len(rows)
    mean = probs.mean(axis=0)
    mean_row = plain_row(f"mean of {m}{suffix}", truth, mean, folds_of)
    rows.append(mean_row)

    cv = cross_validate(truth, probs, folds_of, names, l2, has_salt)
    mean_pp_scores, stacked_oof = cv["mean_postprocessed"], cv["stacked_oof"]
    stacked_scores, stacked_pp_scores = cv["stacked"], cv["stacked_postprocessed"]

    mean_choice = postprocess.choose_postprocessing(truth, mean, has_salt=has_salt)
    rows_pp = [Row("mean + postprocessing", None, mean_choice.scores["final"], mean_choice.threshold,
                   float(mean_pp_scores.mean()), mean_pp_scores)]
    if m >= 2:
        threshold, tuned = metrics.best_threshold(truth, stacked_oof)
        stacked_name = f"stacked of {m} ({'tta ' + tta_label + ', ' if suffix else ''}out-of-fold)"
        rows.append(Row(stacked_name,
                        metrics.competition_metric(truth, stacked_oof > 0.5), tuned, threshold,
                        float(stacked_scores.mean()), stacked_scores))
        stacked_choice = postprocess.choose_postprocessing(truth, stacked_oof, has_salt=has_salt)
        rows_pp.append(Row("stacked + postprocessing", None, stacked_choice.scores["final"],
                           stacked_choice.threshold, float(stacked_pp_scores.mean()), stacked_pp_scores))
    else:
        rows.append(Row("stacked (needs >= 2 models)", None, None, None, None))
        rows_pp.append(Row("stacked + postprocessing", None, None, None, None))
    rows += rows_pp

    scores = {"images": int(n), "folds": int(k), "cv_mean": mean_row.cv,
              "cv_mean_postprocessed": float(mean_pp_scores.mean())}
    if m >= 2:
        scores.update(cv_stacked=float(stacked_scores.mean()),
                      cv_stacked_postprocessed=float(stacked_pp_scores.mean()))
    candidates = [("mean", mean_choice.without_rules(), mean_row.cv_scores), ("mean", mean_choice, mean_pp_scores)]
    if m >= 2:
        candidates += [("stacked", stacked_choice.without_rules(), stacked_scores),
                       ("stacked", stacked_choice, stacked_pp_scores)]
    combine, postprocessing, chosen_scores = candidates[0]
    for candidate in candidates[1:]:
        if candidate[2].mean() > chosen_scores.mean():
            combine, postprocessing, chosen_scores = candidate
    scores["cv_chosen"] = float(chosen_scores.mean())
    scores["vs_best_single"] = compare_with_best_single(chosen_scores, rows[:n_single], seed)
    info = list(model_info) if model_info is not None else [{"name": name} for name in names]
    stacker = Stacker.fit(probs, truth, names, l2) if combine == "stacked" else None
    final = Ensemble(models=info, tta=list(tta), combine=combine, postprocessing=postprocessing, stacker=stacker,
                     scores=scores)
    return rows, final


RESCUE_STEP = 0.02  # the lower thresholds error_breakdown tries on missed images: 0.02, 0.04, ... below the mask's


def error_breakdown(truth: np.ndarray, masks: np.ndarray, probabilities: np.ndarray | None = None,
                    threshold: float = 0.5) -> dict:
    """Where a prediction loses points: the score per coverage group, how many images without salt got
    some ("false salt") and how many with salt got none ("missed"), and the score if no image without salt
    got any — what a perfect empty/not-empty decision on top of these masks would reach at most.

    With the `probabilities` the masks were thresholded from (at `threshold`), also what a lower threshold could
    recover of the missed images: each missed image at its own best threshold of RESCUE_STEP, 2 x RESCUE_STEP, ...
    below `threshold` — an upper bound for any threshold rule (a rescue threshold where the mask comes out empty,
    a threshold per predicted size), since it is chosen per image with the truth. "rescuable_images": missed
    images that score above 0 at some lower threshold; "with_missed_rescued": the score if each did so.
    """
    truth = np.asarray(truth).reshape(np.shape(masks)).astype(bool)
    masks = np.asarray(masks, dtype=bool)
    scores = metrics.image_scores(truth, masks)
    has_salt = truth.reshape(len(truth), -1).any(axis=1)
    predicted_salt = masks.reshape(len(masks), -1).any(axis=1)
    missed = has_salt & ~predicted_salt
    result = {"all": float(scores.mean()), **metrics.coverage_group_scores(truth, scores),
              "false_salt_images": int((predicted_salt & ~has_salt).sum()),
              "missed_images": int(missed.sum()),
              "without_false_salt": float(metrics.image_scores(truth, masks & has_salt[:, None, None]).mean())}
    if probabilities is not None:
        best = best_lower_threshold_scores(truth[missed], np.asarray(probabilities)[missed], threshold)
        rescued = scores.copy()
        rescued[missed] = best
        result.update(rescuable_images=int((best > 0).sum()), with_missed_rescued=float(rescued.mean()))
    return result


def best_lower_threshold_scores(truth: np.ndarray, probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """[N] each image's best score over the thresholds RESCUE_STEP, 2 x RESCUE_STEP, ... below `threshold`."""
    best = np.zeros(len(truth))
    if not len(truth):
        return best
    for k in range(1, int(np.ceil(threshold / RESCUE_STEP - 1e-9))):
        best = np.maximum(best, metrics.image_scores(truth, probabilities > k * RESCUE_STEP))
    return best


def format_breakdown(named: Sequence[tuple[str, dict]]) -> str:
    """error_breakdown results of several predictions as one aligned table."""
    width = max(len("model"), *(len(name) for name, _ in named))
    columns = ["all", "empty", "small", "medium", "large", "false_salt_images", "missed_images",
               "without_false_salt", "rescuable_images", "with_missed_rescued"]
    heads = ["all", "empty", "small", "medium", "large", "false+", "missed", "no false+", "rescuable", "rescued"]
    lines = [f"{'model':<{width}}  " + "  ".join(f"{h:>9}" for h in heads)]
    for name, b in named:
        cells = [("n/a" if c not in b else f"{b[c]:d}" if isinstance(b[c], int) else f"{b[c]:.4f}")
                 for c in columns]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def format_score(value: float | None) -> str:
    """A score as the reports print it (evaluate's table, the release's model card): 4 decimals, "n/a" where
    it does not apply. Stored scores keep the float's own digits (0.8360000000000001)."""
    return "n/a" if value is None else f"{value:.4f}"


def format_table(rows: Sequence[Row]) -> str:
    """The evaluation rows as an aligned text table (n/a where a number does not apply)."""
    width = max(len("model"), *(len(r.name) for r in rows))
    lines = [f"{'model':<{width}}  {'@0.50':>6}  {'tuned':>6}  {'thr':>4}  {'cv':>6}"]
    for r in rows:
        thr = "n/a" if r.threshold is None else f"{r.threshold:.2f}"
        lines.append(f"{r.name:<{width}}  {format_score(r.at_half):>6}  {format_score(r.tuned):>6}  {thr:>4}  "
                     f"{format_score(r.cv):>6}")
    return "\n".join(lines)
