"""Out-of-fold (OOF) predictions of a K-fold cross-validation: which fold predicts which image, the scores,
and the comparison of two cross-validations image by image. NumPy only (the models are run by salt_tf.cv).

Each labelled image is predicted once, by the fold model that validated on it (its split.csv says so), so
every image is out-of-sample and the score covers the whole labelled set instead of one validation split.

    <parent>/oof.npz    ids [N] (str), probabilities [N,101,101] float16, masks [N,101,101] uint8 (the truth),
                        fold [N] (the fold whose model predicted the image), scores_at_half [N] and
                        scores_cv [N] (the competition score of each image at 0.5, and at the threshold chosen
                        on the other images); the scores are computed from the stored float16 values, so
                        re-scoring the file gives the same numbers; and, when they apply,
                        member_probabilities [S,N,101,101] float16 (every fold has S models: [k] is the k-th
                        model of the image's fold, exports.positions; absent when the folds differ in number)
                        and has_salt [N] float32 (models with the image head: the mean over the image's fold's
                        models of their TTA-mean sigmoid(head)), what `predict evaluate` stacks and gates on
    <parent>/oof.json   the numbers of the printed table (summary), the TTA and the fold models they are of

The threshold is chosen by cross-validation over images (ensemble.plain_row over ensemble.image_folds: 5
coverage-stratified folds), so a threshold never sees the image it scores. Intervals are percentile
bootstraps over the images (ensemble.paired_bootstrap).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from salt_tf import ensemble, metrics, rundir

KEYS = ("ids", "probabilities", "masks", "fold", "scores_at_half", "scores_cv")
OPTIONAL_KEYS = ("member_probabilities", "has_salt")  # absent from files of before them, and where they don't apply


class OOFError(ValueError):
    """Fold runs or OOF files that cannot give one prediction per image; the message is one line with the fix."""


def fold_of_images(labelled_ids: Sequence[str], val_ids: dict[int, Sequence[str]]) -> np.ndarray:
    """The fold whose model validated on each labelled image, checking that every image has exactly one.

    Args:
        labelled_ids: the ids of the labelled set, in the order of the result.
        val_ids: {fold k: the ids fold k's split.csv lists as validation}.

    Returns:
        fold [N] int, aligned with labelled_ids.

    Raises:
        OOFError: an image validated by two folds, by none, or a validation id outside the labelled set.
    """
    owner: dict[str, int] = {}
    labelled = set(labelled_ids)
    for k, ids in sorted(val_ids.items()):
        for id_ in ids:
            if id_ not in labelled:
                raise OOFError(f"fold-{k} validates on {id_}, which is not in the labelled set of the other folds; "
                               "train every fold on the same --data_dir")
            if id_ in owner:
                raise OOFError(f"image {id_} is a validation image of fold-{owner[id_]} and of fold-{k}: the folds "
                               "come from different K-folds; train all folds with the same --folds and --split_seed")
            owner[id_] = k
    missing = [i for i in labelled_ids if i not in owner]
    if missing:
        raise OOFError(f"{len(missing)} of the {len(labelled)} labelled images have no out-of-fold prediction (e.g. "
                       f"{missing[0]}): no fold validates on them; train the missing folds")
    return np.array([owner[i] for i in labelled_ids], dtype=np.int64)


def score(truth: np.ndarray, probabilities: np.ndarray, folds_of: np.ndarray | None = None,
          seed: int = 0) -> dict:
    """Per-image OOF scores at 0.5 and at the cross-validated threshold.

    Args:
        truth: masks [N,H,W].
        probabilities: OOF probabilities [N,H,W].
        folds_of: the images' folds for choosing the threshold (default ensemble.image_folds, 5 folds).
        seed: seed of the default folds.

    Returns:
        {"scores_at_half" [N], "scores_cv" [N], "threshold" chosen on all images, "tuned" its optimistic score}.
    """
    truth = np.asarray(truth).astype(bool)
    p = np.asarray(probabilities, dtype=np.float32)
    if folds_of is None:
        folds_of = ensemble.image_folds(truth, ensemble.DEFAULT_FOLDS, seed)
    row = ensemble.plain_row("oof", truth, p, folds_of)
    return {"scores_at_half": metrics.image_scores(truth, p > 0.5), "scores_cv": row.cv_scores,
            "threshold": row.threshold, "tuned": row.tuned}


def _line(truth: np.ndarray, scores: np.ndarray) -> dict:
    """Mean, bootstrap 95% interval and coverage-group means of per-image scores."""
    return {"all": float(np.mean(scores)), "ci95": list(ensemble.paired_bootstrap(scores)),
            **metrics.coverage_group_scores(truth, scores)}


def summary(truth: np.ndarray, scored: dict, fold: np.ndarray, tta: Sequence[str],
            models: Sequence[dict] = ()) -> dict:
    """oof.json: the table's numbers from score()'s result and the images' folds.

    Args:
        truth: masks [N,H,W].
        scored: score()'s result.
        fold: fold [N] whose model predicted each image.
        tta: the views the probabilities were averaged over.
        models: the fold models that predicted them ({"name", "epoch", ...}, exports.LoadedModel.info), so a
            reader can tell the file from a later training of the folds.

    Returns:
        {"images", "folds", "tta", "models", "at_half", "cv" (each: all, ci95, coverage groups), "threshold",
        "tuned", "per_fold": {k: {"images", "at_half"}}}.
    """
    truth = np.asarray(truth).astype(bool)
    return {"images": int(len(truth)), "folds": int(len(np.unique(fold))), "tta": list(tta), "models": list(models),
            "at_half": _line(truth, scored["scores_at_half"]), "cv": _line(truth, scored["scores_cv"]),
            "threshold": scored["threshold"], "tuned": scored["tuned"],
            "per_fold": {str(k): {"images": int(np.sum(fold == k)),
                                  "at_half": float(scored["scores_at_half"][fold == k].mean())}
                         for k in np.unique(fold)}}


def format_summary(s: dict) -> str:
    """The OOF table of a summary(): @0.50 and cv rows with intervals and coverage groups, then per fold."""
    groups = [g for g in metrics.COVERAGE_GROUPS if g in s["cv"]]
    lines = [f"out-of-fold: {s['images']} images, each predicted by the one of {s['folds']} fold models that "
             f"validated on it (tta {ensemble.views_label(s['tta'])})",
             f"{'':<14}{'all':>8}  {'95% interval':<17}" + "".join(f"{g:>8}" for g in groups)]
    for label, key in (("@0.50", "at_half"), ("cv threshold", "cv")):
        line = s[key]
        lines.append(f"{label:<14}{line['all']:>8.4f}  [{line['ci95'][0]:.4f}, {line['ci95'][1]:.4f}] "
                     + "".join(f"{line[g]:>8.4f}" for g in groups))
    lines.append("per fold @0.50: " + ", ".join(f"fold-{k} {v['at_half']:.4f} ({v['images']})"
                                                 for k, v in s["per_fold"].items()))
    lines.append(f"cv threshold: chosen on 4/5 of the images (coverage-stratified), scoring the fifth, in turn; "
                 f"chosen on all images: {s['threshold']:.2f} ({s['tuned']:.4f}, optimistic). Intervals: "
                 f"bootstrap over the images ({ensemble.BOOTSTRAP_SAMPLES} resamples).")
    return "\n".join(lines)


def save(path: str, arrays: dict) -> None:
    """Writes oof.npz (compressed, atomically: rundir.write_bytes) from {KEYS: array} and any of OPTIONAL_KEYS."""
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(arrays[k]) for k in KEYS + OPTIONAL_KEYS if k in arrays})
    rundir.write_bytes(path, buffer.getvalue())


def load(path: str) -> dict:
    """oof.npz as {KEYS: array} plus those of OPTIONAL_KEYS it holds; OOFError naming the file when it is
    missing or not an OOF file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in KEYS + tuple(k for k in OPTIONAL_KEYS if k in npz.files)}
    except FileNotFoundError:
        raise OOFError(f"{path}: not found; run {_collect(path)} first") from None
    except (OSError, ValueError, KeyError) as e:
        raise OOFError(f"{path}: not an out-of-fold file of salt_tf.cv ({type(e).__name__}: {e}); rerun "
                       f"{_collect(path)}") from None


def load_summary(parent: str) -> dict:
    """The oof.json of a CV parent (summary()); OOFError naming the file and `cv collect` when it is missing or
    unreadable."""
    path = os.path.join(parent, rundir.OOF_SUMMARY)
    try:
        return rundir.read_json(path)
    except FileNotFoundError:
        raise OOFError(f"{path}: not found; run {_collect(path)} first") from None
    except (OSError, ValueError) as e:
        raise OOFError(f"{path}: not readable ({type(e).__name__}: {e}); rerun {_collect(path)}") from None


def _collect(path: str) -> str:
    """The command that writes the OOF file `path`: cv collect of its folder."""
    return f"python -m salt_tf.cv collect --parent={os.path.dirname(path) or '.'}"


@dataclasses.dataclass
class Comparison:
    """B - A per image: the mean difference and its paired-bootstrap 95% interval, for the cv and @0.5 scores."""

    images: int
    a: dict          # {"cv": mean, "at_half": mean}
    b: dict
    difference: dict  # {"cv": mean of B - A, "at_half": ...}
    ci95: dict       # {"cv": [low, high], "at_half": [low, high]}
    groups: dict     # {"cv": {group: mean difference}}


def compare(a: dict, b: dict) -> Comparison:
    """Compares two OOF files (load()) image by image: B - A.

    Raises:
        OOFError: the two hold other images (one line with the counts and an example).
    """
    ids_a, ids_b = a["ids"].tolist(), b["ids"].tolist()
    if ids_a != ids_b:
        only = [f"{min(set(x) - set(y))} only in {name}"
                for x, y, name in ((ids_a, ids_b, "A"), (ids_b, ids_a, "B")) if set(x) - set(y)]
        detail = "e.g. " + ", ".join(only) if only else "the same ids in another order"
        raise OOFError(f"the two cross-validations predicted other images ({len(a['ids'])} and {len(b['ids'])}; "
                       f"{detail}); compare runs on the same labelled set")
    truth = a["masks"].astype(bool)
    out = Comparison(len(a["ids"]), {}, {}, {}, {}, {})
    for key in ("cv", "at_half"):
        sa, sb = a[f"scores_{key}"], b[f"scores_{key}"]
        d = np.asarray(sb, np.float64) - np.asarray(sa, np.float64)
        out.a[key], out.b[key], out.difference[key] = float(np.mean(sa)), float(np.mean(sb)), float(d.mean())
        out.ci95[key] = list(ensemble.paired_bootstrap(d))
        out.groups[key] = metrics.coverage_group_scores(truth, d)
    return out


def format_comparison(c: Comparison, name_a: str, name_b: str) -> str:
    """The comparison as lines: A, B, B - A and its interval per row, then B - A per coverage group."""
    lines = [f"A = {name_a}, B = {name_b}: {c.images} images, each scored out-of-fold in both",
             f"{'':<14}{'A':>8}{'B':>8}{'B - A':>9}  95% interval (paired bootstrap over images)"]
    for label, key in (("cv threshold", "cv"), ("@0.50", "at_half")):
        low, high = c.ci95[key]
        lines.append(f"{label:<14}{c.a[key]:>8.4f}{c.b[key]:>8.4f}{c.difference[key]:>+9.4f}  "
                     f"[{low:+.4f}, {high:+.4f}]")
    lines.append("B - A by coverage group (cv): " + ", ".join(f"{g} {v:+.4f}" for g, v in c.groups["cv"].items()))
    return "\n".join(lines)
