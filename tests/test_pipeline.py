"""tf.data pipeline: reproducible, seed-dependent, aligned augmentation."""

import numpy as np
import pytest
import tensorflow as tf

from salt_tf import pipeline
from salt_tf.data import kaggle


def arrays(n=24, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, 101, 101, 1)).astype(np.float32)
    masks = (rng.random((n, 101, 101, 1)) < 0.3).astype(np.float32)
    return tf.constant(images), tf.constant(masks)


def collect(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def make(images, masks, seed=1, epoch=0, parallel=tf.data.AUTOTUNE, translate=12):
    return pipeline.train_dataset(images, masks, batch_size=5, seed=seed, epoch=epoch,
                                  augmentation=pipeline.Augmentation(hflip=True, translate=translate),
                                  num_parallel_calls=parallel)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_same_seed_same_batches_for_any_parallelism():
    images, masks = arrays()
    first = collect(make(images, masks))
    assert len(first) == 24 // 5  # drop_remainder
    assert_same_batches(first, collect(make(images, masks)))
    assert_same_batches(first, collect(make(images, masks, parallel=1)))


@pytest.mark.parametrize("change", [dict(seed=2), dict(epoch=1)])
def test_other_seed_or_epoch_gives_other_batches(change):
    images, masks = arrays()
    first = collect(make(images, masks))
    other = collect(make(images, masks, **change))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def reference_transforms(image, translate):
    """Every (flip, dy, dx) output the augmentation may produce, computed in NumPy."""
    outputs = {}
    for flip in (False, True):
        source = image[:, ::-1] if flip else image
        padded = np.pad(source, ((translate, translate), (translate, translate), (0, 0)), mode="reflect")
        for dy in range(2 * translate + 1):
            for dx in range(2 * translate + 1):
                outputs[(flip, dy, dx)] = padded[dy:dy + 101, dx:dx + 101]
    return outputs


def test_augmentation_keeps_masks_aligned_and_matches_numpy_reference():
    rng = np.random.default_rng(5)
    # The image carries the mask's pattern in channel 0 and noise in channel 1: after augmentation
    # channel 0 must still equal the mask, and the pair must be one of the reference transforms.
    masks = (rng.random((10, 101, 101, 1)) < 0.5).astype(np.float32)
    images = np.concatenate([masks, rng.random((10, 101, 101, 1)).astype(np.float32)], axis=-1)
    translate = 3
    seen = set()
    for epoch in range(3):
        order = pipeline.epoch_order(10, seed=4, epoch=epoch)
        dataset = pipeline.train_dataset(tf.constant(images), tf.constant(masks), batch_size=1, seed=4,
                                         epoch=epoch, augmentation=pipeline.Augmentation(True, translate))
        for k, (x, y) in enumerate(dataset):
            x, y = x.numpy()[0], y.numpy()[0]
            np.testing.assert_array_equal(x[..., :1], y)
            candidates = reference_transforms(images[order[k]], translate)
            matches = [key for key, out in candidates.items() if np.array_equal(out, x)]
            assert matches, "augmented image is not a flip/shift-with-reflection of its source"
            seen.update(matches)
    assert {flip for flip, _, _ in seen} == {False, True}
    assert len({(dy, dx) for _, dy, dx in seen}) > 5


def test_eval_dataset_is_every_example_in_order():
    images, masks = arrays(n=13)
    batches = collect(pipeline.eval_dataset(images, masks, batch_size=4))
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), images.numpy())


def test_depth_channel(demo_dir):
    data = kaggle.load_labelled(demo_dir)
    x, y = pipeline.to_arrays(data, use_depth=True)
    assert x.shape == (160, 101, 101, 2) and y.shape == (160, 101, 101, 1)
    np.testing.assert_allclose(x[:, 50, 50, 1], data.depths / 1000.0, rtol=1e-6)
    np.testing.assert_allclose(x[..., 0], data.images / 255.0, rtol=1e-6)


def np_crop_and_resize(image, scale, top, left, size=101):
    """Bilinear crop-and-resize in float64 from its definition: output pixel (i, j) samples the source at
    row (top + i * side / (size - 1)) * (H - 1), column likewise, side = 1 / scale."""
    h, w = image.shape[:2]
    side = 1.0 / scale
    rows = (top + np.arange(size) * side / (size - 1)) * (h - 1)
    cols = (left + np.arange(size) * side / (size - 1)) * (w - 1)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    img = image.astype(np.float64)
    top_row = img[r0][:, c0] * (1 - fc) + img[r0][:, c1] * fc
    bottom_row = img[r1][:, c0] * (1 - fc) + img[r1][:, c1] * fc
    return top_row * (1 - fr) + bottom_row * fr


@pytest.mark.parametrize("scale,top,left", [(1.0, 0.0, 0.0), (1.2, 0.1, 0.05), (1.13, 0.0, 0.115), (2.0, 0.5, 0.25)])
def test_zoom_crop_matches_numpy_bilinear(scale, top, left):
    image = np.random.default_rng(7).random((101, 101, 2)).astype(np.float32)
    got = pipeline.zoom_crop(tf.constant(image), tf.constant(scale), tf.constant(top), tf.constant(left)).numpy()
    np.testing.assert_allclose(got, np_crop_and_resize(image, scale, top, left), rtol=1e-5, atol=1e-5)
    if scale == 1.0:
        np.testing.assert_allclose(got, image, atol=1e-6)  # the whole image, unchanged


def test_zoom_keeps_mask_aligned_and_binary():
    """Channel 0 of the image is the mask itself: after zoom the re-thresholded mask is that channel > 0.5."""
    rng = np.random.default_rng(8)
    masks = (rng.random((6, 101, 101, 1)) < 0.5).astype(np.float32)
    images = np.concatenate([masks, 1.0 - rng.random((6, 101, 101, 1)).astype(np.float32)], axis=-1)
    dataset = pipeline.train_dataset(tf.constant(images), tf.constant(masks), batch_size=1, seed=3, epoch=0,
                                     augmentation=pipeline.Augmentation(hflip=False, zoom=1.2))
    changed = 0
    for x, y in dataset:
        x, y = x.numpy()[0], y.numpy()[0]
        assert x[..., 1].min() > 0.0  # channel 1 is in (0, 1]: a crop reaching outside the image would add 0s
        assert set(np.unique(y)) <= {0.0, 1.0}
        np.testing.assert_array_equal(y, (x[..., :1] > 0.5).astype(np.float32))
        changed += not any(np.array_equal(y, m) for m in masks)
    assert changed == 6  # every example got a zoom > 1


def test_brightness_contrast_touch_the_image_channel_only_within_bounds():
    rng = np.random.default_rng(9)
    images = rng.random((8, 101, 101, 2)).astype(np.float32)
    masks = (rng.random((8, 101, 101, 1)) < 0.5).astype(np.float32)
    b, c = 0.1, 0.2
    order = pipeline.epoch_order(8, seed=2, epoch=0)
    dataset = pipeline.train_dataset(tf.constant(images), tf.constant(masks), batch_size=1, seed=2, epoch=0,
                                     augmentation=pipeline.Augmentation(hflip=False, brightness=b, contrast=c))
    draws = []
    for k, (x, y) in enumerate(dataset):
        x, y, source = x.numpy()[0], y.numpy()[0], images[order[k]]
        np.testing.assert_array_equal(x[..., 1], source[..., 1])  # the depth plane is untouched
        np.testing.assert_array_equal(y, masks[order[k]])
        # x = (s - mean) * factor + mean + shift: fit factor and shift by least squares, check the bounds.
        s = source[..., 0].astype(np.float64).ravel()
        design = np.stack([s - s.mean(), np.ones_like(s)], axis=1)
        (factor, offset), *_ = np.linalg.lstsq(design, x[..., 0].astype(np.float64).ravel(), rcond=None)
        shift = offset - s.mean()
        np.testing.assert_allclose(design @ [factor, offset], x[..., 0].ravel(), atol=1e-5)
        assert 1 - c - 1e-6 <= factor <= 1 + c + 1e-6 and abs(shift) <= b + 1e-6
        draws.append(((factor - 1) / c, shift / b))
    draws = np.array(draws)
    assert np.abs(draws[:, 0] - draws[:, 1]).max() > 0.1  # contrast and brightness are drawn independently
    assert draws.min() < -0.2 and draws.max() > 0.2  # both directions occur


def test_new_augmentations_leave_flip_and_shift_keys_unchanged():
    """Turning zoom and intensity off gives exactly the batches of the flip + shift pipeline (old runs stay
    bit-identical), and turning them on changes them."""
    images, masks = arrays()
    old = collect(make(images, masks))
    explicit = collect(pipeline.train_dataset(images, masks, batch_size=5, seed=1, epoch=0,
                                              augmentation=pipeline.Augmentation(True, 12, 1.0, 0.0, 0.0)))
    assert_same_batches(old, explicit)
    zoomed = collect(pipeline.train_dataset(images, masks, batch_size=5, seed=1, epoch=0,
                                            augmentation=pipeline.Augmentation(True, 12, 1.2, 0.1, 0.1)))
    assert all(not np.array_equal(a[0], b[0]) for a, b in zip(old, zoomed))


AUGMENTED_BATCH_DIGEST = """
import hashlib, sys
import numpy as np, tensorflow as tf
from salt_tf import pipeline
rng = np.random.default_rng(0)
images = tf.constant(rng.random((12, 101, 101, 1)).astype(np.float32))
masks = tf.constant((rng.random((12, 101, 101, 1)) < 0.4).astype(np.float32))
digest = hashlib.sha256()
for x, y in pipeline.train_dataset(images, masks, batch_size=4, seed=5, epoch=3,
                                   augmentation=pipeline.Augmentation(True, 5, 1.2, 0.1, 0.15)):
    digest.update(x.numpy().tobytes() + y.numpy().tobytes())
print(digest.hexdigest())
"""


def test_augmentation_bit_reproducible_across_processes():
    import subprocess
    import sys

    # Two processes side by side (each is mostly TensorFlow's single-threaded start-up).
    processes = [subprocess.Popen([sys.executable, "-c", AUGMENTED_BATCH_DIGEST], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(process.communicate(timeout=300), process.returncode) for process in processes]
    for (_, stderr), returncode in results:
        assert returncode == 0, stderr[-3000:]
    outputs = [stdout.strip().splitlines()[-1] for (stdout, _), _ in results]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 64


def _indexed_images(n):
    """Image k is the constant k (mask 0): the batches then spell out the order examples are visited in."""
    images = np.repeat(np.arange(n, dtype=np.float32), 101 * 101).reshape(n, 101, 101, 1)
    return tf.constant(images), tf.constant(np.zeros_like(images))


def _visited(n, epoch, seed=3, batch_size=4, start_step=0):
    images, masks = _indexed_images(n)
    dataset = pipeline.train_dataset(images, masks, batch_size=batch_size, seed=seed, epoch=epoch,
                                     augmentation=pipeline.Augmentation(hflip=False, translate=0),
                                     start_step=start_step)
    return [int(v) for x, _ in dataset for v in x.numpy()[:, 0, 0, 0]]


def test_each_epoch_visits_the_examples_in_its_own_order():
    orders = [_visited(22, epoch) for epoch in range(4)]
    for order in orders:
        assert len(order) == 20 and len(set(order)) == 20 and set(order) <= set(range(22))  # 5 full batches
    assert len({tuple(o) for o in orders}) == 4          # a new shuffle every epoch
    assert _visited(22, 2) == orders[2]                   # and the same one when asked again


def test_a_resumed_epoch_continues_at_its_batch():
    whole = _visited(22, epoch=1)
    for start_step in (1, 3, 5):
        assert _visited(22, epoch=1, start_step=start_step) == whole[start_step * 4:]


def test_shifts_reach_both_extremes():
    rng = np.random.default_rng(9)
    images = rng.random((64, 101, 101, 1)).astype(np.float32)
    translate = 2
    shifts = set()
    dataset = pipeline.train_dataset(tf.constant(images), tf.constant(np.zeros_like(images)), batch_size=1,
                                     seed=0, epoch=0, augmentation=pipeline.Augmentation(False, translate))
    order = pipeline.epoch_order(64, seed=0, epoch=0)
    for k, (x, _) in enumerate(dataset):
        candidates = reference_transforms(images[order[k]], translate)
        shifts.update((dy, dx) for (flip, dy, dx), out in candidates.items()
                      if not flip and np.array_equal(out, x.numpy()[0]))
    # Offsets 0..2m along each axis (i.e. shifts -m..+m): both ends of both axes are drawn.
    assert {dy for dy, _ in shifts} == set(range(2 * translate + 1))
    assert {dx for _, dx in shifts} == set(range(2 * translate + 1))
