"""Test-time augmentation (TTA) and batched prediction of one model.

`predict_probabilities` and its two variants run, per batch, ONE compiled function (`tta_function`) that
stacks the views (identity, horizontal flip, optionally vertical flip) along the batch axis, runs the model
once in inference mode, un-flips each view's probabilities and averages them. The predict command and the
SavedModel export (salt_tf.serving, which puts the same compiled function in its graph) both use it.

TensorFlow is imported inside the functions, when a model is there to run: parsing --tta needs none.
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import numpy as np
from absl import flags

from salt_tf import IMAGE_SIZE

VIEWS = ("none", "hflip", "vflip")   # identity, left-right mirror, up-down mirror (in this order)
DEFAULT_TTA = ("none", "hflip")      # seismic images are not vertically symmetric: no vflip by default

# `progress(done, total)`: called after each batch with the images done so far (salt_tf.progress shows them).
ProgressCallback = Callable[[int, int], None]


def parse_tta(text: str) -> tuple[str, ...]:
    """The views of a --tta value: 'hflip' -> ('none', 'hflip'); 'none' -> ('none',); 'hflip,vflip' -> all three.

    Raises:
        flags.IllegalFlagValueError: not such a value (one line naming --tta).
    """
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    unknown = [n for n in names if n not in VIEWS]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise flags.IllegalFlagValueError(f"--tta={text}: expected 'none' or a comma list of hflip, vflip")
    return tuple(v for v in VIEWS if v == "none" or v in names)


_TTA_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _flip(t, view: str):
    """The view's flip of [B, H, W, ...]; each flip is its own inverse."""
    import tensorflow as tf

    if view == "hflip":
        return tf.reverse(t, axis=[2])
    if view == "vflip":
        return tf.reverse(t, axis=[1])
    return t


def tta_function(model, views: Sequence[str], channels: int):
    """The compiled TTA function of `model` for `views`: x [B,101,101,C] -> (mean probability [B,101,101],
    first view's probability [B,101,101], mean image-head salt probability [B] — NaN without a head). One
    trace per (model, views, channels), any batch size."""
    import tensorflow as tf

    from salt_tf import model as model_lib

    views = tuple(views)
    if not views or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
        raise ValueError(f"views must be distinct names from {VIEWS}, got {views}")
    cache = _TTA_FUNCTIONS.setdefault(model, {})
    key = (views, int(channels))
    if key not in cache:
        # The function refers to the model weakly: a strong reference from the cached value would keep the
        # WeakKeyDictionary's key (the model) alive forever.
        model_ref = weakref.ref(model)

        @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, channels], tf.float32)])
        def run(x):
            batch = tf.shape(x)[0]
            stacked = tf.concat([_flip(x, v) for v in views], axis=0)          # [V*B, H, W, C]
            outputs = model_lib.outputs_of(model_ref(), stacked, training=False)
            p = tf.sigmoid(tf.cast(outputs["mask"], tf.float32))[..., 0]      # [V*B, H, W]
            p = tf.reshape(p, [len(views), batch, tf.shape(p)[1], tf.shape(p)[2]])
            unflipped = [_flip(p[i], v) for i, v in enumerate(views)]
            if "has_salt" in outputs:
                has_salt = tf.reduce_mean(tf.reshape(tf.sigmoid(outputs["has_salt"]), [len(views), batch]), axis=0)
            else:
                has_salt = tf.fill([batch], float("nan"))
            return tf.add_n(unflipped) / float(len(views)), unflipped[0], has_salt

        cache[key] = run
    return cache[key]


def _predict(model, images: np.ndarray, batch_size: int, tta: Sequence[str], want_first: bool,
             progress: ProgressCallback | None = None):
    """(TTA mean [N,101,101], identity view [N,101,101] if `want_first` else None, head [N] or None): the model on
    `images` in batches of `batch_size`, calling `progress(done, N)` after each batch."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must be [N, {IMAGE_SIZE}, {IMAGE_SIZE}, C], got {images.shape}")
    run = tta_function(model, tta, images.shape[-1])
    n = len(images)
    mean = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    first = np.empty_like(mean) if want_first else None
    has_salt = np.empty(n, np.float32)
    for start in range(0, n, batch_size):
        m, f, h = run(images[start:start + batch_size])
        mean[start:start + batch_size] = m.numpy()
        has_salt[start:start + batch_size] = h.numpy()
        if want_first:
            first[start:start + batch_size] = f.numpy()
        if progress:
            progress(min(start + batch_size, n), n)
    return mean, first, (None if np.isnan(has_salt).all() else has_salt)


def predict_probabilities(model, images: np.ndarray, batch_size: int = 64, tta: Sequence[str] = DEFAULT_TTA,
                          progress: ProgressCallback | None = None) -> np.ndarray:
    """Salt probabilities of a model, averaged over test-time augmentation views.

    Args:
        model: a Keras model (mask logits; salt_tf.model's U-Net or any model of the same input and output).
        images: model inputs [N,101,101,C] (pipeline.model_inputs).
        batch_size: images per model call (each call runs batch x views images).
        tta: the views ("none", "hflip", "vflip"), each un-flipped before averaging.
        progress: called as progress(images done, N) after each batch.

    Returns:
        float32 [N,101,101].
    """
    return _predict(model, images, batch_size, tta, False, progress)[0]


def predict_with_head(model, images: np.ndarray, batch_size: int = 64, tta: Sequence[str] = DEFAULT_TTA,
                      progress: ProgressCallback | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities [N,101,101] as predict_probabilities, the image head's salt probability [N] averaged over
    the same views — None for a model without a head) from one pass; arguments as predict_probabilities."""
    mean, _, has_salt = _predict(model, images, batch_size, tta, False, progress)
    return mean, has_salt


def predict_plain_and_tta(model, images: np.ndarray, batch_size: int = 64, tta: Sequence[str] = DEFAULT_TTA,
                          progress: ProgressCallback | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(plain, TTA) probabilities from one pass: the plain prediction is the identity view of the TTA; and the
    image head's TTA salt probability [N] (None without a head); arguments as predict_probabilities."""
    if tta[0] != "none":
        raise ValueError("the first view must be 'none' to read the plain prediction off the TTA pass")
    mean, first, has_salt = _predict(model, images, batch_size, tta, True, progress)
    return first, mean, has_salt


def mean_head(heads: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The mean salt probability [N] of the models that have an image head (None if none has)."""
    present = [h for h in heads if h is not None]
    return np.mean(present, axis=0) if present else None
