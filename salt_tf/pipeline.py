"""tf.data input pipelines: in-memory cache, stateless augmentation, batching, prefetch.

Every random choice is a pure function of (seed, epoch, example index):
  * the order of an epoch is a NumPy permutation seeded by (seed, epoch);
  * an example's augmentation draws from a stateless key folded from (seed, epoch, index).
So the batches of epoch e are the same whether the run started at epoch 0 or resumed at e, and parallel
`map` calls cannot change them (stateful random ops would also force tf.data to run serially under op
determinism). The whole labelled set is ~40 MB decoded, so it lives in memory as two tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from salt_tf import IMAGE_SIZE
from salt_tf.data.kaggle import DataError, LabelledSet

DEPTH_SCALE = 1000.0  # TGS depths are 50..960 feet; z / 1000 puts the depth plane on the image's scale.


@dataclasses.dataclass(frozen=True)
class Augmentation:
    hflip: bool = True      # left-right mirror: geology has no preferred horizontal direction
    translate: int = 0      # max shift in pixels along each axis; the uncovered border is reflected
    zoom: float = 1.0       # max scale of the zoom-and-crop: a crop of 101/s pixels, s in [1, zoom]; 1 = off
    brightness: float = 0.0  # max absolute shift added to the image (values in [0, 1]); 0 = off
    contrast: float = 0.0   # max relative change of the image's contrast about its mean; 0 = off

    def __post_init__(self):
        if not 0 <= self.translate < IMAGE_SIZE - 1:
            raise ValueError(f"--translate must be in [0, {IMAGE_SIZE - 2}], got {self.translate}")
        if not 1.0 <= self.zoom <= 2.0:
            raise ValueError(f"--zoom must be in [1, 2], got {self.zoom}")
        if not (0.0 <= self.brightness <= 0.5 and 0.0 <= self.contrast < 1.0):
            raise ValueError(f"--brightness must be in [0, 0.5] and --contrast in [0, 1), got {self.brightness} "
                             f"and {self.contrast}")


def model_inputs(ids: Sequence[str], images: np.ndarray, depths: np.ndarray, use_depth: bool) -> np.ndarray:
    """Model inputs of uint8 images, as training and prediction feed them.

    Args:
        ids: the images' ids (named by the error of a missing depth).
        images: uint8 [N,101,101].
        depths: float32 [N] in feet, NaN where unknown (kaggle.depth_array); read only with `use_depth`.
        use_depth: add the constant depth plane depth / DEPTH_SCALE as a second channel.

    Returns:
        float32 [N,101,101,C]: image / 255 (C = 1), plus the depth plane (C = 2).

    Raises:
        DataError: `use_depth` and an image without a depth.
    """
    x = images.astype(np.float32)[..., None] / 255.0
    if use_depth:
        if np.isnan(depths).any():
            missing = np.asarray(ids, dtype=object)[np.isnan(depths)][0]
            raise DataError(f"--use_depth: depths.csv has no depth for id {missing!r}; add it or drop --use_depth")
        plane = np.broadcast_to((depths / DEPTH_SCALE)[:, None, None, None], x.shape)
        x = np.concatenate([x, plane.astype(np.float32)], axis=-1)
    return x


def to_arrays(data: LabelledSet, use_depth: bool) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs [N,101,101,C] float32 (model_inputs) and masks [N,101,101,1] float32 in {0,1}."""
    return model_inputs(data.ids, data.images, data.depths, use_depth), data.masks.astype(np.float32)[..., None]


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order examples are visited in during `epoch`; a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def example_key(seed: int, epoch, index) -> tf.Tensor:
    """The stateless RNG key of one example in one epoch: shape [2] int64."""
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), tf.cast(epoch, tf.int64))
    return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def zoom_crop(image: tf.Tensor, scale, top, left) -> tf.Tensor:
    """The square of side 1/scale (as a fraction of the image) at fractional offset (top, left), resized back to
    101x101 by bilinear interpolation: [H, W, C] -> [101, 101, C]. Coordinates follow
    tf.image.crop_and_resize: fraction f is pixel f * (H - 1), so output pixel i samples row
    (top + i / 100 / scale) * 100."""
    side = 1.0 / scale
    box = tf.stack([top, left, top + side, left + side])[None]
    return tf.image.crop_and_resize(image[None], box, [0], [IMAGE_SIZE, IMAGE_SIZE], method="bilinear")[0]


# Keys of the augmentations added after flip and shift are folded from the example's key with these constants,
# so the flip and shift of an example (and with them every run without the new augmentations) stay as before.
_ZOOM_STREAM, _INTENSITY_STREAM = 1, 2


def augment(image: tf.Tensor, mask: tf.Tensor, key: tf.Tensor, config: Augmentation) -> tuple[tf.Tensor, tf.Tensor]:
    """Applies the same random flip, shift and zoom to an image [H,W,C] and its mask [H,W,1], then a brightness
    and contrast change to the image's first channel (not to a depth plane)."""
    flip_key, shift_key = tf.unstack(tf.random.experimental.stateless_split(key, num=2))
    if config.hflip:
        flip = tf.random.stateless_uniform([], flip_key) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        mask = tf.cond(flip, lambda: tf.reverse(mask, axis=[1]), lambda: mask)
    if config.translate:
        m = config.translate
        offset = tf.random.stateless_uniform([2], shift_key, minval=0, maxval=2 * m + 1, dtype=tf.int32)
        begin = tf.concat([offset, [0]], axis=0)
        paddings = [[m, m], [m, m], [0, 0]]
        image = tf.slice(tf.pad(image, paddings, mode="REFLECT"), begin, tf.shape(image))
        mask = tf.slice(tf.pad(mask, paddings, mode="REFLECT"), begin, tf.shape(mask))
    if config.zoom > 1.0:
        draw = tf.random.stateless_uniform([3], tf.random.experimental.stateless_fold_in(key, _ZOOM_STREAM))
        scale = 1.0 + draw[0] * (config.zoom - 1.0)
        room = 1.0 - 1.0 / scale  # the crop's offset keeps it inside the image
        image = zoom_crop(image, scale, draw[1] * room, draw[2] * room)
        mask = tf.cast(zoom_crop(mask, scale, draw[1] * room, draw[2] * room) > 0.5, mask.dtype)
    if config.brightness or config.contrast:
        draw = tf.random.stateless_uniform([2], tf.random.experimental.stateless_fold_in(key, _INTENSITY_STREAM),
                                           minval=-1.0, maxval=1.0)
        gray = image[..., :1]
        mean = tf.reduce_mean(gray)
        gray = (gray - mean) * (1.0 + config.contrast * draw[0]) + mean + config.brightness * draw[1]
        image = tf.concat([gray, image[..., 1:]], axis=-1)
    return image, mask


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True  # parallel map keeps input order: same batches for any parallelism
    return options


def train_dataset(images: tf.Tensor, masks: tf.Tensor, *, batch_size: int, seed: int, epoch: int,
                  augmentation: Augmentation, start_step: int = 0,
                  input_context: tf.distribute.InputContext | None = None,
                  num_parallel_calls: int = tf.data.AUTOTUNE, prefetch: int = tf.data.AUTOTUNE) -> tf.data.Dataset:
    """Augmented, shuffled batches of one epoch from global step `start_step` on; the last partial batch is
    dropped so every step has the same shape (no retracing) and the same weight in the average.

    `batch_size` is the global batch. Under tf.distribute (`input_context`, one per worker), this worker's
    pipeline takes its share of every global batch, cut into per-replica batches that its replicas take in
    turn: all replicas of all workers together see exactly the single-device batches, with the same
    augmentation (keyed by the example's index), whatever the number of devices."""
    order = epoch_order(int(images.shape[0]), seed, epoch)
    steps = steps_per_epoch(int(images.shape[0]), batch_size)
    pipelines, pipeline_id, per_replica = 1, 0, batch_size
    if input_context is not None:
        pipelines, pipeline_id = input_context.num_input_pipelines, input_context.input_pipeline_id
        per_replica = input_context.get_per_replica_batch_size(batch_size)
    # [step, pipeline, its share of the global batch]; sharding by example index, not by file.
    order = order[:steps * batch_size].reshape(steps, pipelines, -1)[start_step:, pipeline_id].reshape(-1)

    def load(index):
        key = example_key(seed, epoch, index)
        return augment(tf.gather(images, index), tf.gather(masks, index), key, augmentation)

    dataset = tf.data.Dataset.from_tensor_slices(order)
    dataset = dataset.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
    dataset = dataset.batch(per_replica, drop_remainder=True)
    return dataset.prefetch(prefetch).with_options(_options())


def eval_dataset(images: tf.Tensor, masks: tf.Tensor, *, batch_size: int) -> tf.data.Dataset:
    """Every example once, in order, unaugmented (the last batch may be smaller)."""
    dataset = tf.data.Dataset.from_tensor_slices((images, masks)).batch(batch_size)
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return num_examples // batch_size
