"""A float64 NumPy forward pass of salt_tf's U-Net in inference mode, written from the architecture.

Pure NumPy (no TensorFlow, no salt_tf import): tests/test_model_reference.py feeds it a Keras model's weights by
variable path and compares its outputs with the model's. Every piece is a direct transcription of the architecture
as docs/architecture.md and salt_tf/model.py's docstrings describe it:

    pad 101 -> input_size ("reflect": mirror without repeating the border pixel; "edge": repeat it),
        extra // 2 pixels before, the rest after
    encoder/stem          conv3x3 ('same', zero padding) -> w
    encoder/level{L}      residual blocks at w*2**L, the output is the skip, then 2x2 max-pool (floor: odd sizes
                          drop their last row/column)
    bottleneck            residual blocks at w*2**D (spatial dropout: identity in inference)
    decoder/level{L}      stride-2 3x3 transposed conv to w*2**L (every input pixel scatters a 3x3 patch: 2s+1
                          pixels), keeping the first rows/columns up to the skip's size (2s or 2s+1), then
                          concat [upsampled, skip], residual blocks at w*2**L
    head                  BN -> ReLU -> conv1x1 -> 1 logit, on level 0's output or, with the hypercolumn, on
                          concat [level0, resize(level1), ..., resize(level D-1)] (bilinear, half-pixel centres)
    deep supervision      sides: conv1x1 -> 1 logit per decoder level, resized to input_size, deepest first;
                          has_salt: dense(mean over pixels of the bottleneck) -> one logit per image
    crop                  every map back to its centre 101x101 (the same offset as the padding)

    residual block        pre = relu(bn1(x)); y = conv2(relu(bn2(conv1(pre)))) (conv1 without bias);
                          y = gate(y); out = y + (x, or conv1x1 projection(pre) when the width changes)
    cSE gate              y * sigmoid(dense(relu(dense(mean over pixels of y))))
    scSE gate             cSE(y) + y * sigmoid(conv1x1(y) -> 1 channel)
    BN (inference)        gamma * (x - moving_mean) / sqrt(moving_variance + 1e-3) + beta

Weights come as {path: array} with paths as Keras gives them, less the leading "unet/" (e.g.
"encoder/level1/block0/se/squeeze/kernel"); layouts are Keras': conv (kh, kw, in, out), transposed conv
(kh, kw, out, in), dense (in, out). ``Weights`` records which paths were read, so a test can assert that the
reference used every variable of the model (a layer the reference does not know would otherwise go unnoticed).
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 101
BN_EPSILON = 1e-3


# ---------------------------------------------------------------------------------------------------- pieces
def pad_amounts(input_size: int) -> tuple[int, int]:
    """Pixels before and after the 101 of each axis: extra // 2 before, the rest (one more when odd) after."""
    extra = input_size - IMAGE_SIZE
    return extra // 2, extra - extra // 2


def pad(x: np.ndarray, before: int, after: int, mode: str) -> np.ndarray:
    """[B, H, W, C] padded on both spatial axes. "reflect" mirrors about the border pixel without repeating it
    (..., 2, 1, | 0, 1, 2, ...); "edge" repeats the border pixel (0, 0, | 0, 1, ...)."""
    widths = [(0, 0), (before, after), (before, after), (0, 0)]
    return np.pad(x, widths, mode={"reflect": "reflect", "edge": "edge"}[mode])


def conv2d_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Stride-1 cross-correlation with zero padding k // 2 (odd k), in float64:
    out[b, i, j, :] = sum_{a, c} x[b, i + a - k//2, j + c - k//2, :] @ kernel[a, c] (+ bias)."""
    kh, kw, cin, cout = kernel.shape
    batch, height, width, channels = x.shape
    assert channels == cin, (x.shape, kernel.shape)
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
    out = np.zeros((batch, height, width, cout))
    for a in range(kh):
        for c in range(kw):
            out += xp[:, a:a + height, c:c + width, :] @ kernel[a, c]
    return out if bias is None else out + bias


def conv2d_transpose_stride2(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, size: int) -> np.ndarray:
    """Stride-2 transposed conv onto `size` x `size`: input pixel (i, j) adds kernel[a, c] @ x[i, j] at output
    (2i + a, 2j + c) (kernel (kh, kw, out, in)), which covers 2s + k - 2 pixels; the first `size` rows and columns
    are kept (for 3x3: all 2s + 1, or 2s, dropping the last)."""
    kh, kw, cout, cin = kernel.shape
    batch, height, width, channels = x.shape
    assert channels == cin and height == width, (x.shape, kernel.shape)
    full = 2 * (height - 1) + kh
    if size not in (full, full - 1):
        raise ValueError(f"a stride-2 {kh}x{kw} transposed conv cannot map {height} onto {size}")
    out = np.zeros((batch, full, 2 * (width - 1) + kw, cout))
    for a in range(kh):
        for c in range(kw):
            out[:, a:a + 2 * height - 1:2, c:c + 2 * width - 1:2, :] += x @ kernel[a, c].T
    return out[:, :size, :size, :] + bias


def max_pool_2x2(x: np.ndarray) -> np.ndarray:
    """2x2 max over non-overlapping windows, stride 2; an odd size loses its last row/column (floor)."""
    batch, height, width, channels = x.shape
    h, w = height // 2, width // 2
    return x[:, :2 * h, :2 * w, :].reshape(batch, h, 2, w, 2, channels).max(axis=(2, 4))


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of 1-D linear interpolation with half-pixel centres: output pixel i samples the
    input at (i + 0.5) * size_in / size_out - 0.5, clamped to [0, size_in - 1] (the border value beyond it)."""
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = source - low
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """[B, h, w, C] -> [B, size, size, C], separable bilinear interpolation (``bilinear_matrix`` per axis)."""
    rows = bilinear_matrix(x.shape[1], size)
    cols = bilinear_matrix(x.shape[2], size)
    return np.einsum("oh,bhwc,pw->bopc", rows, x, cols)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow


def relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0)


def batch_norm(x, gamma, beta, mean, variance, epsilon=BN_EPSILON):
    """Inference batch norm per channel (last axis) with the moving statistics."""
    return gamma * (x - mean) / np.sqrt(variance + epsilon) + beta


def channel_gate(y, squeeze_kernel, squeeze_bias, excite_kernel, excite_bias):
    """cSE: y * sigmoid(relu(gap(y) @ W1 + b1) @ W2 + b2), the gate per image and channel."""
    pooled = y.mean(axis=(1, 2))  # [B, C]
    gate = sigmoid(relu(pooled @ squeeze_kernel + squeeze_bias) @ excite_kernel + excite_bias)
    return y * gate[:, None, None, :]


def spatial_gate(y, kernel, bias):
    """sSE: y * sigmoid(conv1x1(y) -> 1 channel), the gate per pixel."""
    return y * sigmoid(conv2d_same(y, kernel, bias))


# ---------------------------------------------------------------------------------------------------- the net
class Weights:
    """{path: float64 array}, recording every path read."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
        self.used: set[str] = set()

    def __call__(self, path: str, shape: tuple | None = None) -> np.ndarray:
        value = self.arrays[path]
        if shape is not None and value.shape != tuple(shape):
            raise ValueError(f"{path}: shape {value.shape}, the architecture says {tuple(shape)}")
        self.used.add(path)
        return value

    def has(self, path: str) -> bool:
        return path in self.arrays

    def unused(self) -> list[str]:
        return sorted(set(self.arrays) - self.used)


def _bn(w: Weights, prefix: str, x: np.ndarray) -> np.ndarray:
    c = (x.shape[-1],)
    return batch_norm(x, w(f"{prefix}/gamma", c), w(f"{prefix}/beta", c), w(f"{prefix}/moving_mean", c),
                      w(f"{prefix}/moving_variance", c))


def _conv(w: Weights, prefix: str, x: np.ndarray, k: int, cout: int, bias: bool = True) -> np.ndarray:
    kernel = w(f"{prefix}/kernel", (k, k, x.shape[-1], cout))
    return conv2d_same(x, kernel, w(f"{prefix}/bias", (cout,)) if bias else None)


def _gate(w: Weights, prefix: str, y: np.ndarray, config) -> np.ndarray:
    c = y.shape[-1]
    hidden = max(1, c // config.se_ratio)
    se = f"{prefix}/scse/se" if config.se_type == "scse" else f"{prefix}/se"
    gated = channel_gate(y, w(f"{se}/squeeze/kernel", (c, hidden)), w(f"{se}/squeeze/bias", (hidden,)),
                         w(f"{se}/excite/kernel", (hidden, c)), w(f"{se}/excite/bias", (c,)))
    if config.se_type == "scse":
        gated = gated + spatial_gate(y, w(f"{prefix}/scse/sse/gate/kernel", (1, 1, c, 1)),
                                     w(f"{prefix}/scse/sse/gate/bias", (1,)))
    return gated


def residual_block(w: Weights, prefix: str, x: np.ndarray, channels: int, config) -> np.ndarray:
    pre = relu(_bn(w, f"{prefix}/bn1", x))
    shortcut = x if x.shape[-1] == channels else _conv(w, f"{prefix}/projection", pre, 1, channels)
    y = _conv(w, f"{prefix}/conv1", pre, 3, channels, bias=False)
    y = _conv(w, f"{prefix}/conv2", relu(_bn(w, f"{prefix}/bn2", y)), 3, channels)
    if config.se:
        y = _gate(w, prefix, y, config)
    return shortcut + y


def _blocks(w: Weights, prefix: str, x: np.ndarray, channels: int, config) -> np.ndarray:
    for i in range(config.blocks_per_level):
        x = residual_block(w, f"{prefix}/block{i}", x, channels, config)
    return x


def unet_forward(w: Weights, config, images: np.ndarray) -> dict:
    """Inference outputs for images [B, 101, 101, C]:

        "mask"      [B, 101, 101, 1]
        "sides"     tuple of [B, 101, 101, 1], deepest decoder level first      (deep supervision)
        "has_salt"  [B]                                                          (deep supervision)
        "trace"     {name: network-size map} for "encoder/stem", "encoder/level{L}" (the skip), "bottleneck",
                    "decoder/level{L}" (uncropped), to locate a disagreement

    `config` needs the attributes base_width, depth, blocks_per_level, se, se_type, se_ratio, hypercolumn,
    deep_supervision, input_size, pad_mode (a salt_tf ModelConfig has them).
    """
    width = lambda level: config.base_width * 2**level  # noqa: E731
    size = config.input_size
    before, after = pad_amounts(size)
    x = pad(np.asarray(images, np.float64), before, after, config.pad_mode)
    trace = {}
    x = trace["encoder/stem"] = _conv(w, "encoder/stem", x, 3, width(0))
    skips = []
    for level in range(config.depth):
        x = trace[f"encoder/level{level}"] = _blocks(w, f"encoder/level{level}", x, width(level), config)
        skips.append(x)
        x = max_pool_2x2(x)
    bottom = trace["bottleneck"] = _blocks(w, "bottleneck", x, width(config.depth), config)
    x = bottom
    decoded = {}
    for level in reversed(range(config.depth)):
        prefix = f"decoder/level{level}"
        up = conv2d_transpose_stride2(x, w(f"{prefix}/upsample/kernel", (3, 3, width(level), x.shape[-1])),
                                      w(f"{prefix}/upsample/bias", (width(level),)), skips[level].shape[1])
        x = _blocks(w, prefix, np.concatenate([up, skips[level]], axis=-1), width(level), config)
        decoded[level] = trace[prefix] = x
    if config.hypercolumn:
        features = np.concatenate([resize_bilinear(decoded[level], size) for level in range(config.depth)], -1)
    else:
        features = decoded[0]
    head = _conv(w, "head/conv", relu(_bn(w, "head/bn", features)), 1, 1)

    def crop(t):
        return t[:, before:before + IMAGE_SIZE, before:before + IMAGE_SIZE, :]

    outputs = {"mask": crop(head), "trace": trace}
    if config.deep_supervision:
        outputs["sides"] = tuple(crop(resize_bilinear(_conv(w, f"side/level{level}", decoded[level], 1, 1), size))
                                 for level in reversed(range(config.depth)))
        c = bottom.shape[-1]
        outputs["has_salt"] = (bottom.mean(axis=(1, 2)) @ w("image_head/dense/kernel", (c, 1))
                               + w("image_head/dense/bias", (1,)))[:, 0]
    return outputs
