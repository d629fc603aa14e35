"""Coverage-stratified train/validation splits and k-fold ids, fixed by a seed and stored as CSV.

Salt coverage varies from none to the whole image and the metric treats empty images specially, so a
split must carry every coverage class in the same proportion on both sides. Classes: 0 = no salt,
1..10 = coverage in (0, 10%], (10%, 20%], ..., (90%, 100%].
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from salt_tf import rundir
from salt_tf.data.kaggle import DataError

NUM_COVERAGE_CLASSES = 11


def coverage_class(coverage: np.ndarray) -> np.ndarray:
    """0 for an empty mask, else ceil(10 * coverage) in 1..10."""
    coverage = np.asarray(coverage, dtype=np.float64)
    return np.where(coverage > 0, np.clip(np.ceil(coverage * 10), 1, 10), 0).astype(np.int64)


def _shuffled_by_class(ids: Sequence[str], classes: np.ndarray, seed: int) -> list[np.ndarray]:
    """Per coverage class, the row numbers in a seeded random order (sorted by id first, so the
    result does not depend on the order the ids were listed in)."""
    ids = np.asarray(ids, dtype=object)
    rng = np.random.default_rng(seed)
    groups = []
    for c in range(NUM_COVERAGE_CLASSES):
        rows = np.flatnonzero(classes == c)
        rows = rows[np.argsort(ids[rows], kind="stable")]
        groups.append(rng.permutation(rows))
    return groups


def stratified_split(ids: Sequence[str], coverage: np.ndarray, val_size: int | float,
                     seed: int) -> pd.DataFrame:
    """Assigns each id the role 'train' or 'val'; returns a frame id, role, coverage_class.

    val_size is a count (int >= 1) or a fraction in (0, 1). Each class contributes its proportional share,
    rounded by largest remainder so the total is exactly the count asked for.
    """
    n = len(ids)
    count = int(round(val_size * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < count < n:
        raise DataError(f"--val_images={val_size} leaves no training or no validation images out of {n}; "
                        f"give a number from 1 to {n - 1}")
    classes = coverage_class(coverage)
    groups = _shuffled_by_class(ids, classes, seed)
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    exact = sizes * count / n
    take = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - take), kind="stable")
    take[remainder_order[:count - take.sum()]] += 1
    role = np.array(["train"] * n, dtype=object)
    for group, k in zip(groups, take):
        role[group[:k]] = "val"
    return pd.DataFrame({"id": list(ids), "role": role, "coverage_class": classes})


def kfold(ids: Sequence[str], coverage: np.ndarray, folds: int, seed: int) -> pd.DataFrame:
    """Assigns each id a fold 0..folds-1, stratified by coverage class; returns a frame id, fold, coverage_class."""
    if folds < 2:
        raise DataError(f"--folds: need at least 2 folds, got {folds}")
    classes = coverage_class(coverage)
    fold = np.zeros(len(ids), dtype=np.int64)
    offset = 0
    for group in _shuffled_by_class(ids, classes, seed):
        # Continue the round-robin across classes so small classes do not all land in fold 0.
        fold[group] = (np.arange(len(group)) + offset) % folds
        offset += len(group)
    return pd.DataFrame({"id": list(ids), "fold": fold, "coverage_class": classes})


def check_folds(images: int, folds: int, batch_size: int) -> None:
    """Every fold of a K-fold of `images` images (kfold: fold sizes differ by at most one) validates on at least
    one image (one batch, if a partial one) and trains on at least one full batch: checked for the whole K-fold
    at once, so no fold starts when a later one could not run.

    Raises:
        DataError: one line naming --folds and the largest K that works.
    """
    if folds > images:
        raise DataError(f"--folds={folds} with {images} labelled images leaves {folds - images} folds without a "
                        f"validation image; give --folds={images} or fewer")
    smallest_training = images - -(-images // folds)  # the folds holding ceil(images / K) images train on the rest
    if smallest_training < batch_size:
        raise DataError(f"--folds={folds} with {images} labelled images: a fold trains on only {smallest_training} "
                        f"images, fewer than --batch_size={batch_size}; lower --batch_size or add images")


def fold_split(ids: Sequence[str], coverage: np.ndarray, folds: int, fold: int, seed: int) -> pd.DataFrame:
    """The split of fold `fold` of a coverage-stratified K-fold (kfold): its images validate, the others train.

    Args:
        ids: the labelled ids.
        coverage: their salt coverage (fraction of salt pixels).
        folds: K >= 2.
        fold: 0 <= fold < K.
        seed: the --split_seed; every fold of one K-fold must use the same one.

    Returns:
        A frame id, role (train/val), fold, coverage_class: split.csv of a fold run, which names the whole K-fold
        so the folds' files can be checked against each other.
    """
    if not 0 <= fold < folds:
        raise DataError(f"--fold={fold} is not one of the {folds} folds; give --fold from 0 to {folds - 1}")
    frame = kfold(ids, coverage, folds, seed)
    frame.insert(1, "role", np.where(frame["fold"] == fold, "val", "train").astype(object))
    return frame


def write_split(frame: pd.DataFrame, path: str) -> None:
    """Writes a split CSV atomically (rundir.write_csv)."""
    rundir.write_csv(path, frame)


def read_split(path: str) -> pd.DataFrame:
    """Reads a split CSV written by write_split (id, role or fold, coverage_class)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: split file not found")
    frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    if "id" not in frame.columns or not ({"role", "fold"} & set(frame.columns)):
        raise DataError(f"{path}: not a split file (needs columns id and role or fold)")
    return frame
