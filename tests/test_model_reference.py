"""The whole U-Net against an independent float64 NumPy forward pass (tests/numpy_unet.py), in inference mode.

tests/test_model.py checks the pieces (a residual block, the head, the padding, each side output) mostly against
TensorFlow ops fed with the model's own intermediate outputs, so the wiring between the pieces (which tensor goes
where, in which order, through which pooling and upsampling) is checked only by tests/test_torch_twin.py, which
needs PyTorch and is skipped in CI. Here the reference is plain NumPy written from the architecture: it receives the
Keras model's weights by variable path and must reproduce ``model(x, training=False)`` and every output of
``model_lib.outputs_of(model, x, training=False)`` (mask, side logits, has-salt logit).

So that no bug can hide behind a trivial value, every batch-norm gamma, beta, moving mean and moving variance and
every (zero-initialised) bias is set to random values first; kernels keep their random He-normal initialisation.
The reference must also read every float variable of the model (a layer it does not know would fail the test).

Tolerance: |model - reference| <= 1e-4 |reference| + 1e-4 max(1, RMS of the reference), per output. The model
computes in float32 (rounding 6e-8 per operation). Its error is set by the size of the activations that were summed
(up to a few hundred terms per convolution, ~10-20 layers deep), not by the local value of the result: a logit near
zero that came from large features carries their absolute error. So the absolute part scales with the output's
RMS, which keeps the criterion independent of how large the random weights make the logits. Measured: largest errors
~1e-5 of the output's RMS (1e-4 absolute on scSE + hypercolumn logits of RMS ~8 and maximum ~50; 1e-5 on logits of
RMS ~1), using at most ~15 % of the allowance, so platform differences in summation order (oneDNN) have room. Each
compared output must vary by more than 1000 x 1e-4 (std over pixels, or the largest has-salt logit), so a bug that
changes the network's function (a wrong skip order, an average instead of a max, a shifted crop) appears as errors of
order 0.1-1 of the output's scale, far outside the tolerance; on failure the message also names the first traced
block (encoder level, bottleneck, decoder level) where the model leaves the reference.

The pieces of the reference are first checked against cases computed by hand, so the reference itself is
trustworthy. Not covered: training mode (batch statistics, dropout), gradients, mixed precision.
"""

import math

import keras
import numpy as np
import pytest

import numpy_unet as nu
from salt_tf import model as model_lib

RTOL = 1e-4
ATOL = 1e-4  # times the reference's root mean square when that exceeds 1


def _atol(reference: np.ndarray) -> float:
    return ATOL * max(1.0, float(np.sqrt(np.mean(np.square(reference)))))


# ---------------------------------------------------------------------------------------------------- pieces
def test_conv2d_same_by_hand():
    """3x3 'same' conv of 0..15 (4x4) with a kernel reading the pixel above (x1) and the one to the right (x10):
    out[i, j] = x[i-1, j] + 10 x[i, j+1] + 0.5, zero outside the image."""
    x = np.arange(16.0).reshape(1, 4, 4, 1)
    kernel = np.zeros((3, 3, 1, 1))
    kernel[0, 1] = 1.0
    kernel[1, 2] = 10.0
    want = np.array([[10, 20, 30, 0],
                     [50, 61, 72, 3],
                     [94, 105, 116, 7],
                     [138, 149, 160, 11]]) + 0.5
    np.testing.assert_array_equal(nu.conv2d_same(x, kernel, np.array([0.5]))[0, :, :, 0], want)
    # Channels: a 1x1 conv is the (in, out) matrix applied to every pixel.
    pixel = np.array([1.0, 10.0]).reshape(1, 1, 1, 2)
    matrix = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).reshape(1, 1, 2, 3)
    np.testing.assert_array_equal(nu.conv2d_same(pixel, matrix)[0, 0, 0], [41, 52, 63])


def test_transposed_conv_by_hand():
    """Stride-2 3x3 transposed conv of [[1, 2], [3, 4]]: input (i, j) scatters kernel[a, c] * x to (2i+a, 2j+c).
    With kernel[0, 0] = 1 and kernel[2, 2] = 10 the full 5x5 result is written out below; onto 4x4 (a skip of
    size 2s) the last row and column are dropped. Then the (kh, kw, out, in) layout: one pixel (1, 10) through
    kernel[1, 1] = [[1, 2], [3, 4], [5, 6]] (3 outputs x 2 inputs) lands at the centre as (21, 43, 65)."""
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    kernel = np.zeros((3, 3, 1, 1))
    kernel[0, 0] = 1.0
    kernel[2, 2] = 10.0
    full = np.array([[1, 0, 2, 0, 0],
                     [0, 0, 0, 0, 0],
                     [3, 0, 14, 0, 20],
                     [0, 0, 0, 0, 0],
                     [0, 0, 30, 0, 40]], float)
    np.testing.assert_array_equal(nu.conv2d_transpose_stride2(x, kernel, np.zeros(1), 5)[0, :, :, 0], full)
    np.testing.assert_array_equal(nu.conv2d_transpose_stride2(x, kernel, np.ones(1), 4)[0, :, :, 0],
                                  full[:4, :4] + 1)
    with pytest.raises(ValueError):
        nu.conv2d_transpose_stride2(x, kernel, np.zeros(1), 6)
    layout = np.zeros((3, 3, 3, 2))
    layout[1, 1] = [[1, 2], [3, 4], [5, 6]]
    out = nu.conv2d_transpose_stride2(np.array([1.0, 10.0]).reshape(1, 1, 1, 2), layout, np.zeros(3), 3)
    want = np.zeros((3, 3, 3))
    want[1, 1] = [21, 43, 65]
    np.testing.assert_array_equal(out[0], want)


def test_max_pool_by_hand():
    """2x2 max-pool of a 5x5: four windows; the fifth row and column (99s) fall off (floor)."""
    x = np.array([[1, 9, 2, 0, 99],
                  [3, 4, 8, 1, 99],
                  [0, 0, 5, 6, 99],
                  [2, 1, 0, 0, 99],
                  [99, 99, 99, 99, 99]], float).reshape(1, 5, 5, 1)
    np.testing.assert_array_equal(nu.max_pool_2x2(x)[0, :, :, 0], [[9, 8], [2, 6]])


def test_bilinear_resize_by_hand():
    """Half-pixel centres: output i samples the input at (i + 0.5) * in / out - 0.5, clamped to the border.
    2 -> 4 samples at -0.25 (-> 0), 0.25, 0.75, 1.25 (-> 1); 3 -> 5 (a non-integer ratio, like 25 -> 101) at
    -0.2 (-> 0), 0.4, 1.0, 1.6, 2.2 (-> 2). Bilinear is separable, so a sum of a row and a column profile
    resizes to the sum of the two 1-D interpolations."""
    x = np.array([[0.0, 4.0], [8.0, 12.0]]).reshape(1, 2, 2, 1)
    want = [[0, 1, 3, 4],
            [2, 3, 5, 6],
            [6, 7, 9, 10],
            [8, 9, 11, 12]]
    np.testing.assert_allclose(nu.resize_bilinear(x, 4)[0, :, :, 0], want, rtol=0, atol=1e-12)
    rows, cols = np.array([0.0, 10.0, 30.0]), np.array([0.0, 100.0, 200.0])
    resized = nu.resize_bilinear((rows[:, None] + cols[None, :]).reshape(1, 3, 3, 1), 5)[0, :, :, 0]
    want = np.array([0, 4, 10, 22, 30])[:, None] + np.array([0, 40, 100, 160, 200])[None, :]
    np.testing.assert_allclose(resized, want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(nu.bilinear_matrix(7, 7), np.eye(7))  # same size: unchanged


def test_batch_norm_gates_and_padding_by_hand():
    """BN: 2 * (3 - 1) / sqrt(3.999 + 0.001) + 1 = 3. cSE on two pixels (1, 2) and (3, -2): the channel means
    (2, 0) -> squeeze [[1, -1], [1, -1]] - (1, 0) -> relu (1, 0) -> excite [[0, ln 3], [100, 100]] -> sigmoid
    (1/2, 3/4) (the second hidden unit is cut by the relu). sSE with gate kernel (ln 3, 0): logits ln 3 and
    3 ln 3 -> 3/4 and 27/28 per pixel. Padding 101 -> 128: 13 before, 14 after; reflect does not repeat the
    border pixel, edge does."""
    assert nu.batch_norm(np.array([3.0]), 2.0, 1.0, 1.0, 3.999) == pytest.approx([3.0], abs=1e-12)
    y = np.array([[1.0, 2.0], [3.0, -2.0]]).reshape(1, 2, 1, 2)
    gated = nu.channel_gate(y, np.array([[1.0, -1.0], [1.0, -1.0]]), np.array([-1.0, 0.0]),
                            np.array([[0.0, math.log(3)], [100.0, 100.0]]), np.zeros(2))
    np.testing.assert_allclose(gated[0, :, 0], [[0.5, 1.5], [1.5, -1.5]], rtol=0, atol=1e-12)
    spatial = nu.spatial_gate(y, np.array([math.log(3), 0.0]).reshape(1, 1, 2, 1), np.zeros(1))
    np.testing.assert_allclose(spatial[0, :, 0], [[0.75, 1.5], [3 * 27 / 28, -2 * 27 / 28]], rtol=0, atol=1e-12)
    assert nu.pad_amounts(128) == (13, 14) and nu.pad_amounts(101) == (0, 0) and nu.pad_amounts(104) == (1, 2)
    row = np.array([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 4, 1)
    np.testing.assert_array_equal(nu.pad(row, 2, 3, "reflect")[0, 2, :, 0], [2, 1, 0, 1, 2, 3, 2, 1, 0])
    np.testing.assert_array_equal(nu.pad(row, 2, 3, "edge")[0, 2, :, 0], [0, 0, 0, 1, 2, 3, 3, 3, 3])


# ---------------------------------------------------------------------------------------------------- network
# Tiny configurations: every upsampling case ('valid' 12 -> 25, 50 -> 101, 14 -> 29, 29 -> 59; 'same' 25 -> 50,
# 16 -> 32 -> 64 -> 128, 59 -> 118), identity and projection shortcuts, cSE, scSE, no gate, both padding modes
# with an odd number of padded pixels (13 + 14, 8 + 9), hypercolumn, deep supervision, dropout (identity here) and
# the depth channel.
CONFIGS = {
    "a_cse_101": model_lib.ModelConfig(base_width=4, depth=3, blocks_per_level=2),
    "b_scse_hypercolumn_deep_101": model_lib.ModelConfig(base_width=4, depth=3, blocks_per_level=1, se_type="scse",
                                                         se_ratio=2, hypercolumn=True, deep_supervision=True,
                                                         dropout=0.25),
    "c_reflect_128": model_lib.ModelConfig(base_width=4, depth=3, blocks_per_level=1, input_size=128),
    "c_edge_118_deep_no_se": model_lib.ModelConfig(base_width=4, depth=3, blocks_per_level=1, input_size=118,
                                                   pad_mode="edge", se=False, deep_supervision=True),
    "d_depth_channel": model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=2, input_channels=2),
}

# Values for the variables that do not start random: BN statistics and affine parameters, biases.
RANDOM_VALUES = {
    "gamma": lambda rng, shape: rng.uniform(0.5, 1.5, shape),
    "beta": lambda rng, shape: rng.normal(0.0, 0.3, shape),
    "moving_mean": lambda rng, shape: rng.normal(0.0, 0.3, shape),
    "moving_variance": lambda rng, shape: rng.uniform(0.5, 2.0, shape),
    "bias": lambda rng, shape: rng.normal(0.0, 0.3, shape),
}


def _randomized_model(config, seed):
    keras.utils.set_random_seed(seed)
    model = model_lib.build_model(config)
    rng = np.random.default_rng(seed)
    weights = {}
    for v in model.weights:
        if "float" not in str(v.dtype):
            continue  # the dropout layers' int64 RNG state
        leaf = v.path.rsplit("/", 1)[1]
        if leaf != "kernel":
            v.assign(RANDOM_VALUES[leaf](rng, v.shape).astype(np.float32))
        value = v.numpy()
        assert np.std(value) > 0 or value.size == 1 and value != 0, v.path
        weights[v.path.removeprefix("unet/")] = value
    return model, weights


def _first_divergence(model, images, reference_trace) -> str:
    """Where the model's forward pass first leaves the reference (for the failure message)."""
    for name, _, output in model.trace(images, training=False):
        if name in reference_trace:
            want = reference_trace[name]
            got = np.asarray(output, np.float64)
            if got.shape != want.shape or not np.allclose(got, want, rtol=RTOL, atol=_atol(want)):
                if got.shape != want.shape:
                    return f"first disagreement at {name}: shape {got.shape}, the reference's {want.shape}"
                return f"first disagreement at {name} {want.shape}: max error {np.max(np.abs(got - want)):.3g}"
    return "every traced block agrees"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_network_matches_numpy_reference(name):
    """model(x, training=False) and every output of outputs_of(model, x, training=False) (mask; with deep
    supervision each side logit map and has_salt) equal the float64 reference's on 2 images, within
    rtol = 1e-4 and atol = 1e-4 x max(1, RMS of the reference) (float32 arithmetic; see the module docstring)."""
    config = CONFIGS[name]
    model, arrays = _randomized_model(config, seed=sorted(CONFIGS).index(name))
    images = np.random.default_rng(100).uniform(0.0, 1.0, (2, 101, 101, config.input_channels)).astype(np.float32)
    weights = nu.Weights(arrays)
    want = nu.unet_forward(weights, config, images.astype(np.float64))
    assert weights.unused() == [], "variables the reference does not know"

    mask = np.asarray(model(images, training=False))
    outputs = model_lib.outputs_of(model, images, training=False)
    assert set(outputs) == set(want) - {"trace"}
    pairs = [("model(x)", mask, want["mask"]), ("mask", outputs["mask"], want["mask"])]
    if config.deep_supervision:
        assert len(outputs["sides"]) == config.depth
        pairs += [(f"side of decoder level {level}", got, ref)
                  for level, got, ref in zip(reversed(range(config.depth)), outputs["sides"], want["sides"])]
        pairs.append(("has_salt", outputs["has_salt"], want["has_salt"]))
    for label, got, ref in pairs:
        got = np.asarray(got, np.float64)
        assert got.shape == ref.shape, (label, got.shape, ref.shape)
        spread = np.std(ref) if ref.ndim > 1 else np.max(np.abs(ref))  # has_salt: one logit per image
        assert spread > 1000 * ATOL, f"{label}: the reference barely varies, the comparison would be weak"
        try:
            np.testing.assert_allclose(got, ref, rtol=RTOL, atol=_atol(ref), err_msg=label)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{_first_divergence(model, images, want['trace'])}") from None
