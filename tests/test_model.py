"""Tests for salt_tf.model: shapes, parameter/FLOP counts against independent references,
initialisation statistics, variable paths, checkpointing, seeding and BatchNorm modes."""

import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from salt_tf.model import (FusedBatchNormalization, ModelConfig, ResidualBlock, build_model, count_params,
                           forward_flops_per_image)

# Spatial sizes under repeated 2x2 'valid' max-pooling of a 101x101 image, written out by hand.
SIZES = [101, 50, 25, 12, 6, 3]


def _images(batch, channels=1, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=(batch, 101, 101, channels)), tf.float32)


def _build(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return build_model(ModelConfig(**kwargs))


def _expected_params(base_width, depth, blocks_per_level, se, se_ratio, input_channels, se_type="channel",
                     hypercolumn=False, deep_supervision=False):
    """Parameter count from the architecture definition; returns (total, non_trainable)."""
    bn_channels = 0

    def bn(c):
        nonlocal bn_channels
        bn_channels += c
        return 4 * c  # gamma, beta, moving mean, moving variance

    def conv(k, cin, cout, bias=True):
        return k * k * cin * cout + (cout if bias else 0)

    def se_gate(c):
        h = max(1, c // se_ratio)
        return (c * h + h) + (h * c + c)

    def block(cin, cout):
        # BN(cin) - conv3x3 (no bias, BN follows) - BN(cout) - conv3x3 (+bias) [- SE] [+ 1x1 projection]
        n = bn(cin) + conv(3, cin, cout, bias=False) + bn(cout) + conv(3, cout, cout)
        if cin != cout:
            n += conv(1, cin, cout)
        if se:
            n += se_gate(cout)
            if se_type == "scse":
                n += conv(1, cout, 1)  # spatial gate: 1x1 conv to one channel
        return n

    def stage(cin, cout):
        return block(cin, cout) + sum(block(cout, cout) for _ in range(blocks_per_level - 1))

    w = [base_width * 2**level for level in range(depth + 1)]
    total = conv(3, input_channels, base_width)  # stem
    prev = base_width
    for level in range(depth):
        total += stage(prev, w[level])
        prev = w[level]
    total += stage(w[depth - 1], w[depth])  # bottleneck
    for level in reversed(range(depth)):
        total += conv(3, w[level + 1], w[level])  # transposed conv (same parameter count as a conv)
        total += stage(2 * w[level], w[level])  # after concatenation with the skip
    head_in = sum(w[:depth]) if hypercolumn else base_width  # hypercolumn: every decoder level concatenated
    total += bn(head_in) + conv(1, head_in, 1)  # head
    if deep_supervision:
        total += sum(conv(1, w[level], 1) for level in range(depth))  # one side logit per decoder level
        total += w[depth] + 1  # image head: dense(bottleneck width -> 1)
    return total, 2 * bn_channels


class ModelTest(tf.test.TestCase, parameterized.TestCase):
    test_session = None  # tf.test.TestCase helper, not a test; keeps pytest from collecting it.
    # ------------------------------------------------------------------ shapes
    @parameterized.parameters(
        (2, 1, 1, 1), (2, 2, 1, 2), (2, 3, 2, 1), (4, 4, 1, 1), (2, 5, 1, 2), (3, 5, 2, 1), (4, 4, 2, 2)
    )
    def test_output_shape_and_dtype(self, base_width, depth, input_channels, blocks):
        model = _build(base_width=base_width, depth=depth, input_channels=input_channels,
                       blocks_per_level=blocks, dropout=0.1)
        for training in (False, True):
            out = model(_images(2, input_channels), training=training)
            self.assertEqual(out.shape, (2, 101, 101, 1))
            self.assertEqual(out.dtype, tf.float32)

    @parameterized.parameters(1, 2, 3, 4, 5)
    def test_every_level_has_the_hand_computed_size(self, depth):
        base_width = 2
        model = _build(base_width=base_width, depth=depth, blocks_per_level=1)
        x = _images(1)
        record = model.trace(x)
        shapes = {name: tuple(out.shape) for name, _, out in record}
        for level in range(depth):
            expected = (1, SIZES[level], SIZES[level], base_width * 2**level)
            self.assertEqual(shapes[f"encoder/level{level}"], expected)
            self.assertEqual(shapes[f"decoder/level{level}"], expected)  # upsample lands on the skip
        self.assertEqual(shapes["bottleneck"], (1, SIZES[depth], SIZES[depth], base_width * 2**depth))
        self.assertAllEqual(record[-1][2], model(x, training=False))

    def test_rejects_bad_configs_and_inputs(self):
        for kwargs in ({"depth": 0}, {"depth": 6}, {"base_width": 0}, {"blocks_per_level": 0},
                       {"se_ratio": 0}, {"dropout": 1.0}, {"input_channels": 0}, {"se_type": "spatial"},
                       {"pad_mode": "zero"}, {"input_size": 100}, {"input_size": 202}, {"input_size": 110, "depth": 6}):
            with self.assertRaises(ValueError):
                ModelConfig(**kwargs)
        model = _build(base_width=2, depth=1, blocks_per_level=1)
        with self.assertRaises(ValueError):
            model(tf.zeros([1, 96, 96, 1]))
        with self.assertRaises(ValueError):
            model(tf.zeros([1, 101, 101, 2]))

    # ------------------------------------------------------------------ parameter count
    def test_param_count_hand_enumerated(self):
        # base_width=2, depth=1, blocks=1, input 1 channel, written out term by term:
        #   stem 3*3*1*2+2 = 20
        #   encoder level0 block 2->2: bn 8 + conv1 36 + bn 8 + conv2 36+2 = 90
        #   bottleneck block 2->4: bn 8 + conv1 72 + bn 16 + conv2 144+4 + projection 8+4 = 256
        #   decoder level0: upsample 3*3*4*2+2 = 74; block 4->2: bn 16 + conv1 72 + bn 8
        #                   + conv2 36+2 + projection 8+2 = 144
        #   head: bn 8 + conv 2+1 = 11                                   total = 595
        # SE (r=2) adds: c=2 (h=1): 2+1+2+2 = 7 (x2 blocks); c=4 (h=2): 8+2+8+4 = 22 -> +36
        model = _build(base_width=2, depth=1, blocks_per_level=1, se=False)
        self.assertEqual(count_params(model), 595)
        model = _build(base_width=2, depth=1, blocks_per_level=1, se=True, se_ratio=2)
        self.assertEqual(count_params(model), 631)

    @parameterized.parameters(
        (2, 2, 1, True, 4, 1), (2, 2, 1, False, 4, 1), (2, 3, 2, True, 2, 2), (3, 2, 2, True, 8, 1),
        (2, 5, 1, True, 3, 1), (2, 3, 1, True, 2, 1, "scse"), (2, 3, 1, True, 2, 1, "channel", True),
        (3, 2, 1, False, 2, 2, "channel", False, True), (2, 3, 2, True, 4, 1, "scse", True, True, 128),
    )
    def test_param_count_formula(self, base_width, depth, blocks, se, se_ratio, input_channels, se_type="channel",
                                 hypercolumn=False, deep_supervision=False, input_size=101):
        model = _build(base_width=base_width, depth=depth, blocks_per_level=blocks, se=se,
                       se_ratio=se_ratio, input_channels=input_channels, se_type=se_type, hypercolumn=hypercolumn,
                       deep_supervision=deep_supervision, input_size=input_size)
        total, non_trainable = _expected_params(base_width, depth, blocks, se, se_ratio, input_channels, se_type,
                                                hypercolumn, deep_supervision)
        self.assertEqual(count_params(model), total)
        self.assertEqual(model.count_params(), total)  # Keras' own count agrees
        self.assertEqual(sum(int(np.prod(v.shape)) for v in model.non_trainable_variables), non_trainable)
        self.assertEqual(sum(int(np.prod(v.shape)) for v in model.trainable_variables), total - non_trainable)

    def test_dropout_rng_state_is_not_a_parameter(self):
        with_dropout = _build(base_width=2, depth=2, blocks_per_level=1, dropout=0.3)
        without = _build(base_width=2, depth=2, blocks_per_level=1)
        self.assertEqual(count_params(with_dropout), count_params(without))

    # ------------------------------------------------------------------ FLOPs
    def test_flops_hand_count(self):
        config = ModelConfig(base_width=2, depth=1, blocks_per_level=1, se=True, se_ratio=2)
        hw, hw2 = 101 * 101, 50 * 50
        expected = (
            2 * hw * 9 * 1 * 2  # stem
            + 2 * (2 * hw * 9 * 2 * 2) + (2 * 2 * 1 + 2 * 1 * 2)  # encoder block 2->2 + SE(2,1)
            + 2 * hw2 * 9 * 2 * 4 + 2 * hw2 * 9 * 4 * 4 + 2 * hw2 * 2 * 4  # bottleneck 2->4 + projection
            + (2 * 4 * 2 + 2 * 2 * 4)  # SE(4, 2)
            + 2 * hw2 * 9 * 4 * 2  # transposed conv: each of 50x50 inputs scatters 3x3x2 per 4 channels
            + 2 * hw * 9 * 4 * 2 + 2 * hw * 9 * 2 * 2 + 2 * hw * 4 * 2  # decoder block 4->2 + projection
            + (2 * 2 * 1 + 2 * 1 * 2)  # SE(2, 1)
            + 2 * hw * 2 * 1  # head 1x1
        )
        self.assertEqual(expected, 5723664)
        self.assertEqual(forward_flops_per_image(config), expected)

    @parameterized.parameters((2, 3, 2, True, 2), (3, 2, 1, False, 1), (2, 3, 1, True, 1, "scse", True, True, 128),
                              (2, 5, 1, True, 1, "scse", False, False, 128))
    def test_flops_match_tf_profiler(self, base_width, depth, blocks, se, input_channels, se_type="channel",
                                     hypercolumn=False, deep_supervision=False, input_size=101):
        """TF's graph profiler counts Conv2D and MatMul FLOPs (2*MACs) from the traced graph.

        Its Conv2DBackpropInput (transposed conv) statistic uses a different convention, so
        those ops are counted from their actual graph shapes: 2 * Hin * Win * kh * kw * Cout * Cin.
        """
        config = ModelConfig(base_width=base_width, depth=depth, blocks_per_level=blocks, se=se,
                             input_channels=input_channels, se_type=se_type, hypercolumn=hypercolumn,
                             deep_supervision=deep_supervision, input_size=input_size)
        keras.utils.set_random_seed(0)
        model = build_model(config)
        fn = tf.function(lambda x: model.forward(x, training=False)).get_concrete_function(
            tf.TensorSpec([1, 101, 101, input_channels], tf.float32))
        graph = fn.graph
        options = (tf.compat.v1.profiler.ProfileOptionBuilder(
            tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build())
        profile = tf.compat.v1.profiler.profile(graph=graph, cmd="graph", options=options)
        op_types = {op.name: op.type for op in graph.get_operations()}
        counted = 0
        stack = list(profile.children)
        while stack:
            node = stack.pop()
            if op_types.get(node.name) in ("Conv2D", "MatMul"):
                counted += node.float_ops
            stack.extend(node.children)
        transposed = 0
        for op in graph.get_operations():
            if op.type == "Conv2DBackpropInput":
                kh, kw, cout, cin = op.inputs[1].shape
                _, h, w, _ = op.inputs[2].shape
                transposed += 2 * h * w * kh * kw * cout * cin
        self.assertGreater(transposed, 0)
        self.assertEqual(forward_flops_per_image(config), counted + transposed)

    # ------------------------------------------------------------------ block definition
    @parameterized.parameters((3, 4, True), (4, 4, True), (4, 2, False), (3, 4, True, "scse"), (4, 4, True, "scse"))
    def test_residual_block_matches_reference(self, cin, cout, se, se_type="channel"):
        """Inference-mode block vs. a direct tf.nn re-implementation of the definition:
        pre = relu(bn1(x)); y = conv2(relu(bn2(conv1(pre)))); y *= sigmoid(W2 relu(W1 gap(y)));
        (scSE: y = y * channel gate + y * sigmoid(conv1x1(y))); out = y + (x if cin == cout else proj(pre))."""
        config = ModelConfig(se=se, se_ratio=2, se_type=se_type)
        block = ResidualBlock(cin, cout, config, name="block0")
        block.build((None, 7, 9, cin))
        rng = np.random.default_rng(1)
        for v in block.variables:
            value = rng.normal(size=v.shape)
            if v.path.endswith("moving_variance"):
                value = np.abs(value) + 0.2
            v.assign(value.astype(np.float32))
        w = {v.path.split("block0/", 1)[1]: tf.constant(v.numpy()) for v in block.variables}
        x = tf.constant(rng.normal(size=(2, 7, 9, cin)), tf.float32)

        def bn(t, name):
            return (w[f"{name}/gamma"] * (t - w[f"{name}/moving_mean"])
                    / tf.sqrt(w[f"{name}/moving_variance"] + 1e-3) + w[f"{name}/beta"])

        def conv(t, name):
            out = tf.nn.conv2d(t, w[f"{name}/kernel"], strides=1, padding="SAME")
            return out + w[f"{name}/bias"] if f"{name}/bias" in w else out

        self.assertNotIn("conv1/bias", w)
        pre = tf.nn.relu(bn(x, "bn1"))
        y = conv(tf.nn.relu(bn(conv(pre, "conv1"), "bn2")), "conv2")
        if se:
            prefix = "scse/se" if se_type == "scse" else "se"
            squeezed = tf.reduce_mean(y, axis=[1, 2])
            hidden = tf.nn.relu(squeezed @ w[f"{prefix}/squeeze/kernel"] + w[f"{prefix}/squeeze/bias"])
            gate = tf.sigmoid(hidden @ w[f"{prefix}/excite/kernel"] + w[f"{prefix}/excite/bias"])
            channel_gated = y * gate[:, None, None, :]
            if se_type == "scse":
                spatial = tf.sigmoid(tf.einsum("bhwc,c->bhw", y, w["scse/sse/gate/kernel"][0, 0, :, 0])
                                     + w["scse/sse/gate/bias"][0])
                y = channel_gated + y * spatial[..., None]
            else:
                y = channel_gated
        shortcut = x if cin == cout else conv(pre, "projection")
        self.assertAllClose(block(x, training=False), shortcut + y, rtol=1e-4, atol=1e-4)

    # ------------------------------------------------------------------ initialisation
    def test_he_normal_init_and_zero_bias(self):
        """Keras 3 he_normal = VarianceScaling(2, 'fan_in', 'truncated_normal'): samples a normal
        truncated at +-2 sigma with sigma = sqrt(2/fan_in)/0.87962566, so the std *after*
        truncation is sqrt(2/fan_in). fan_in = prod(shape[:-1]) (Conv2DTranspose kernels are
        (kh, kw, filters, in), so there it is kh*kw*filters)."""
        model = _build(seed=11, base_width=8, depth=2, blocks_per_level=1, se_ratio=2)
        normalised = []
        checked = 0
        for v in model.trainable_variables:
            value = v.numpy()
            name = v.path.rsplit("/", 1)[1]
            if name == "kernel":
                fan_in = int(np.prod(value.shape[:-1]))
                target = math.sqrt(2.0 / fan_in)
                self.assertLessEqual(np.abs(value).max(), 2 * target / 0.87962566 * (1 + 1e-5), v.path)
                normalised.append(value.ravel() / target)
                if value.size >= 256:
                    # Std of a sample std ~ sigma / sqrt(2n); allow 5 standard errors.
                    tol = 5.0 / math.sqrt(2 * value.size)
                    self.assertAllClose(value.std() / target, 1.0, atol=tol, msg=v.path)
                    self.assertAllClose(value.mean() / target, 0.0, atol=5.0 / math.sqrt(value.size))
                    checked += 1
            elif name == "bias":
                self.assertAllEqual(value, np.zeros_like(value), msg=v.path)
            elif name == "gamma":
                self.assertAllEqual(value, np.ones_like(value))
            elif name == "beta":
                self.assertAllEqual(value, np.zeros_like(value))
        self.assertGreaterEqual(checked, 8)
        pooled = np.concatenate(normalised)
        # Pooled over all kernels (~50k weights): std 1 within 1.5%; an un-rescaled truncated
        # normal would give 0.88, an untruncated one would exceed the +-2 sigma bound above.
        self.assertAllClose(pooled.std(), 1.0, atol=0.015)
        # Shape of the distribution: truncated normal with raw sigma s = 1/0.87962566 (in units
        # of the target std) cut at +-2s. P(|z| <= 1) = erf(1/(s*sqrt2)) / erf(sqrt2) ~ 0.650
        # (uniform with the same std: 0.577, untruncated normal: 0.683); and the largest
        # weights reach the +-2s cut.
        s = 1 / 0.87962566
        expected_inside = math.erf(1 / (s * math.sqrt(2))) / math.erf(math.sqrt(2))
        self.assertAllClose(np.mean(np.abs(pooled) <= 1.0), expected_inside, atol=0.01)
        self.assertGreater(np.abs(pooled).max(), 0.97 * 2 * s)
        for v in model.non_trainable_variables:
            expected = 1.0 if v.path.endswith("moving_variance") else 0.0
            self.assertAllEqual(v.numpy(), np.full(v.shape, expected))

    # ------------------------------------------------------------------ variable paths
    def test_variable_paths(self):
        model = _build(base_width=2, depth=3, blocks_per_level=2, dropout=0.1)
        paths = [v.path for v in model.variables]
        self.assertLen(set(paths), len(paths))
        for path in paths:
            self.assertRegex(path, r"^unet(/[a-z_]+[0-9]*)+$")
        expected = {
            "unet/encoder/stem/kernel",
            "unet/encoder/level0/block0/bn1/gamma",
            "unet/encoder/level0/block0/conv1/kernel",
            "unet/encoder/level0/block1/conv2/bias",
            "unet/encoder/level1/block0/projection/kernel",
            "unet/encoder/level1/block0/se/squeeze/kernel",
            "unet/encoder/level2/block1/se/excite/bias",
            "unet/bottleneck/block0/conv1/kernel",
            "unet/bottleneck/block1/bn2/moving_variance",
            "unet/bottleneck/dropout/rng_state",
            "unet/decoder/level2/upsample/kernel",
            "unet/decoder/level0/upsample/bias",
            "unet/decoder/level0/dropout/rng_state",
            "unet/decoder/level0/block0/projection/kernel",
            "unet/head/bn/moving_mean",
            "unet/head/conv/kernel",
        }
        self.assertContainsSubset(expected, set(paths))
        self.assertNotIn("unet/encoder/level0/block0/projection/kernel", paths)  # identity shortcut
        # Stable: a second model in the same process gets exactly the same paths.
        again = _build(base_width=2, depth=3, blocks_per_level=2, dropout=0.1)
        self.assertEqual([v.path for v in again.variables], paths)
        no_se = _build(base_width=2, depth=3, blocks_per_level=2, se=False)
        self.assertFalse([p for p in (v.path for v in no_se.variables) if "/se/" in p])

    # ------------------------------------------------------------------ checkpoint
    def test_checkpoint_saves_every_variable_and_restores(self):
        config = ModelConfig(base_width=2, depth=2, blocks_per_level=2, dropout=0.25)
        keras.utils.set_random_seed(3)
        model = build_model(config)
        # Give every variable distinct random values so each checkpoint tensor identifies
        # exactly one variable (and BN statistics / RNG states are not at their defaults).
        rng = np.random.default_rng(0)
        for v in model.variables:
            if v.dtype == "int64":
                v.assign(rng.integers(1, 2**31, size=v.shape))
            else:
                v.assign((np.abs(rng.normal(size=v.shape)) + 0.5).astype(np.float32))
        prefix = tf.train.Checkpoint(model=model).save(os.path.join(self.get_temp_dir(), "ckpt"))

        listed = dict(tf.train.list_variables(prefix))
        reader = tf.train.load_checkpoint(prefix)
        keys = [k for k in listed if k != "_CHECKPOINTABLE_OBJECT_GRAPH" and not k.startswith("save_counter")]
        values = {k: reader.get_tensor(k) for k in keys}
        matched = set()
        for v in model.variables:
            value = v.numpy()
            hits = [k for k, saved in values.items() if saved.shape == value.shape and np.array_equal(saved, value)]
            self.assertLen(hits, 1, msg=f"{v.path} saved {len(hits)} times")
            key = hits[0]
            self.assertEqual(tuple(listed[key]), tuple(v.shape))
            # Checkpoint keys follow the same readable hierarchy (the last component may be
            # Keras' private attribute name, e.g. "_kernel").
            parent = v.path.split("/", 1)[1].rsplit("/", 1)[0]
            self.assertTrue(key.startswith(f"model/{parent}/"), msg=(key, v.path))
            matched.add(key)
        self.assertLen(matched, len(model.variables))
        self.assertEqual(matched, set(keys))  # nothing saved that is not a model variable

        keras.utils.set_random_seed(4)
        fresh = build_model(config)
        x = _images(2)
        self.assertNotAllClose(fresh(x, training=False), model(x, training=False))
        tf.train.Checkpoint(model=fresh).restore(prefix).assert_consumed()
        for a, b in zip(model.variables, fresh.variables):
            self.assertEqual(a.path, b.path)
            self.assertAllEqual(a.numpy(), b.numpy())
        self.assertAllEqual(fresh(x, training=False), model(x, training=False))
        # Training mode too: batch statistics and the restored dropout RNG state give identical masks.
        self.assertAllEqual(fresh(x, training=True), model(x, training=True))

    # ------------------------------------------------------------------ seeding
    def test_same_seed_same_weights_different_seed_different(self):
        kwargs = dict(base_width=2, depth=2, blocks_per_level=1, dropout=0.2)
        a = _build(seed=5, **kwargs)
        b = _build(seed=5, **kwargs)
        c = _build(seed=6, **kwargs)
        self.assertEqual(len(a.variables), len(b.variables))
        for va, vb in zip(a.variables, b.variables):
            self.assertAllEqual(va.numpy(), vb.numpy(), msg=va.path)
        differing = [va.path for va, vc in zip(a.variables, c.variables) if not np.array_equal(va.numpy(), vc.numpy())]
        kernels = [v.path for v in a.variables if v.path.endswith("kernel") or v.path.endswith("rng_state")]
        self.assertContainsSubset(kernels, differing)
        x = _images(2)
        self.assertAllEqual(a(x, training=True), b(x, training=True))

    # ------------------------------------------------------------------ BatchNorm / dropout modes
    def test_batchnorm_training_vs_inference(self):
        model = _build(base_width=2, depth=2, blocks_per_level=1)
        x = _images(4, seed=1)

        def moving():
            return {v.path: v.numpy().copy() for v in model.non_trainable_variables}

        before = moving()
        self.assertNotEmpty(before)
        eval1 = model(x, training=False)
        eval2 = model(x, training=False)
        self.assertAllEqual(eval1, eval2)
        for path, value in moving().items():
            self.assertAllEqual(value, before[path], msg=path)

        # Independent reference for the first BN: moving = 0.9 * moving + 0.1 * batch stat
        # (biased batch variance), its input being the stem output.
        stem_out = model.encoder.stem(x).numpy()
        train_out = model(x, training=True)
        after = moving()
        for path in before:
            self.assertFalse(np.array_equal(after[path], before[path]), msg=path)
        first = "unet/encoder/level0/block0/bn1/"
        self.assertAllClose(after[first + "moving_mean"], 0.1 * stem_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)
        self.assertAllClose(after[first + "moving_variance"], 0.9 + 0.1 * stem_out.var(axis=(0, 1, 2)),
                            rtol=1e-5, atol=1e-6)
        self.assertNotAllClose(train_out, eval1)  # batch statistics differ from the moving ones

        # Inside tf.function: training updates, inference does not.
        @tf.function
        def forward(images, training):
            return model(images, training=training)

        forward(x, False)
        self.assertAllClose(moving(), after)
        forward(x, True)
        for path, value in moving().items():
            self.assertFalse(np.array_equal(value, after[path]), msg=path)

    @parameterized.parameters(True, False)
    def test_fused_batchnorm_matches_float64_reference(self, training):
        """Output, input/gamma/beta gradients and moving statistics against the textbook formulas."""
        rng = np.random.default_rng(3)
        x64 = rng.normal(1.5, 2.0, size=(3, 5, 4, 6))
        gamma, beta = rng.normal(1.0, 0.3, 6), rng.normal(0.0, 0.5, 6)
        moving_mean, moving_var = rng.normal(0.0, 1.0, 6), rng.uniform(0.5, 2.0, 6)
        upstream = rng.normal(size=x64.shape)  # d loss / d y
        eps, momentum = 1e-3, 0.9
        layer = FusedBatchNormalization(momentum=momentum, epsilon=eps)
        layer.build(x64.shape)
        for variable, value in ((layer.gamma, gamma), (layer.beta, beta), (layer.moving_mean, moving_mean),
                                (layer.moving_variance, moving_var)):
            variable.assign(value.astype(np.float32))
        x = tf.constant(x64, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(y * tf.constant(upstream, tf.float32))
        dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])

        axes, n = (0, 1, 2), x64.size // 6
        if training:
            mean, var = x64.mean(axis=axes), x64.var(axis=axes)  # biased, as used for normalising
        else:
            mean, var = moving_mean, moving_var
        inv = 1.0 / np.sqrt(var + eps)
        xhat = (x64 - mean) * inv
        expected_y = gamma * xhat + beta
        expected_dbeta = upstream.sum(axis=axes)
        expected_dgamma = (upstream * xhat).sum(axis=axes)
        if training:  # the batch statistics depend on x too
            expected_dx = gamma * inv / n * (n * upstream - expected_dbeta - xhat * expected_dgamma)
            expected_moving = (momentum * moving_mean + (1 - momentum) * mean,
                               momentum * moving_var + (1 - momentum) * var)
        else:
            expected_dx = gamma * inv * upstream
            expected_moving = (moving_mean, moving_var)
        self.assertAllClose(y, expected_y, rtol=1e-4, atol=1e-4)
        self.assertAllClose(dx, expected_dx, rtol=1e-3, atol=1e-4)
        self.assertAllClose(dgamma, expected_dgamma, rtol=1e-3, atol=1e-3)
        self.assertAllClose(dbeta, expected_dbeta, rtol=1e-4, atol=1e-4)
        self.assertAllClose(layer.moving_mean, expected_moving[0], rtol=1e-5, atol=1e-5)
        self.assertAllClose(layer.moving_variance, expected_moving[1], rtol=1e-5, atol=1e-5)

    def test_mixed_bfloat16_computes_in_bfloat16_with_the_same_float32_variables(self):
        config = dict(base_width=4, depth=2, blocks_per_level=1)
        full = _build(seed=5, **config)
        keras.utils.set_random_seed(5)
        mixed = build_model(ModelConfig(**config), precision="mixed_bfloat16")
        self.assertEqual(keras.config.dtype_policy().name, "float32")  # the global policy is left alone
        self.assertEqual(mixed.encoder.level0.block0.conv1.compute_dtype, "bfloat16")
        for a, b in zip(full.variables, mixed.variables, strict=True):
            self.assertEqual((a.path, b.dtype), (b.path, "float32"))
            self.assertAllEqual(a, b)
        x = _images(2, seed=4)
        reference = full(x, training=False).numpy()
        logits = tf.cast(mixed(x, training=False), tf.float32).numpy()
        self.assertFalse(np.array_equal(logits, reference))  # bfloat16 arithmetic really happened
        # bfloat16 keeps 8 significant bits (relative step 2**-8); a few layers of rounding stay ~1e-2.
        scale = np.abs(reference).max()
        self.assertLess(np.abs(logits - reference).max(), 0.05 * scale)
        with self.assertRaisesRegex(ValueError, "precision"):
            build_model(ModelConfig(**config), precision="float16")

    def test_dropout_only_in_training(self):
        model = _build(base_width=2, depth=2, blocks_per_level=1, dropout=0.5)
        x = _images(2)
        state = lambda: [v.numpy().copy() for v in model.variables if v.path.endswith("rng_state")]  # noqa: E731
        s0 = state()
        self.assertLen(s0, 3)  # bottleneck + two decoder levels
        self.assertAllEqual(model(x, training=False), model(x, training=False))
        self.assertAllEqual(state(), s0)
        t1 = model(x, training=True)
        t2 = model(x, training=True)
        self.assertNotAllClose(t1, t2)  # fresh masks each step (BN stats alone give equal outputs)
        for a, b in zip(state(), s0):
            self.assertAllEqual(a, b + np.array([0, 2]))

    def test_gradients_reach_every_trainable_variable(self):
        model = _build(base_width=2, depth=2, blocks_per_level=1, dropout=0.1)
        x = _images(2)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        for v, g in zip(model.trainable_variables, grads):
            self.assertIsNotNone(g, msg=v.path)
            self.assertTrue(np.all(np.isfinite(g.numpy())), msg=v.path)


if __name__ == "__main__":
    tf.test.main()


# Sizes of a 128x128 network under 2x2 'valid' pooling, by hand: five clean halvings.
SIZES_128 = [128, 64, 32, 16, 8, 4]


class RecipeOptionsTest(tf.test.TestCase, parameterized.TestCase):
    """Padded input, hypercolumn head and deep supervision (issue 18), against hand-computed references."""

    test_session = None

    @parameterized.parameters(("reflect", 128), ("edge", 128), ("reflect", 120), ("edge", 104))
    def test_padded_network_is_the_centre_of_the_network_on_the_padded_image(self, mode, size):
        """model(x) == centre 101x101 of the same layers run on x padded by NumPy (np.pad 'reflect' is TF's
        REFLECT, 'edge' repeats the border pixel), and the output is 101x101."""
        model = _build(base_width=2, depth=3, blocks_per_level=1, input_size=size, pad_mode=mode)
        x = _images(2, seed=3)
        extra = size - 101
        before, after = extra // 2, extra - extra // 2
        padded = np.pad(x.numpy(), [(0, 0), (before, after), (before, after), (0, 0)], mode=mode)
        self.assertAllClose(model.pad(x), padded)
        inner = model.head(model.decoder(model.bottleneck(model.encoder(tf.constant(padded))[0]),
                                         model.encoder(tf.constant(padded))[1])[-1])
        out = model(x, training=False)
        self.assertEqual(out.shape, (2, 101, 101, 1))
        self.assertAllClose(out, inner[:, before:before + 101, before:before + 101], rtol=1e-5, atol=1e-5)

    def test_padded_levels_halve_cleanly(self):
        model = _build(base_width=2, depth=5, blocks_per_level=1, input_size=128)
        shapes = {name: tuple(out.shape) for name, _, out in model.trace(_images(1))}
        for level in range(5):
            self.assertEqual(shapes[f"encoder/level{level}"], (1, SIZES_128[level], SIZES_128[level], 2 * 2**level))
        self.assertEqual(shapes["bottleneck"], (1, 4, 4, 64))
        self.assertEqual(shapes["head"], (1, 101, 101, 1))

    def test_border_of_the_padded_output_reaches_no_loss(self):
        """Gradients of a loss on model(x) w.r.t. the head's padded-size output are zero outside the centre:
        whatever the network predicts on the border cannot change loss or metric."""
        model = _build(base_width=2, depth=2, blocks_per_level=1, input_size=121)
        x = _images(1, seed=4)
        with tf.GradientTape() as tape:
            record = []
            outputs = model.forward(x, record=record)
            loss = tf.reduce_sum(tf.square(outputs["mask"]))
        features = dict((name, out) for name, _, out in record)["decoder/level0"]
        grad = tape.gradient(loss, features)  # the head is 1x1 (pointwise): border features -> border logits
        self.assertEqual(grad.shape[1], 121)
        border = np.ones((121, 121), bool)
        border[10:111, 10:111] = False
        self.assertEqual(float(tf.reduce_max(tf.abs(tf.boolean_mask(grad[0], border)))), 0.0)
        self.assertGreater(float(tf.reduce_max(tf.abs(grad[0, 10:111, 10:111]))), 0.0)

    def test_hypercolumn_head_sees_every_level_upsampled(self):
        """Head = conv1x1(relu(bn(concat[level0, resize(level1), resize(level2)]))) written with tf.nn ops."""
        model = _build(base_width=2, depth=3, blocks_per_level=1, hypercolumn=True)
        x = _images(2, seed=5)
        record = {name: out for name, _, out in model.trace(x)}
        levels = [record[f"decoder/level{level}"] for level in range(3)]
        concat = tf.concat([levels[0]] + [tf.image.resize(t, (101, 101), method="bilinear") for t in levels[1:]], -1)
        self.assertEqual(concat.shape[-1], 2 + 4 + 8)
        w = {v.path.split("head/", 1)[1]: v for v in model.head.variables}
        normed = (w["bn/gamma"] * (concat - w["bn/moving_mean"]) / tf.sqrt(w["bn/moving_variance"] + 1e-3)
                  + w["bn/beta"])
        want = tf.nn.conv2d(tf.nn.relu(normed), w["conv/kernel"], 1, "SAME") + w["conv/bias"]
        self.assertAllClose(model(x), want, rtol=1e-5, atol=1e-5)

    def test_deep_supervision_outputs(self):
        """Sides: one 101x101 logit map per decoder level (deepest first), each conv1x1 of that level's output
        upsampled; has_salt: dense(mean over pixels of the bottleneck), one logit per image."""
        model = _build(base_width=2, depth=3, blocks_per_level=1, deep_supervision=True, input_size=112)
        x = _images(3, seed=6)
        record = {name: out for name, _, out in model.trace(x)}
        outputs = model.forward(x)
        self.assertEqual(set(outputs), {"mask", "sides", "has_salt"})
        self.assertEqual(len(outputs["sides"]), 3)
        self.assertEqual(outputs["has_salt"].shape, (3,))
        for side, level in zip(outputs["sides"], (2, 1, 0)):
            self.assertEqual(side.shape, (3, 101, 101, 1))
            layer = getattr(model.side, f"level{level}")
            logits = tf.nn.conv2d(record[f"decoder/level{level}"], layer.kernel, 1, "SAME") + layer.bias
            full = tf.image.resize(logits, (112, 112), method="bilinear") if level else logits
            self.assertAllClose(side, full[:, 5:106, 5:106], rtol=1e-5, atol=1e-5)
        pooled = np.mean(record["bottleneck"].numpy().astype(np.float64), axis=(1, 2))
        dense = model.image_head.dense
        want = pooled @ dense.kernel.numpy().astype(np.float64)[:, 0] + float(dense.bias.numpy()[0])
        self.assertAllClose(outputs["has_salt"], want, rtol=1e-5, atol=1e-6)
        self.assertAllClose(model(x), outputs["mask"])

    def test_old_exports_configs_still_build(self):
        """An export's model.json from before these options has none of their keys: the defaults apply and
        give the native, single-output model."""
        config = ModelConfig(**dict(base_width=2, depth=2, blocks_per_level=1, se=True, se_ratio=4, dropout=0.0,
                                    input_channels=1))
        self.assertEqual((config.input_size, config.se_type, config.hypercolumn, config.deep_supervision),
                         (101, "channel", False, False))
