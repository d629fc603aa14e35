"""TensorBoard summaries, read back from the event files."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from salt_tf import losses, metrics, model as model_lib, pipeline, summaries
from salt_tf.data import kaggle, splits
from train_helpers import TINY, run_tiny

EVERY = 4


def accumulate(path):
    accumulator = EventAccumulator(path, size_guidance={"tensors": 0, "images": 0, "scalars": 0,
                                                        "histograms": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_dir):
    model_dir = str(tmp_path_factory.mktemp("summaries") / "run")
    run_tiny(demo_dir, model_dir, epochs=1, summary_every_steps=EVERY, summary_images=8,
             summary_worst_images=4, profile_steps="1,3")
    return model_dir


def test_every_variable_has_value_and_gradient_summaries_on_summary_steps_only(run):
    train = accumulate(os.path.join(run, "events", "train"))
    tags = set(train.Tags()["tensors"])
    model = model_lib.build_model(model_lib.ModelConfig(base_width=TINY["base_width"], depth=TINY["depth"],
                                                        blocks_per_level=TINY["blocks_per_level"],
                                                        se_ratio=TINY["se_ratio"]))
    steps_per_epoch = (160 - TINY["val_images"]) // TINY["batch_size"]
    expected_steps = [s for s in range(steps_per_epoch) if s % EVERY == 0]
    for variable in model.trainable_variables:
        tag = summaries.variable_tag(variable)
        for suffix in ("values", "gradients", "norm", "gradient_norm", "update_ratio", "mean", "std"):
            name = f"{tag}/{suffix}"
            assert name in tags, name
            assert [e.step for e in train.Tensors(name)] == expected_steps, name
    for variable in model.non_trainable_variables:
        assert [e.step for e in train.Tensors(f"{summaries.variable_tag(variable)}/values")] == expected_steps
    # Per-step training scalars exist only on summary steps too.
    for name in ("loss", "gradient_norm", "learning_rate", "loss/bce", "loss/dice"):
        assert [e.step for e in train.Tensors(name)] == expected_steps, name
    histogram = tf.make_ndarray(train.Tensors("encoder/stem/kernel/values")[0].tensor_proto)
    kernel_size = int(np.prod(model.get_layer("encoder").stem.kernel.shape))
    assert histogram.shape == (summaries.HISTOGRAM_BUCKETS, 3) and histogram[:, 2].sum() == kernel_size


def test_logged_gradient_norm_matches_an_independent_computation(run, demo_dir):
    """Rebuild the step-0 state (same seed, same first batch) and compute the norms in float64 NumPy."""
    train = accumulate(os.path.join(run, "events", "train"))
    logged_global = float(tf.make_ndarray(train.Tensors("gradient_norm")[0].tensor_proto))
    logged_stem = float(tf.make_ndarray(train.Tensors("encoder/stem/kernel/gradient_norm")[0].tensor_proto))
    logged_loss = float(tf.make_ndarray(train.Tensors("loss")[0].tensor_proto))

    keras.utils.set_random_seed(0)
    model = model_lib.build_model(model_lib.ModelConfig(base_width=TINY["base_width"], depth=TINY["depth"],
                                                        blocks_per_level=TINY["blocks_per_level"],
                                                        se_ratio=TINY["se_ratio"]))
    data = kaggle.load_labelled(demo_dir)
    split = splits.read_split(os.path.join(run, "split.csv"))
    train_data = data.subset(list(split.loc[split["role"] == "train", "id"]))
    images, masks = (tf.constant(a) for a in pipeline.to_arrays(train_data, use_depth=False))
    first = next(iter(pipeline.train_dataset(images, masks, batch_size=TINY["batch_size"], seed=0, epoch=0,
                                             augmentation=pipeline.Augmentation(True, TINY["translate"]))))
    loss_fn = losses.CombinedLoss("bce:1,dice:1")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(loss_fn(first[1], model(first[0], training=True))[0])
    gradients = tape.gradient(loss, model.trainable_variables)
    grads64 = [g.numpy().astype(np.float64) for g in gradients]
    np.testing.assert_allclose(logged_loss, float(loss), rtol=1e-5)
    np.testing.assert_allclose(logged_global, np.sqrt(sum((g ** 2).sum() for g in grads64)), rtol=1e-4)
    stem = [g for v, g in zip(model.trainable_variables, grads64) if v.path.endswith("encoder/stem/kernel")][0]
    np.testing.assert_allclose(logged_stem, np.sqrt((stem ** 2).sum()), rtol=1e-4)


def test_variable_statistics_against_numpy():
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 2, 4), (4,), (7, 5)]
    before = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    after = [b + rng.standard_normal(b.shape).astype(np.float32) * 0.01 for b in before]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    after[1][:] = 0.5  # a constant tensor: one valid range, all counts in one bucket
    variables = [tf.Variable(a) for a in after]
    stats = {k: v.numpy() for k, v in summaries.variable_statistics(
        variables, [tf.constant(g) for g in grads], [tf.constant(b) for b in before], []).items()}
    for k, (a, b, g) in enumerate(zip(after, before, grads)):
        a64, b64, g64 = (x.astype(np.float64).ravel() for x in (a, b, g))
        np.testing.assert_allclose(stats["norm"][k], np.linalg.norm(a64), rtol=1e-9)
        np.testing.assert_allclose(stats["mean"][k], a64.mean(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats["std"][k], a64.std(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats["gradient_norm"][k], np.linalg.norm(g64), rtol=1e-9)
        np.testing.assert_allclose(stats["update_ratio"][k], np.linalg.norm(a64 - b64) / np.linalg.norm(b64),
                                   rtol=1e-9)
        histogram = stats["values"][k]
        assert histogram[:, 2].sum() == a64.size
        if a64.max() > a64.min():
            edges = np.linspace(a64.min(), a64.max(), summaries.HISTOGRAM_BUCKETS + 1)
            np.testing.assert_allclose(histogram[:, 0], edges[:-1], rtol=1e-9, atol=1e-12)
            expected = np.histogram(a64, bins=edges)[0]
            # Values sitting exactly on an inner edge may fall either side by rounding; totals agree.
            assert np.abs(histogram[:, 2] - expected).sum() <= 2
        else:
            assert histogram[0, 2] == a64.size


def image_shape(accumulator, tag):
    event = accumulator.Tensors(tag)[-1]
    encoded = tf.make_ndarray(event.tensor_proto)[2]  # [width, height, png]
    return tf.io.decode_png(encoded).shape


def test_image_grids_have_the_expected_shape(run):
    val = accumulate(os.path.join(run, "events", "val"))
    assert image_shape(val, "fixed_images") == (2 * 101 + 2, 4 * 101 + 3 * 2, 3)   # 8 tiles, 4 per row
    assert image_shape(val, "worst_images") == (101, 4 * 101 + 3 * 2, 3)
    for group in ("empty", "small", "medium", "large"):
        assert f"metric_by_coverage/{group}" in val.Tags()["tensors"]


def test_image_grids_show_the_right_images_in_order(tmp_path):
    """Which image lands in which tile, read back from the event file: each image is one gray level
    (20 * (k + 1)) so a tile names its image. Fixed images: 4 of 8 spread over coverage, by hand: the
    coverages below sort the images as 3, 6, 0, 5, 1, 7, 2, 4, and positions 0, 2, 5, 7 of that order are images
    3, 0, 7, 4. Worst images: the 4 lowest scores in ascending order, by hand: 5, 2, 6, 0."""
    rows_of_salt = [30, 50, 70, 0, 80, 40, 10, 60]  # image k's mask: its first rows_of_salt[k] rows
    images = np.stack([np.full((101, 101), 20 * (k + 1) / 255.0, np.float32) for k in range(8)])
    truth = np.zeros((8, 101, 101), bool)
    for k, rows in enumerate(rows_of_salt):
        truth[k, :rows] = True
    scores = np.array([0.4, 0.9, 0.2, 1.0, 0.8, 0.1, 0.3, 0.7])
    writer = summaries.Summaries(str(tmp_path), images=4, worst_images=4)
    writer.validation_images(images, truth, np.zeros((8, 101, 101), np.float32), scores, step=1)
    writer.close()
    val = accumulate(os.path.join(tmp_path, "events", "val"))

    def tile_grays(tag):
        encoded = tf.make_ndarray(val.Tensors(tag)[-1].tensor_proto)[2]
        picture = tf.io.decode_png(encoded).numpy()
        assert picture.shape == (101, 4 * 101 + 3 * 2, 3)
        # The bottom-right pixel of each tile: below every mask's outline, no prediction drawn.
        return [int(picture[100, c * 103 + 100, 0]) for c in range(4)]

    assert tile_grays("fixed_images") == [20 * (k + 1) for k in (3, 0, 7, 4)]
    assert tile_grays("worst_images") == [20 * (k + 1) for k in (5, 2, 6, 0)]


def test_overlay_draws_truth_green_and_prediction_red():
    image = np.full((101, 101), 0.5, np.float32)
    truth = np.zeros((101, 101), bool)
    truth[20:40, 20:40] = True
    predicted = np.zeros((101, 101), bool)
    predicted[60:80, 60:80] = True
    tile = summaries.overlay(image, truth, predicted)
    assert tuple(tile[20, 30]) == (0, 255, 0) and tuple(tile[60, 70]) == (255, 0, 0)
    assert tuple(tile[50, 50]) == (127, 127, 127)


def test_hparams_and_profile_are_written(run):
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    root = accumulate(os.path.join(run, "events"))
    tags = root.Tags()["tensors"]
    assert hparams_metadata.SESSION_START_INFO_TAG in tags and hparams_metadata.EXPERIMENT_TAG in tags
    content = root.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    assert start.hparams["base_width"].number_value == TINY["base_width"]
    assert start.hparams["loss"].string_value == "bce:1,dice:1"
    profiles = [f for _, _, files in os.walk(os.path.join(run, "events", "plugins", "profile")) for f in files]
    assert any(f.endswith(".xplane.pb") for f in profiles)


def test_coverage_groups_and_display_choice():
    truth = np.zeros((6, 10, 10), bool)
    truth[1, 0, 0] = True               # small (1%)
    truth[2, :3] = True                 # medium (30%)
    truth[3, :8] = True                 # large (80%)
    scores = np.array([1.0, 0.0, 0.5, 0.25, 1.0, 1.0])
    got = metrics.coverage_group_scores(truth, scores)
    assert got == {"empty": 1.0, "small": 0.0, "medium": 0.5, "large": 0.25}
    chosen = summaries.pick_display_indices(truth, 3)
    assert len(set(chosen)) == 3 and 3 in chosen  # spread over coverage, including the largest
