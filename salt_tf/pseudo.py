"""Pseudo-labels: which predicted images are confident enough to train on, and the labelled folder they make.

The rule (`--confidence`), per image, on its (TTA, ensemble-mean) salt probabilities p:

    band     1 - the share of pixels with BAND_LOW <= p <= BAND_HIGH (default [0.2, 0.8]): the rule of the
             first-place TGS team (b.e.s. & phalanx), who kept test images with at least 90% of the pixels
             outside [0.2, 0.8] (b.e.s.; phalanx 97%): a mask whose pixels are all nearly 0 or 1
    margin   the mean over pixels of |2p - 1|: 0 when every pixel is 0.5, 1 when every pixel is 0 or 1

An image is kept when its confidence >= --min_confidence (default 0.9: at most 10% uncertain pixels). The
pseudo-label is the mask p > --threshold (default 0.5).

The folder is written in the Kaggle layout the train command reads (`--extra_data_dir`, or `--data_dir` to
pre-train on it), with the predicted images only:

    <output>/train/images/<id>.png   the image file, copied byte for byte
    <output>/train/masks/<id>.png    the pseudo-label, 0/255
    <output>/train.csv               id,rle_mask
    <output>/depths.csv              id,z of the kept images (from the depths file; header only without one)
    <output>/confidence.csv          id,confidence,kept,salt_pixels of every predicted image

NumPy and files only: the models are run by salt_tf.cv.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from salt_tf import rundir
from salt_tf.data import kaggle

RULES = ("band", "margin")
DEFAULT_BAND = (0.2, 0.8)
DEFAULT_MIN_CONFIDENCE = 0.9
CONFIDENCE_FILE = "confidence.csv"


def confidence(probabilities: np.ndarray, rule: str = "band", band: Sequence[float] = DEFAULT_BAND) -> np.ndarray:
    """The confidence [N] of probability maps [N,H,W] under `rule` (see the module docstring).

    Args:
        probabilities: salt probabilities in [0, 1].
        rule: "band" or "margin".
        band: (low, high) of the uncertain band, for "band" (inclusive at both ends).
    """
    p = np.asarray(probabilities, dtype=np.float32).reshape(len(probabilities), -1)
    if rule == "band":
        low, high = band
        return 1.0 - np.mean((p >= low) & (p <= high), axis=1)
    if rule == "margin":
        return np.mean(np.abs(2.0 * p - 1.0), axis=1)
    raise ValueError(f"--confidence={rule}: expected one of {', '.join(RULES)}")


def table(ids: Sequence[str], confidences: np.ndarray, masks: np.ndarray, min_confidence: float) -> pd.DataFrame:
    """confidence.csv: id, confidence, kept (confidence >= min_confidence), salt_pixels of the mask."""
    return pd.DataFrame({"id": list(ids), "confidence": np.round(np.asarray(confidences, np.float64), 6),
                         "kept": np.asarray(confidences) >= min_confidence,
                         "salt_pixels": np.asarray(masks).reshape(len(ids), -1).sum(axis=1).astype(np.int64)})


def check_output(output: str) -> None:
    """A new folder only: raises DataError naming --output when it exists or its parent does not."""
    if os.path.exists(output):
        raise kaggle.DataError(f"--output={output} exists; give a new folder (pseudo-labels are written whole)")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise kaggle.DataError(f"--output={output}: folder {parent} does not exist")


def write_folder(output: str, frame: pd.DataFrame, image_paths: dict[str, str], masks: np.ndarray,
                 depths: dict[str, float] | None) -> None:
    """Writes the labelled folder of the kept rows of `frame` (table()) whole (rundir.staged_dir).

    Args:
        output: the new folder.
        frame: table() of every predicted image, in the order of `masks`.
        image_paths: {id: the image file to copy}.
        masks: pseudo-labels [N,H,W] bool, aligned with frame.
        depths: {id: z} or None (depths.csv then has its header only).
    """
    kept = frame.index[frame["kept"]].to_numpy()
    with rundir.staged_dir(output) as staging:
        for folder in ("images", "masks"):
            os.makedirs(os.path.join(staging, "train", folder))
        for row in kept:
            id_ = frame.at[row, "id"]
            with open(image_paths[id_], "rb") as f:
                rundir.write_bytes(os.path.join(staging, "train", "images", f"{id_}.png"), f.read())
            rundir.write_png(os.path.join(staging, "train", "masks", f"{id_}.png"), masks[row].astype(np.uint8) * 255)
        ids = frame.loc[kept, "id"].tolist()
        rundir.write_csv(os.path.join(staging, "train.csv"), pd.DataFrame(
            {"id": ids, "rle_mask": [kaggle.rle_encode(masks[row]) for row in kept]}))
        known = [i for i in ids if depths and i in depths]
        rundir.write_csv(os.path.join(staging, "depths.csv"),
                         pd.DataFrame({"id": known, "z": [depths[i] for i in known]}))
        rundir.write_csv(os.path.join(staging, CONFIDENCE_FILE), frame)
