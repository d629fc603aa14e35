"""Tests for salt_tf.losses against independent float64 NumPy references, brute force and a tiny overfit."""

import itertools
import math

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from salt_tf import losses

# ---------------------------------------------------------------------------------------------------------
# Independent float64 NumPy references (written from the papers / reference code, not from salt_tf).
# ---------------------------------------------------------------------------------------------------------


def np_log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def np_bce(y, z):
    y, z = y.reshape(len(y), -1).astype(np.float64), z.reshape(len(z), -1).astype(np.float64)
    return -(y * np_log_sigmoid(z) + (1 - y) * np_log_sigmoid(-z)).mean(axis=1)


def np_focal(y, z, gamma, alpha):
    y, z = y.reshape(len(y), -1).astype(np.float64), z.reshape(len(z), -1).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    p_t = np.where(y == 1, p, 1 - p)
    log_p_t = np.where(y == 1, np_log_sigmoid(z), np_log_sigmoid(-z))
    alpha_t = 1.0 if alpha is None or alpha < 0 else np.where(y == 1, alpha, 1 - alpha)
    return (-alpha_t * (1 - p_t) ** gamma * log_p_t).mean(axis=1)


def np_dice(y, z, smooth=1.0):
    y, z = y.reshape(len(y), -1).astype(np.float64), z.reshape(len(z), -1).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    return 1 - (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)


def np_elu_plus_one(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0))) + 1.0


def np_lovasz_grad(gt_sorted):
    """Port of lovasz_grad from bermanmaxim/LovaszSoftmax (pytorch/lovasz_losses.py)."""
    gts = gt_sorted.sum()
    intersection = gts - np.cumsum(gt_sorted)
    union = gts + np.cumsum(1.0 - gt_sorted)
    jaccard = 1.0 - intersection / union
    if len(gt_sorted) > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def np_lovasz_hinge_flat(logits, labels, elu_plus_one=False):
    """Port of lovasz_hinge_flat (one image, flattened)."""
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    perm = np.argsort(-errors, kind="stable")
    errors_sorted = errors[perm]
    grad = np_lovasz_grad(labels[perm])
    margins = np_elu_plus_one(errors_sorted) if elu_plus_one else np.maximum(errors_sorted, 0.0)
    return float(np.dot(margins, grad))


def np_lovasz(y, z, elu_plus_one=False):
    y, z = y.reshape(len(y), -1).astype(np.float64), z.reshape(len(z), -1).astype(np.float64)
    return np.array([np_lovasz_hinge_flat(zi, yi, elu_plus_one) for zi, yi in zip(z, y)])


def jaccard_loss_of_errors(truth, errors):
    """f(A): Jaccard loss when exactly the pixels in A are mispredicted (sets of pixel indices).

    The prediction is (truth \\ A) | (A \\ truth); an empty union (empty truth, no errors) counts as loss 0.
    """
    pred = (truth - errors) | (errors - truth)
    union = truth | pred
    return 0.0 if not union else 1.0 - len(truth & pred) / len(union)


def all_subset_losses(truth, n):
    """f over all 2**n subsets, keyed by frozenset."""
    return {
        frozenset(s): jaccard_loss_of_errors(truth, frozenset(s))
        for k in range(n + 1)
        for s in itertools.combinations(range(n), k)
    }


def brute_force_lovasz_extension(f, m):
    """Lovász extension of f at m: sum_i m_(i) * (f(S_i) - f(S_{i-1})), S_i = the i largest entries of m."""
    order = sorted(range(len(m)), key=lambda i: -m[i])
    total, prev, chain = 0.0, f[frozenset()], set()
    for i in order:
        chain.add(i)
        cur = f[frozenset(chain)]
        total += m[i] * (cur - prev)
        prev = cur
    return total


# ---------------------------------------------------------------------------------------------------------


def make_batch(rng, h=7, w=7, scale=3.0):
    """B=3: an empty mask, a full mask and a random ~40% mask, with random logits."""
    labels = np.zeros((3, h, w, 1), np.float32)
    labels[1] = 1.0
    labels[2] = (rng.random((h, w, 1)) < 0.4).astype(np.float32)
    logits = (scale * rng.standard_normal((3, h, w, 1))).astype(np.float32)
    return labels, logits


LOSS_FNS = {
    "bce": losses.bce,
    "focal": losses.focal,
    "focal_gamma_half": lambda y, z: losses.focal(y, z, gamma=0.5, alpha=0.75),
    "focal_no_alpha": lambda y, z: losses.focal(y, z, gamma=2.0, alpha=None),
    "dice": losses.dice,
    "lovasz": losses.lovasz_hinge,
    "lovasz_elu": lambda y, z: losses.lovasz_hinge(y, z, elu_plus_one=True),
    "lovasz_sym": losses.lovasz_symmetric,
    "lovasz_sym_elu": lambda y, z: losses.lovasz_symmetric(y, z, elu_plus_one=True),
}


def value_and_grad(fn, labels, logits):
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = fn(tf.constant(labels), logits)
        total = tf.reduce_sum(loss)
    return loss.numpy(), tape.gradient(total, logits).numpy()


class PixelLossTest(tf.test.TestCase, parameterized.TestCase):
    def test_bce_matches_reference(self):
        labels, logits = make_batch(np.random.default_rng(0))
        self.assertAllClose(losses.bce(labels, logits), np_bce(labels, logits), rtol=1e-5, atol=1e-6)

    @parameterized.parameters((2.0, 0.25), (0.0, 0.25), (0.5, 0.75), (1.0, None), (3.0, -1.0))
    def test_focal_matches_reference(self, gamma, alpha):
        labels, logits = make_batch(np.random.default_rng(1))
        got = losses.focal(labels, logits, gamma=gamma, alpha=alpha)
        self.assertAllClose(got, np_focal(labels, logits, gamma, alpha), rtol=1e-5, atol=1e-7)

    def test_focal_gamma0_no_alpha_is_bce(self):
        labels, logits = make_batch(np.random.default_rng(2))
        got = losses.focal(labels, logits, gamma=0.0, alpha=None)
        self.assertAllClose(got, np_bce(labels, logits), rtol=1e-5)

    @parameterized.parameters(1.0, 0.1)
    def test_dice_matches_reference(self, smooth):
        labels, logits = make_batch(np.random.default_rng(3))
        got = losses.dice(labels, logits, smooth)
        self.assertAllClose(got, np_dice(labels, logits, smooth), rtol=1e-5, atol=1e-6)

    def test_dice_empty_truth_and_empty_prediction_is_zero(self):
        labels = np.zeros((1, 7, 7, 1), np.float32)
        self.assertAllClose(losses.dice(labels, np.full_like(labels, -60.0)), [0.0], atol=1e-7)

    @parameterized.named_parameters(*[(name, name) for name in LOSS_FNS])
    def test_per_image_shape_and_dynamic_shapes_in_tf_function(self, name):
        fn = LOSS_FNS[name]
        spec = tf.TensorSpec([None, None, None, 1], tf.float32)
        traced = tf.function(fn, input_signature=[spec, spec])
        for h, w in [(7, 7), (5, 9)]:
            labels, logits = make_batch(np.random.default_rng(h * w), h, w)
            got = traced(labels, logits)
            self.assertEqual(got.shape, (3,))
            self.assertAllClose(got, fn(labels, logits), rtol=1e-6, atol=1e-7)

    @parameterized.product(
        name=list(LOSS_FNS),
        case=["empty", "full", "plus50", "minus50", "mixed50", "random"],
    )
    def test_gradients_finite(self, name, case):
        rng = np.random.default_rng(4)
        shape = (2, 7, 7, 1)
        labels = {"empty": np.zeros(shape), "full": np.ones(shape)}.get(case, rng.random(shape) < 0.5)
        logits = {
            "plus50": np.full(shape, 50.0),
            "minus50": np.full(shape, -50.0),
            "mixed50": 50.0 * np.sign(rng.standard_normal(shape)),
        }.get(case, 3.0 * rng.standard_normal(shape))
        for lab in (labels, np.zeros(shape), np.ones(shape)) if case.endswith("50") else (labels,):
            loss, grad = value_and_grad(LOSS_FNS[name], lab.astype(np.float32), logits.astype(np.float32))
            self.assertTrue(np.all(np.isfinite(loss)), (name, case, loss))
            self.assertTrue(np.all(np.isfinite(grad)), (name, case))


class LovaszTest(tf.test.TestCase, parameterized.TestCase):
    def test_descending_order_and_its_inverse_match_numpy(self):
        """The sort behind the weights: pixels by decreasing error, ties to the lower index (a stable sort of
        the negated errors), and the rank of each pixel (NumPy's argsort of the order)."""
        rng = np.random.default_rng(53)
        errors = np.round(rng.standard_normal((4, 257)) * 2.0).astype(np.float32)  # many ties
        order, inverse = (t.numpy() for t in losses._descending_order(tf.constant(errors)))
        want = np.argsort(-errors.astype(np.float64), axis=1, kind="stable")
        np.testing.assert_array_equal(order, want)
        np.testing.assert_array_equal(inverse, np.argsort(want, axis=1))

    @parameterized.parameters(False, True)
    def test_matches_reference_port(self, elu_plus_one):
        for seed, (h, w) in enumerate([(7, 7), (4, 9), (101, 101)]):
            labels, logits = make_batch(np.random.default_rng(10 + seed), h, w)
            got = losses.lovasz_hinge(labels, logits, elu_plus_one=elu_plus_one)
            self.assertAllClose(got, np_lovasz(labels, logits, elu_plus_one), rtol=2e-5, atol=1e-6)

    @parameterized.parameters(False, True)
    def test_gradient_matches_finite_differences_of_reference(self, elu_plus_one):
        """The weights are constants, so d loss / d logit_j = -sign_j * w_j * margin'(e_j) away from kinks."""
        labels, logits = make_batch(np.random.default_rng(20), 4, 4)
        _, grad = value_and_grad(lambda y, z: losses.lovasz_hinge(y, z, elu_plus_one), labels, logits)
        z = logits.astype(np.float64)
        fd = np.zeros_like(z)
        eps = 1e-6
        for idx in np.ndindex(z.shape):
            plus, minus = z.copy(), z.copy()
            plus[idx] += eps
            minus[idx] -= eps
            b = idx[0]
            fd[idx] = (
                np_lovasz(labels[b : b + 1], plus[b : b + 1], elu_plus_one)[0]
                - np_lovasz(labels[b : b + 1], minus[b : b + 1], elu_plus_one)[0]
            ) / (2 * eps)
        self.assertAllClose(grad, fd, atol=1e-5)

    @parameterized.parameters(False, True)
    def test_matches_brute_force_lovasz_extension(self, elu_plus_one):
        """Extension of the subset-enumerated Jaccard loss on 2x3 images; independent of the cumsum form."""
        rng = np.random.default_rng(30)
        n = 6
        label_sets = [np.zeros(n), np.ones(n)] + [(rng.random(n) < 0.5) for _ in range(6)]
        labels = np.stack(label_sets).astype(np.float32).reshape(-1, 2, 3, 1)
        logits = (2.0 * rng.standard_normal(labels.shape)).astype(np.float32)
        got = losses.lovasz_hinge(labels, logits, elu_plus_one=elu_plus_one).numpy()
        for b in range(len(labels)):
            y, z = labels[b].ravel().astype(np.float64), logits[b].ravel().astype(np.float64)
            errors = 1.0 - z * (2 * y - 1)
            m = np_elu_plus_one(errors) if elu_plus_one else np.maximum(errors, 0.0)
            f = all_subset_losses(frozenset(np.flatnonzero(y)), n)
            self.assertAllClose(got[b], brute_force_lovasz_extension(f, m), rtol=1e-5, atol=1e-6)

    def test_equals_jaccard_loss_on_indicator_vectors(self):
        """Lovász extension property: at m = 1_A it equals f(A), for every subset A of a 2x3 image."""
        rng = np.random.default_rng(40)
        n = 6
        subsets = [frozenset(s) for k in range(n + 1) for s in itertools.combinations(range(n), k)]
        indicators = np.array([[float(i in s) for i in range(n)] for s in subsets])
        for y in [np.zeros(n), np.ones(n)] + [(rng.random(n) < 0.5).astype(float) for _ in range(4)]:
            f = all_subset_losses(frozenset(np.flatnonzero(y)), n)
            want = np.array([f[s] for s in subsets])
            brute = np.array([brute_force_lovasz_extension(f, m) for m in indicators])
            self.assertAllClose(brute, want, atol=1e-12)
            # relu(errors) = m exactly when logit = sign * (1 - m): 0 for a counted error, +-1 otherwise.
            signs = 2 * y - 1
            logits = (signs * (1 - indicators)).astype(np.float32).reshape(-1, 2, 3, 1)
            labels = np.broadcast_to(y, indicators.shape).astype(np.float32).reshape(-1, 2, 3, 1)
            self.assertAllClose(losses.lovasz_hinge(labels, logits), want, atol=1e-6)

    def test_empty_mask_plain_hinge_single_pixel(self):
        rng = np.random.default_rng(50)
        labels = np.zeros((1, 7, 7, 1), np.float32)
        logits = rng.standard_normal(labels.shape).astype(np.float32)
        loss, grad = value_and_grad(losses.lovasz_hinge, labels, logits)
        self.assertAllClose(loss, [max(0.0, 1.0 + logits.max())], rtol=1e-6)
        self.assertEqual(np.count_nonzero(grad), 1)
        self.assertEqual(np.argmax(np.abs(grad)), np.argmax(logits))
        self.assertAllClose(grad.max(), 1.0)
        # Once every logit is below -1 the hinge is satisfied: zero loss and no gradient anywhere.
        loss, grad = value_and_grad(losses.lovasz_hinge, labels, logits - logits.max() - 1.5)
        self.assertAllClose(loss, [0.0])
        self.assertEqual(np.count_nonzero(grad), 0)

    def test_empty_mask_elu_variant_single_pixel_never_flat(self):
        rng = np.random.default_rng(51)
        labels = np.zeros((1, 7, 7, 1), np.float32)
        fn = lambda y, z: losses.lovasz_hinge(y, z, elu_plus_one=True)  # noqa: E731
        for shift in (0.0, -5.0):  # also with every logit already below -1
            logits = (rng.standard_normal(labels.shape) + shift).astype(np.float32)
            top = 1.0 + float(logits.max())
            loss, grad = value_and_grad(fn, labels, logits)
            self.assertAllClose(loss, [np_elu_plus_one(np.array(top))], rtol=1e-6)
            self.assertEqual(np.count_nonzero(grad), 1)
            self.assertEqual(np.argmax(np.abs(grad)), np.argmax(logits))
            self.assertAllClose(grad.max(), 1.0 if top > 0 else math.exp(top), rtol=1e-5)

    def test_full_mask_elu_variant_reaches_every_pixel(self):
        """All-salt image, margin > 1 everywhere: plain hinge is flat, elu+1 pushes every pixel (w = 1/N)."""
        labels = np.ones((1, 7, 7, 1), np.float32)
        logits = np.full(labels.shape, 3.0, np.float32)
        loss, grad = value_and_grad(losses.lovasz_hinge, labels, logits)
        self.assertAllClose(loss, [0.0])
        self.assertEqual(np.count_nonzero(grad), 0)
        loss, grad = value_and_grad(lambda y, z: losses.lovasz_hinge(y, z, True), labels, logits)
        self.assertAllClose(loss, [math.exp(-2.0)], rtol=1e-5)
        self.assertAllClose(grad, np.full(labels.shape, -math.exp(-2.0) / 49), rtol=1e-5)

    def test_deterministic_under_op_determinism(self):
        from tensorflow.python.framework import config as tf_config  # disable_op_determinism is not public

        was_enabled = tf_config.is_op_determinism_enabled()
        tf.config.experimental.enable_op_determinism()
        try:
            labels, logits = make_batch(np.random.default_rng(60), 101, 101)
            combined = losses.CombinedLoss("bce,focal,dice,lovasz,lovasz_elu")

            @tf.function
            def step(y, z):
                with tf.GradientTape() as tape:
                    tape.watch(z)
                    total, parts = combined(y, z)
                return total, parts, tape.gradient(tf.reduce_sum(total), z)

            first = step(tf.constant(labels), tf.constant(logits))
            second = step(tf.constant(labels), tf.constant(logits))
            for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(second)):
                self.assertAllEqual(a, b)
        finally:
            if not was_enabled:
                tf_config.disable_op_determinism()


class SpecTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(
        ("bce:1.0,lovasz:1.0", (("bce", 1.0), ("lovasz", 1.0))),
        ("focal:1,dice:1", (("focal", 1.0), ("dice", 1.0))),
        ("lovasz_elu", (("lovasz_elu", 1.0),)),
        (" bce : 0.5 , dice ", (("bce", 0.5), ("dice", 1.0))),
        ("dice:2e-1,bce:3", (("dice", 0.2), ("bce", 3.0))),
    )
    def test_valid(self, spec, want):
        self.assertEqual(losses.parse_loss_spec(spec), want)

    @parameterized.parameters(
        ("bce:1,lovaz:1", ["'lovaz'", "'bce:1,lovaz:1'",
                           "choose from bce, focal, dice, lovasz, lovasz_elu, lovasz_sym, lovasz_sym_elu"]),
        ("BCE", ["unknown loss 'BCE'"]),
        (":1", ["unknown loss ''"]),
        ("bce:-1", ["weight of 'bce' must be a positive finite number, got '-1'"]),
        ("bce:0", ["'bce'", "got '0'"]),
        ("dice:nan", ["'dice'", "got 'nan'"]),
        ("dice:inf", ["'dice'", "got 'inf'"]),
        ("focal:abc", ["'focal'", "got 'abc'"]),
        ("focal:", ["'focal'", "got ''"]),
        ("bce:1:2", ["'bce'", "got '1:2'"]),
        ("", ["empty loss spec"]),
        ("  ", ["empty loss spec"]),
        ("bce:1,,dice:1", ["empty item", "'bce:1,,dice:1'", "stray comma"]),
        ("bce:1,", ["empty item"]),
        ("bce:1,dice,bce:2", ["'bce'", "more than once", "'bce:1,dice,bce:2'"]),
    )
    def test_errors_are_one_clear_line(self, spec, fragments):
        with self.assertRaises(ValueError) as ctx:
            losses.parse_loss_spec(spec)
        message = str(ctx.exception)
        self.assertTrue(message.startswith("--loss: "), message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_custom_flag_name(self):
        with self.assertRaisesRegex(ValueError, r"^--switch_loss: unknown loss 'x'"):
            losses.parse_loss_spec("x", flag="--switch_loss")

    def test_format_round_trip(self):
        terms = losses.parse_loss_spec("bce:0.5,lovasz_elu:2")
        self.assertEqual(losses.parse_loss_spec(losses.format_loss_spec(terms)), terms)

    def test_loss_names_closed_set(self):
        self.assertEqual(losses.LOSS_NAMES,
                         ("bce", "focal", "dice", "lovasz", "lovasz_elu", "lovasz_sym", "lovasz_sym_elu"))


class SymmetricLovaszTest(tf.test.TestCase, parameterized.TestCase):
    """lovasz_sym against the NumPy port of the reference applied to (y, z) and to the mirrored (1 - y, -z)."""

    @parameterized.parameters(False, True)
    def test_matches_mean_of_reference_and_mirrored_reference(self, elu_plus_one):
        for seed, (h, w) in enumerate([(7, 7), (5, 9), (101, 101)]):
            labels, logits = make_batch(np.random.default_rng(40 + seed), h, w)
            want = 0.5 * (np_lovasz(labels, logits, elu_plus_one) + np_lovasz(1.0 - labels, -logits, elu_plus_one))
            got = losses.lovasz_symmetric(labels, logits, elu_plus_one=elu_plus_one)
            self.assertAllClose(got, want, rtol=2e-5, atol=1e-6)

    @parameterized.parameters(False, True)
    def test_one_shared_sort_gives_the_bits_of_a_sort_per_term(self, elu_plus_one):
        """Both terms rank pixels by the same errors, so lovasz_symmetric sorts once: its loss and gradient must
        be the very bits of the two hinges each sorting on its own (a run resumed across this change went on
        bit for bit). Logits rounded to quarters make many ties, where the order of equal errors matters."""
        rng = np.random.default_rng(52)
        labels, logits = make_batch(rng, 101, 101)
        for z in (logits, np.round(logits * 4.0) / 4.0):
            shared = tf.function(lambda y, x: losses.lovasz_symmetric(y, x, elu_plus_one))
            separate = tf.function(lambda y, x: 0.5 * (losses.lovasz_hinge(y, x, elu_plus_one)
                                                       + losses.lovasz_hinge(1.0 - y, -x, elu_plus_one)))
            got, got_grad = value_and_grad(shared, labels, z)
            want, want_grad = value_and_grad(separate, labels, z)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
            np.testing.assert_array_equal(got_grad.view(np.uint32), want_grad.view(np.uint32))

    def test_symmetric_in_the_classes(self):
        labels, logits = make_batch(np.random.default_rng(50))
        self.assertAllClose(losses.lovasz_symmetric(labels, logits), losses.lovasz_symmetric(1.0 - labels, -logits),
                            rtol=1e-6, atol=1e-7)

    def test_empty_mask_gets_gradient_on_every_wrong_pixel(self):
        """Hand-computed: on an empty 1x4 mask the mirrored term is the Lovász hinge of a full mask, whose
        weights are 1/4 each, so every pixel with margin -z < 1 gets gradient -1/4 * 1/2 from it."""
        labels = np.zeros((1, 1, 4, 1), np.float32)
        logits = np.array([-3.0, -0.5, 0.2, 2.0], np.float32).reshape(1, 1, 4, 1)
        loss, grad = value_and_grad(losses.lovasz_symmetric, labels, logits)
        # plain term: relu(1 + max z) = 3 on the pixel z=2 only; mirrored: mean of relu(1 + z) = (0+0.5+1.2+3)/4.
        self.assertAllClose(loss, [0.5 * (3.0 + (0.5 + 1.2 + 3.0) / 4.0)], atol=1e-6)
        self.assertAllClose(grad.ravel(), [0.0, 0.125, 0.125, 0.5 + 0.125], atol=1e-6)

    def test_usable_in_a_loss_mix(self):
        labels, logits = make_batch(np.random.default_rng(51))
        total, parts = losses.CombinedLoss("bce:1,lovasz_sym:0.5")(tf.constant(labels), tf.constant(logits))
        want = 0.5 * (np_lovasz(labels, logits) + np_lovasz(1.0 - labels, -logits))
        self.assertAllClose(parts["lovasz_sym"], want, rtol=2e-5, atol=1e-6)
        self.assertAllClose(total, np_bce(labels, logits) + 0.5 * want, rtol=2e-5, atol=1e-6)


class CombinedLossTest(tf.test.TestCase, parameterized.TestCase):
    def test_total_is_weighted_sum_of_references(self):
        labels, logits = make_batch(np.random.default_rng(70))
        combined = losses.CombinedLoss(
            "bce:0.5,focal:2,dice:1,lovasz:0.25,lovasz_elu:1.5", focal_gamma=1.5, focal_alpha=0.6
        )
        refs = {
            "bce": np_bce(labels, logits),
            "focal": np_focal(labels, logits, 1.5, 0.6),
            "dice": np_dice(labels, logits),
            "lovasz": np_lovasz(labels, logits),
            "lovasz_elu": np_lovasz(labels, logits, elu_plus_one=True),
        }
        weights = {"bce": 0.5, "focal": 2.0, "dice": 1.0, "lovasz": 0.25, "lovasz_elu": 1.5}
        total, parts = tf.function(combined)(tf.constant(labels), tf.constant(logits))
        self.assertEqual(list(parts), list(weights))
        for name, ref in refs.items():
            self.assertAllClose(parts[name], ref, rtol=1e-5, atol=1e-6)
        self.assertEqual(total.shape, (3,))
        self.assertAllClose(total, sum(weights[k] * refs[k] for k in refs), rtol=1e-5, atol=1e-6)

    def test_sequence_spec_equality_and_errors(self):
        a = losses.CombinedLoss("bce:1,lovasz:0.5")
        b = losses.CombinedLoss([("bce", 1), ("lovasz", 0.5)])
        self.assertEqual(a, b)
        self.assertEqual(hash(a), hash(b))
        self.assertNotEqual(a, losses.CombinedLoss("bce:1,lovasz_elu:0.5"))
        self.assertNotEqual(a, losses.CombinedLoss("bce:1,lovasz:0.5", focal_gamma=1.0))
        self.assertEqual(b.spec, "bce:1,lovasz:0.5")
        for bad, fragment in [([], "empty"), ([("lovaz", 1)], "'lovaz'"), ([("bce", -2)], "got '-2'"),
                              ([("bce", 1), ("bce", 1)], "more than once")]:
            with self.assertRaisesRegex(ValueError, fragment):
                losses.CombinedLoss(bad)


# ---------------------------------------------------------------------------------------------------------
# Overfit: a tiny conv net on six fixed 32x32 images (two with an empty mask) must learn with every loss.
# ---------------------------------------------------------------------------------------------------------


def blob_data(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size, 1), np.float32)
    for i in range(2, n):  # images 0 and 1 keep an empty mask, like ~39% of TGS
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(6, size - 6, 2)
            ry, rx = rng.uniform(3, 8, 2)
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            masks[i, ..., 0] = np.maximum(masks[i, ..., 0], blob)
    images = masks + rng.normal(0.0, 0.3, masks.shape).astype(np.float32)
    return images.astype(np.float32), masks


def pixel_iou(masks, logits):
    pred, truth = logits > 0, masks > 0.5
    return (pred & truth).sum() / max((pred | truth).sum(), 1)


class OverfitTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters("bce", "focal", "dice", "lovasz", "lovasz_elu", "bce:1,lovasz:1")
    def test_tiny_net_overfits(self, spec):
        keras.utils.set_random_seed(0)
        images, masks = blob_data()
        model = keras.Sequential(
            [
                keras.Input((32, 32, 1)),
                keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                keras.layers.Conv2D(1, 1),
            ]
        )
        optimizer = keras.optimizers.Adam(0.01)
        loss_fn = losses.CombinedLoss(spec)
        x, y = tf.constant(images), tf.constant(masks)

        @tf.function
        def train_step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(y, model(x))[0])
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        def evaluate():
            logits = model(x)
            return float(tf.reduce_mean(loss_fn(y, logits)[0])), pixel_iou(masks, logits.numpy())

        start_loss, start_iou = evaluate()
        for _ in range(200):
            train_step()
        end_loss, end_iou = evaluate()
        # Observed: every loss ends below 0.04x its start; IoU goes from ~0.1 to >0.9 (focal's alpha=0.25
        # makes it the slowest to cross the 0.5 threshold on salt pixels).
        self.assertLess(end_loss, 0.1 * start_loss, (spec, start_loss, end_loss))
        self.assertGreater(end_iou, 0.85, (spec, start_iou, end_iou))
        self.assertGreater(end_iou, start_iou + 0.5)


if __name__ == "__main__":
    tf.test.main()


class DeepSupervisionLossTest(tf.test.TestCase):
    """The deep-supervision total against NumPy: fused mask on every image, sides only where there is salt,
    image-level BCE on every image."""

    def test_total_and_terms_match_reference(self):
        rng = np.random.default_rng(80)
        labels, mask_logits = make_batch(rng)  # image 0 is empty, 1 full, 2 random
        sides = [(2.0 * rng.standard_normal(labels.shape)).astype(np.float32) for _ in range(3)]
        has_salt_logit = rng.standard_normal(3).astype(np.float32)
        loss = losses.DeepSupervisionLoss(losses.CombinedLoss("bce:1,lovasz:0.5"), side_weight=0.1,
                                          image_weight=0.05)
        outputs = {"mask": tf.constant(mask_logits), "sides": tuple(tf.constant(s) for s in sides),
                   "has_salt": tf.constant(has_salt_logit)}
        total, terms = tf.function(loss)(tf.constant(labels), outputs)

        def mask_loss(z):
            return np_bce(labels, z) + 0.5 * np_lovasz(labels, z)

        has_salt = np.array([0.0, 1.0, 1.0])
        side = sum(mask_loss(s) for s in sides) * has_salt
        image_bce = np_bce(has_salt.reshape(3, 1), has_salt_logit.astype(np.float64).reshape(3, 1))
        self.assertAllClose(terms["side"], side, rtol=2e-5, atol=1e-6)
        self.assertEqual(float(terms["side"][0]), 0.0)  # the empty image teaches the sides nothing
        self.assertAllClose(terms["image_bce"], image_bce, rtol=1e-5, atol=1e-6)
        self.assertAllClose(terms["bce"], np_bce(labels, mask_logits), rtol=1e-5, atol=1e-6)
        self.assertAllClose(total, mask_loss(mask_logits) + 0.1 * side + 0.05 * image_bce, rtol=2e-5, atol=1e-6)

    def test_plain_outputs_are_refused_and_weights_checked(self):
        loss = losses.DeepSupervisionLoss(losses.CombinedLoss("bce"))
        labels, logits = make_batch(np.random.default_rng(81))
        with self.assertRaisesRegex(ValueError, "deep_supervision=True"):
            loss(labels, logits)
        with self.assertRaisesRegex(ValueError, "--side_loss_weight"):
            losses.DeepSupervisionLoss(losses.CombinedLoss("bce"), side_weight=-1.0)
        self.assertEqual(loss, losses.DeepSupervisionLoss(losses.CombinedLoss("bce")))
        self.assertNotEqual(loss, losses.DeepSupervisionLoss(losses.CombinedLoss("bce"), image_weight=0.5))
