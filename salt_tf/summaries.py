"""TensorBoard event files of a run, and what goes in them. The loop decides *when*; this module *how*: the
tags, the image grids and the HParams session.

    <run_dir>/events/          HParams session (the run's flags) for the HParams dashboard
    <run_dir>/events/train/    per-step scalars; on summary steps, per-variable statistics and gradients;
                               per-epoch training scalars
    <run_dir>/events/val/      per-epoch validation scalars, coverage-group scores, image grids

Per-variable tags drop the model's name and keep its readable path, so TensorBoard groups them by part of
the network: `encoder/level1/block0/conv1/kernel/norm`, `.../gradient_norm`, `.../update_ratio`,
histograms `.../values` and `.../gradients`.

A new statistic: compute it in `variable_statistics` (inside the compiled summary function) and write it in
`Summaries.step_statistics`; a new per-epoch scalar: a column of the loop's metrics row, tagged in
`Summaries.epoch`.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import tensorflow as tf

from salt_tf import metrics
from salt_tf import rundir


def variable_tag(variable) -> str:
    """The variable's path without the model name: `unet/encoder/...` -> `encoder/...`."""
    path = getattr(variable, "path", None) or variable.name.split(":")[0]
    head, _, rest = path.partition("/")
    return rest if head == "unet" and rest else path


class Summaries:
    """The event writers of one run directory, and every tag written to them."""

    def __init__(self, run_dir: str | None, *, images: int = 8, worst_images: int = 4,
                 hparams: dict | None = None):
        """Opens the writers of <run_dir>/events.

        Args:
          run_dir: the run directory; None writes nothing (every method is then a no-op), for a loop run
            without files (tools, tests).
          images: fixed, coverage-spread validation images drawn every epoch; 0 = none.
          worst_images: worst-scored validation images drawn every epoch; 0 = none.
          hparams: {flag: value} of the run for the HParams dashboard (written by `start`); None = none.
        """
        self.run_dir = run_dir
        self.images, self.worst_images, self.hparams_values = images, worst_images, hparams
        self.root = os.path.join(run_dir, rundir.EVENTS_DIR) if run_dir else None
        if run_dir:
            self.train = tf.summary.create_file_writer(os.path.join(self.root, "train"))
            self.val = tf.summary.create_file_writer(os.path.join(self.root, "val"))
        else:
            self.train = self.val = tf.summary.create_noop_writer()

    @property
    def enabled(self) -> bool:
        """Whether anything is written (the loop skips computing statistics nobody would see)."""
        return self.root is not None

    # ------------------------------------------------------------------------------- what the loop calls

    def start(self, baseline: dict) -> None:
        """A run's first session, before its first epoch: the HParams session and the starting model's
        validation loss and metric at step 0 (the baseline every epoch is compared with)."""
        if self.hparams_values is not None and self.enabled:
            self.hparams(self.hparams_values, run_name=os.path.basename(os.path.abspath(self.run_dir)))
        self.scalars(self.val, {"metric": baseline["val_metric"], "loss": baseline["val_loss"]}, step=0)

    def epoch(self, row: dict, best_metric: float, step: int) -> None:
        """The per-epoch scalars of the loop's metrics row (train_*, val_*), the best metric so far and the
        weights' fingerprint, at global step `step`."""
        self.scalars(self.train, {
            "epoch_loss": row["train_loss"], "epoch_gradient_norm": row["train_gradient_norm"],
            "epoch_learning_rate": row["learning_rate"], "images_per_second": row["train_images_per_second"],
            "epoch": row["epoch"],
            **{f"epoch_{name[len('train_'):]}": v for name, v in row.items() if name.startswith("train_loss/")},
        }, step)
        self.scalars(self.val, {
            "loss": row["val_loss"], "metric": row["val_metric"], "pixel_iou": row["val_pixel_iou"],
            "best_threshold": row["val_best_threshold"],
            "metric_at_best_threshold": row["val_metric_at_best_threshold"],
            "best_metric": best_metric,
            **{f"image_head/{name[len('val_image_'):]}": v for name, v in row.items()
               if name.startswith("val_image_")},
            **{f"metric_by_coverage/{name[len('val_metric_'):]}": v for name, v in row.items()
               if name[len("val_metric_"):] in metrics.COVERAGE_GROUPS},
        }, step)
        self.text(self.train, "weights_sha256", row["weights_sha256"], step)

    def validation_images(self, images: np.ndarray, truth: np.ndarray, probabilities: np.ndarray,
                          image_scores: np.ndarray, step: int, ids=None) -> None:
        """Grids of validation images with the true (green) and predicted (red) outlines, each tile labelled
        with its image's id and score (tile_label): the same images every epoch, and the epoch's worst-scored
        ones; with each grid, a text summary listing its tiles' ids and scores in order.

        Args:
          images: [N, 101, 101] the validation images (first channel).
          truth: [N, 101, 101] bool true masks.
          probabilities: [N, 101, 101] the model's probabilities (predicted = above 0.5).
          image_scores: [N] competition score of each image.
          step: the global step.
          ids: [N] the images' ids; None: split.csv's validation ids of the run directory (the validation set is
            in their order), else each image's position among them (#k).
        """
        if not self.enabled:
            return
        predicted = probabilities > 0.5
        ids = ids if ids is not None else self._split_validation_ids(len(images))
        names = [str(i) for i in ids] if ids is not None else [f"#{k}" for k in range(len(images))]

        def show(tag, indices, description):
            tiles = [tile_label(overlay(images[i], truth[i], predicted[i]), names[i], image_scores[i])
                     for i in indices]
            self.image(self.val, tag, grid(tiles), step, description)
            self.text(self.val, f"{tag}_ids", "  \n".join(f"tile {n + 1}: {names[i]} score {image_scores[i]:.4f}"
                                                          for n, i in enumerate(indices)), step)

        fixed = pick_display_indices(truth, self.images)
        if len(fixed):
            show("fixed_images", fixed, "the same validation images every epoch; green = truth, red = prediction; "
                 "each tile's id and score at its top")
        if self.worst_images:
            worst = np.argsort(image_scores, kind="stable")[:self.worst_images]
            show("worst_images", worst,
                 "lowest competition score this epoch; green = truth, red = prediction; each tile's id and score "
                 "at its top")

    def _split_validation_ids(self, count: int) -> list[str] | None:
        """The validation ids of the run directory's split.csv, in its order (the order train.split_data gives
        the validation set); None when there is no split.csv or it lists another number than `count`."""
        if not hasattr(self, "_val_ids"):
            from salt_tf.data import splits

            path = os.path.join(self.run_dir, rundir.SPLIT_FILE)
            split = splits.read_split(path) if os.path.isfile(path) else None
            self._val_ids = list(split.loc[split["role"] == "val", "id"]) if split is not None and \
                "role" in split.columns else None
        return self._val_ids if self._val_ids is not None and len(self._val_ids) == count else None

    def weight_average(self, metric: float, step: int) -> None:
        """The validation metric of the SWA weights (--swa_epochs)."""
        self.scalars(self.val, {"swa_metric": metric}, step)

    # ------------------------------------------------------------------------------- writing

    @staticmethod
    def scalars(writer, values: dict, step: int) -> None:
        with writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    @staticmethod
    def text(writer, name: str, value: str, step: int) -> None:
        with writer.as_default(step=step):
            tf.summary.text(name, value)

    @staticmethod
    def image(writer, name: str, rgb: np.ndarray, step: int, description: str = "") -> None:
        with writer.as_default(step=step):
            tf.summary.image(name, rgb[None], step=step, description=description)

    def step_statistics(self, scalars: dict, statistics: dict, variables, bn_statistics, step: int) -> None:
        """Writes a summary step: its scalars (losses, LR, ...) and what variable_statistics computed,
        under each variable's tag. Eager: a few hundred small writes."""
        from tensorboard.plugins.histogram import metadata as histogram_metadata

        statistics = {name: value.numpy() for name, value in statistics.items()}
        with self.train.as_default(step=step):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value)
            for k, variable in enumerate(variables):
                tag = variable_tag(variable)
                for name in ("norm", "mean", "std", "gradient_norm", "update_ratio"):
                    tf.summary.scalar(f"{tag}/{name}", statistics[name][k])
                for name in ("values", "gradients"):
                    tf.summary.write(f"{tag}/{name}", statistics[name][k],
                                     metadata=histogram_metadata.create_summary_metadata(f"{tag}/{name}", ""))
            for k, variable in enumerate(bn_statistics):
                tag = variable_tag(variable)
                tf.summary.scalar(f"{tag}/mean", statistics["bn_mean"][k])
                tf.summary.write(f"{tag}/values", statistics["bn_values"][k],
                                 metadata=histogram_metadata.create_summary_metadata(f"{tag}/values", ""))

    def hparams(self, values: dict, run_name: str) -> None:
        """Writes the run's flags as an HParams session, with the validation metrics it is judged by."""
        from tensorboard.plugins.hparams import api as hp

        with tf.summary.create_file_writer(self.root).as_default():
            hp.hparams_config(
                hparams=[hp.HParam(name) for name in sorted(values)],
                metrics=[hp.Metric("metric", group="val", display_name="val metric (per epoch)"),
                         hp.Metric("best_metric", group="val", display_name="best val metric"),
                         hp.Metric("metric_at_best_threshold", group="val", display_name="val metric, tuned threshold")])
            hp.hparams(values, trial_id=run_name)

    def flush(self) -> None:
        self.train.flush()
        self.val.flush()

    def close(self) -> None:
        self.train.close()
        self.val.close()


HISTOGRAM_BUCKETS = 30


class _Segments:
    """Many tensors flattened into one vector with a segment id per element, so statistics of every
    variable come from a handful of segment ops: tracing stays fast however many variables there are."""

    def __init__(self, tensors):
        sizes = [int(np.prod(t.shape)) for t in tensors]
        self.count = len(tensors)
        self.ids = tf.constant(np.repeat(np.arange(self.count), sizes), tf.int32)
        self.sizes = tf.constant(sizes, tf.float64)

    def flatten(self, tensors) -> tf.Tensor:
        return tf.concat([tf.reshape(tf.cast(t, tf.float64), [-1]) for t in tensors], axis=0)

    def sum(self, flat) -> tf.Tensor:
        return tf.math.segment_sum(flat, self.ids)

    def norm(self, flat) -> tf.Tensor:
        return tf.sqrt(self.sum(tf.square(flat)))

    def mean_std(self, flat) -> tuple[tf.Tensor, tf.Tensor]:
        mean = self.sum(flat) / self.sizes
        variance = tf.maximum(self.sum(tf.square(flat)) / self.sizes - tf.square(mean), 0.0)
        return mean, tf.sqrt(variance)

    def histograms(self, flat) -> tf.Tensor:
        """[count, buckets, 3] rows of (left edge, right edge, count): TensorBoard's histogram format."""
        low = tf.math.segment_min(flat, self.ids)
        high = tf.math.segment_max(flat, self.ids)
        high = tf.where(high > low, high, low + 1.0)  # a constant tensor still gets a valid range
        width = (high - low) / HISTOGRAM_BUCKETS
        bucket = tf.cast(tf.floor((flat - tf.gather(low, self.ids)) / tf.gather(width, self.ids)), tf.int32)
        bucket = tf.clip_by_value(bucket, 0, HISTOGRAM_BUCKETS - 1)
        counts = tf.math.bincount(self.ids * HISTOGRAM_BUCKETS + bucket, minlength=self.count * HISTOGRAM_BUCKETS,
                                  maxlength=self.count * HISTOGRAM_BUCKETS, dtype=tf.float64)
        counts = tf.reshape(counts, [self.count, HISTOGRAM_BUCKETS])
        edges = low[:, None] + width[:, None] * tf.range(HISTOGRAM_BUCKETS + 1, dtype=tf.float64)[None, :]
        return tf.stack([edges[:, :-1], edges[:, 1:], counts], axis=2)


def variable_statistics(variables, gradients, values_before, bn_statistics) -> dict:
    """Per-variable statistics of one training step as stacked tensors, computed inside the compiled
    summary step; `values_before` are the trainable variables' values before the update.
    Summaries.step_statistics writes them under each variable's tag."""
    trainable = _Segments(variables)
    values = trainable.flatten(variables)
    grads = trainable.flatten(gradients)
    mean, std = trainable.mean_std(values)
    norm = trainable.norm(values)
    statistics = {
        "norm": norm, "mean": mean, "std": std,
        "gradient_norm": trainable.norm(grads),
        # How far this step moved each variable relative to its size: ~1e-3 is the classic healthy range.
        "update_ratio": tf.math.divide_no_nan(trainable.norm(values - trainable.flatten(values_before)),
                                              trainable.norm(trainable.flatten(values_before))),
        "values": trainable.histograms(values),
        "gradients": trainable.histograms(grads),
    }
    if bn_statistics:
        moving = _Segments(bn_statistics)
        flat = moving.flatten(bn_statistics)
        statistics["bn_mean"] = moving.mean_std(flat)[0]
        statistics["bn_values"] = moving.histograms(flat)
    return statistics


def pick_display_indices(truth: np.ndarray, count: int) -> np.ndarray:
    """A fixed, coverage-spread choice of validation images: the same ones every epoch, so the grids of
    two epochs show the same images."""
    coverage = truth.reshape(len(truth), -1).mean(axis=1)
    order = np.argsort(coverage, kind="stable")
    count = min(count, len(order))
    return order[np.round(np.linspace(0, len(order) - 1, count)).astype(int)] if count else order[:0]


def overlay(image: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """An RGB tile: the image in gray, the true mask's outline in green, the predicted one's in red."""
    gray = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    tile = np.repeat(gray[..., None], 3, axis=2)
    kernel = np.ones((3, 3), np.uint8)
    for mask, colour in ((truth, (0, 255, 0)), (predicted, (255, 0, 0))):
        edge = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, kernel) > 0
        tile[edge] = colour
    return tile


LABEL_HEIGHT = 20  # the top rows of a tile that tile_label covers: two lines of OpenCV's small plain font


def tile_label(tile: np.ndarray, name: str, score: float) -> np.ndarray:
    """The tile with its image's name (line 1) and score (line 2, 4 decimals) in white on black over its top
    LABEL_HEIGHT rows (the grid keeps its size; the text names the image the pixels below belong to)."""
    labelled = tile.copy()
    labelled[:LABEL_HEIGHT] = 0
    for line, text in enumerate((name, f"{score:.4f}")):
        cv2.putText(labelled, text, (1, 8 + 10 * line), cv2.FONT_HERSHEY_PLAIN, 0.6, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return labelled


def grid(tiles: list[np.ndarray], columns: int = 4, gap: int = 2) -> np.ndarray:
    """Tiles [H,W,3] laid out in rows with a white gap."""
    rows = (len(tiles) + columns - 1) // columns
    height, width = tiles[0].shape[:2]
    canvas = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        canvas[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = tile
    return canvas
