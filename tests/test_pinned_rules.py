"""The rules a one-line bug slips through when only a whole run tests them (issue 38): each decision pinned on
both sides of its boundary, the iterative fit watched descending to a known optimum, the validation loss against
NumPy, post-processing rules in their documented order, cycle arithmetic and per-fold lines by hand."""

import math

import keras
import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from salt_tf import ensemble, loop, losses, model as model_lib, oof, postprocess, pseudo, schedules
from salt_tf import step as step_lib
from salt_tf.data import kaggle
from test_step import CONFIG, numpy_bce_per_image

LAST = 101 * 101  # the last pixel's 1-based run-length position


# ------------------------------------------------------------------------------------------ boundaries


def test_a_run_ending_exactly_at_the_last_pixel():
    last = np.zeros((101, 101), np.uint8)
    last[100, 100] = 1  # column-major: the last pixel of the image
    assert kaggle.rle_encode(last) == f"{LAST} 1"
    np.testing.assert_array_equal(kaggle.rle_decode(f"{LAST} 1"), last)
    two = last.copy()
    two[99, 100] = 1  # the pixel before it in column-major order
    np.testing.assert_array_equal(kaggle.rle_decode(f"{LAST - 1} 2"), two)
    assert kaggle.rle_encode(np.ones((101, 101))) == f"1 {LAST}"
    np.testing.assert_array_equal(kaggle.rle_decode(f"1 {LAST}"), np.ones((101, 101)))
    for past in (f"{LAST} 2", f"{LAST - 1} 3", f"{LAST + 1} 1", f"1 {LAST + 1}"):
        with pytest.raises(kaggle.DataError, match="past the image"):
            kaggle.rle_decode(past)


def test_adjacent_runs_decode_and_touching_runs_overlap():
    expected = np.zeros(LAST, np.uint8)
    expected[0:3] = 1
    np.testing.assert_array_equal(kaggle.rle_decode("1 2 3 1").T.reshape(-1), expected)  # run 2 starts after run 1
    with pytest.raises(kaggle.DataError, match="overlap"):
        kaggle.rle_decode("1 2 2 1")  # run 2 starts on run 1's last pixel


def test_a_probability_of_exactly_the_threshold_is_not_salt():
    below_or_at = np.float32(0.5)
    above = np.nextafter(np.float32(0.5), np.float32(1))
    probabilities = np.full((1, 101, 101), below_or_at, np.float32)
    probabilities[0, 50, 50] = above
    masks = postprocess.apply(probabilities, postprocess.PostProcessing(threshold=0.5))
    assert masks.sum() == 1 and masks[0, 50, 50]


def test_a_pseudo_label_of_exactly_the_minimum_confidence_is_kept():
    at = np.float32(0.9)
    below = np.nextafter(at, np.float32(0))
    table = pseudo.table(["at", "below"], np.array([at, below], np.float32), np.zeros((2, 101, 101), bool), 0.9)
    assert table["kept"].tolist() == [True, False]


# ------------------------------------------------------------------------------------------ rule order


def test_post_processing_rules_apply_in_their_documented_order():
    """threshold, then small components, then the empty rule, then the gate: on a hand-made case where each
    other order gives another mask."""
    p = np.zeros((3, 101, 101), np.float32)
    p[:, 0:3, 0] = 0.9            # a 3-pixel component in every image
    p[:, 10:15, 10] = 0.9         # a 5-pixel component
    p[1, 20:22, 20] = 0.9         # image 1 also has a 2-pixel one touching nothing
    p[2, 30:37, 30] = 0.9         # image 2: a 7-pixel one
    choice = postprocess.PostProcessing(threshold=0.5, min_component=4, min_salt=6, min_has_salt=0.5)
    masks = postprocess.apply(p, choice, has_salt=np.array([0.9, 0.9, 0.4]))
    # Image 0: components first leave 5 pixels (< 6: emptied); the empty rule first would keep 8, then 5.
    # Image 1: 10 pixels, components leave 5: emptied. Image 2: 15 -> 12 pixels kept by the empty rule, but the
    # gate (0.4 < 0.5) empties it.
    assert masks.sum(axis=(1, 2)).tolist() == [0, 0, 0]
    masks = postprocess.apply(p, choice, has_salt=np.array([0.9, 0.9, 0.6]))
    expected = np.zeros((101, 101), bool)
    expected[10:15, 10] = expected[30:37, 30] = True
    assert masks[:2].sum() == 0
    np.testing.assert_array_equal(masks[2], expected)


# ------------------------------------------------------------------------------------------ the iterative fit


# Features and labels where Newton's full step from the 7th iterate raises the loss (0.018 -> 0.30), found by a
# search over random small problems; l2 keeps the optimum finite though the data are separable.
OVERSHOOT_X = np.array([[6.0, 1.0, 0.0], [93.0, 2.0, 0.0], [-2.0, 0.0, 1.0], [-1.0, 0.0, -3.0]])
OVERSHOOT_Y = np.array([0, 0, 1, 0])
OVERSHOOT_L2 = 1e-3


def reference_loss(theta):
    """The regularized mean log-loss written out here (float64): theta = [w..., b]."""
    z = OVERSHOOT_X @ theta[:-1] + theta[-1]
    return float(np.mean(np.logaddexp(0.0, z) - OVERSHOOT_Y * z) + 0.5 * OVERSHOOT_L2 * np.sum(theta[:-1] ** 2))


def reference_gradient(theta):
    z = OVERSHOOT_X @ theta[:-1] + theta[-1]
    r = 1 / (1 + np.exp(-z)) - OVERSHOOT_Y
    return np.r_[OVERSHOOT_X.T @ r / len(r) + OVERSHOOT_L2 * theta[:-1], r.mean()]


def test_the_logistic_fit_descends_to_the_optimum_where_a_full_newton_step_overshoots():
    # The case is what it claims: plain Newton steps (written out here) raise the loss at some iterate.
    theta, rises = np.zeros(4), []
    for _ in range(12):
        z = OVERSHOOT_X @ theta[:-1] + theta[-1]
        p = 1 / (1 + np.exp(-z))
        xb = np.c_[OVERSHOOT_X, np.ones(4)]
        hessian = (xb * (p * (1 - p))[:, None]).T @ xb / 4 + np.diag([OVERSHOOT_L2] * 3 + [0.0])
        new = theta - np.linalg.solve(hessian, reference_gradient(theta))
        rises.append(reference_loss(new) > reference_loss(theta))
        theta = new
    assert any(rises)
    optimum = scipy.optimize.minimize(reference_loss, np.zeros(4), jac=reference_gradient, method="BFGS",
                                      options={"gtol": 1e-12, "maxiter": 10000}).x
    # Every iterate of the fit (max_iter = 1, 2, ...) has a loss no higher than the one before it.
    path = [reference_loss(np.zeros(4))]
    for iterations in range(1, 30):
        w, b = ensemble.fit_logistic(OVERSHOOT_X, OVERSHOOT_Y, OVERSHOOT_L2, max_iter=iterations)
        path.append(reference_loss(np.r_[w, b]))
    assert all(later <= earlier + 1e-15 for earlier, later in zip(path, path[1:])), path
    w, b = ensemble.fit_logistic(OVERSHOOT_X, OVERSHOOT_Y, OVERSHOOT_L2)
    assert abs(reference_loss(np.r_[w, b]) - reference_loss(optimum)) < 1e-9
    assert np.max(np.abs(reference_gradient(np.r_[w, b]))) < 1e-6


# ------------------------------------------------------------------------------------------ validation loss


def test_validation_loss_pairs_each_image_with_its_own_mask():
    rng = np.random.default_rng(5)
    images = rng.random((5, 101, 101, 1), dtype=np.float32)
    images[1] *= 0.2
    images[3] = np.linspace(0, 1, 101)[:, None, None]
    masks = np.zeros((5, 101, 101, 1), np.float32)
    masks[1] = 1.0                                        # images and masks that differ a lot, so any other
    masks[3, :50] = 1.0                                   # pairing of images and masks changes the loss
    masks[4] = (rng.random((101, 101, 1)) > 0.5)
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(CONFIG)
    head = [v for v in model.trainable_variables if "kernel" in v.path][-1]
    head.assign(head * 30)  # logits that differ from image to image (an untrained head gives ~0 everywhere)
    train_step = step_lib.TrainStep(model, keras.optimizers.SGD(0.1), losses.CombinedLoss("bce:1"), batch_size=2)
    results, probabilities, _ = loop.Validation(images, masks, batch_size=2).evaluate(train_step)  # 2 + 2 + 1
    logits = model(tf.constant(images), training=False).numpy()[..., 0].astype(np.float64)
    expected = numpy_bce_per_image(masks[..., 0], logits).mean()
    assert results["val_loss"] == pytest.approx(expected, rel=1e-5)
    shuffled = numpy_bce_per_image(np.roll(masks[..., 0], 1, axis=0), logits).mean()
    assert abs(shuffled - expected) > 1e-2 * expected  # the check can tell a mispairing
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), atol=1e-4)  # batches of 2 vs 5: float32


# ------------------------------------------------------------------------------------------ cycles


def test_cosine_cycle_arithmetic_by_hand():
    lr0, steps_per_epoch = 0.2, 3
    schedule = schedules.Schedule("cosine", lr0, cycles=3, epochs=6, steps_per_epoch=steps_per_epoch)
    # 2 epochs per cycle, 6 steps per cycle: step s has lr0/2 (cos(pi (s mod 6) / 6) + 1).
    expected = [lr0 / 2 * (math.cos(math.pi * (s % 6) / 6) + 1) for s in range(18)]
    assert [schedule.step_learning_rate(s) for s in range(18)] == pytest.approx(expected, abs=1e-12)
    assert schedule.step_learning_rate(6) == pytest.approx(lr0)  # the restart
    assert schedule.step_learning_rate(3) == pytest.approx(lr0 / 2)
    assert [schedule.current_cycle(e) for e in range(6)] == [0, 0, 1, 1, 2, 2]   # 0-based epochs
    lr = tf.Variable(lr0)
    finished = [schedule.end_epoch(e, 0.1 * e, lr).finished_cycle for e in range(1, 7)]  # 1-based epochs
    assert finished == [None, 0, None, 1, None, 2]


# ------------------------------------------------------------------------------------------ per-fold lines


def test_per_fold_line_averages_each_folds_own_images():
    truth = np.zeros((6, 101, 101), bool)
    truth[[0, 3], :10] = True
    fold = np.array([0, 1, 0, 1, 1, 0])
    at_half = np.array([1.0, 0.0, 0.5, 0.2, 1.0, 0.0])
    scored = {"scores_at_half": at_half, "scores_cv": 1 - at_half, "threshold": 0.5, "tuned": 0.45}
    summary = oof.summary(truth, scored, fold, ["none"])
    # By hand: fold 0 = images 0, 2, 5 -> (1 + 0.5 + 0) / 3; fold 1 = images 1, 3, 4 -> (0 + 0.2 + 1) / 3.
    assert summary["per_fold"] == {"0": {"images": 3, "at_half": pytest.approx(0.5)},
                                   "1": {"images": 3, "at_half": pytest.approx(0.4)}}
    assert "per fold @0.50: fold-0 0.5000 (3), fold-1 0.4000 (3)" in oof.format_summary(summary)
