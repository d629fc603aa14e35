"""Residual squeeze-and-excitation U-Net for 101x101 TGS salt images (Keras 3 layers).

The model is meant to be driven by a custom ``tf.GradientTape`` loop (never ``fit``):

    model = build_model(ModelConfig())
    logits = model(images, training=True)   # [B, 101, 101, 1] float32 logits

``training=True`` makes BatchNormalization use batch statistics and update its moving
statistics (and enables spatial dropout if configured); ``training=False`` uses the
frozen moving statistics and no dropout, so evaluation is deterministic.

Architecture (widths for base_width=w, depth=D):

    encoder/stem          conv3x3 -> w                                       101x101
    encoder/level{L}      blocks_per_level residual blocks at w*2**L, then 2x2 max-pool
                          ('valid', floor: 101 -> 50 -> 25 -> 12 -> 6 -> 3)
    bottleneck            blocks_per_level residual blocks at w*2**D (+ spatial dropout)
    decoder/level{L}      3x3 stride-2 transposed conv to w*2**L that lands exactly on the
                          skip's size ('same' if skip == 2s, 'valid' if skip == 2s+1),
                          concat with the skip (+ spatial dropout), residual blocks at w*2**L
    head                  BN -> ReLU -> conv1x1 -> 1 logit channel

Every sublayer is assigned to its own attribute (``self.block0``, ``self.level1``, ...),
never kept in a Python list: Keras 3 wraps lists in its own tracker, which
``tf.train.Checkpoint`` does not traverse, so list-held layers would silently be missing
from checkpoints.  Attribute names equal the Keras layer names, which gives readable,
stable ``variable.path`` values such as ``unet/encoder/level1/block0/se/squeeze/kernel``.

This module deliberately contains no losses and no training code.
"""

from __future__ import annotations

import dataclasses
import random

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from salt_tf import IMAGE_SIZE

# The one place the kernel initialisation is chosen, for every Conv2D, Conv2DTranspose and
# Dense kernel: He et al. 2015 ("Delving deep into rectifiers"). This is a ReLU network;
# ReLU zeroes half of a symmetric input and so halves the second moment, which the gain of
# 2 in Var(w) = 2 / fan_in compensates, keeping activation scale roughly constant with depth.
# Keras 3's "he_normal" is VarianceScaling(scale=2, mode="fan_in",
# distribution="truncated_normal"): it samples a normal truncated at +-2 sigma with
# sigma = sqrt(2 / fan_in) / 0.8796, so the std *after* truncation is sqrt(2 / fan_in).
# Keras computes fan_in = prod(kernel_shape[:-1]); for Conv2DTranspose kernels, whose
# layout is (kh, kw, filters, in_channels), that is kh * kw * filters.
# It is given as a *string* on purpose: each layer then gets a fresh initializer whose seed
# is drawn from Python's RNG (seeded by keras.utils.set_random_seed), so weights are
# reproducible; a single shared unseeded initializer instance would hand identical
# values to every same-shaped kernel.
KERNEL_INITIALIZER = "he_normal"
BIAS_INITIALIZER = "zeros"

# Keras' default 0.99 needs ~300 steps to forget the initial moving statistics: most of a real-data run's
# first epochs, and all of a demo run, would be evaluated with stale statistics. 0.9 (PyTorch's default)
# needs ~30.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3  # Keras default.

MAX_DEPTH = 5  # 101 -> 50 -> 25 -> 12 -> 6 -> 3; a 6th pooling would leave 1x1.
SE_TYPES = ("channel", "scse")
PAD_MODES = ("reflect", "edge")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    base_width: int = 16  # filters at level 0; doubles each level
    depth: int = 4  # number of poolings (101->50->25->12->6 for depth 4); 1..5
    blocks_per_level: int = 2  # residual blocks per encoder/decoder level and bottleneck
    se: bool = True
    se_ratio: int = 4  # SE reduction ratio r (hidden units = max(1, c // r))
    dropout: float = 0.0  # spatial dropout at the bottleneck and after each skip concat
    input_channels: int = 1  # 1 = image; 2 = image + depth plane
    se_type: str = "channel"  # with se: "channel" (cSE) or "scse" (channel + spatial gates, added)
    hypercolumn: bool = False  # the head sees every decoder level, upsampled to full size
    deep_supervision: bool = False  # side logits per decoder level + an image-level "has salt" logit
    input_size: int = IMAGE_SIZE  # the network's size: 101 (native) or larger, reached by padding
    pad_mode: str = "reflect"  # how 101 is padded to input_size: "reflect" or "edge"

    def __post_init__(self):
        if self.base_width < 1:
            raise ValueError(f"base_width must be >= 1, got {self.base_width}")
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"depth must be in [1, {MAX_DEPTH}], got {self.depth}")
        if self.blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be >= 1, got {self.blocks_per_level}")
        if self.se_ratio < 1:
            raise ValueError(f"se_ratio must be >= 1, got {self.se_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.input_channels < 1:
            raise ValueError(f"input_channels must be >= 1, got {self.input_channels}")
        if self.se_type not in SE_TYPES:
            raise ValueError(f"se_type must be one of {SE_TYPES}, got {self.se_type!r}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        if not IMAGE_SIZE <= self.input_size <= 2 * IMAGE_SIZE - 1:
            raise ValueError(f"input_size must be in [{IMAGE_SIZE}, {2 * IMAGE_SIZE - 1}] (101 = no padding; "
                             f"reflect padding needs < 101 pixels a side), got {self.input_size}")
        if level_sizes(self.depth, self.input_size)[-1] < 2:
            raise ValueError(f"depth {self.depth} pools a {self.input_size}x{self.input_size} input below 2x2; "
                             "use a smaller depth")

    @property
    def padding(self) -> tuple[int, int]:
        """Pixels added before and after the 101 pixels of each axis to reach input_size."""
        extra = self.input_size - IMAGE_SIZE
        return extra // 2, extra - extra // 2


def level_sizes(depth: int, image_size: int = IMAGE_SIZE) -> list[int]:
    """Spatial sizes at levels 0..depth under 2x2 'valid' max-pooling (floor division)."""
    sizes = [image_size]
    for _ in range(depth):
        sizes.append(sizes[-1] // 2)
    return sizes


def level_width(config: ModelConfig, level: int) -> int:
    return config.base_width * 2**level


def upsample_padding(size_in: int, size_out: int) -> str:
    """Padding for a 3x3 stride-2 transposed conv that maps size_in exactly to size_out.

    'same' gives 2*s, 'valid' gives (s - 1) * 2 + 3 = 2*s + 1.
    """
    if size_out == 2 * size_in:
        return "same"
    if size_out == 2 * size_in + 1:
        return "valid"
    raise ValueError(f"cannot upsample {size_in} -> {size_out} with a 3x3 stride-2 kernel")


def _conv(filters: int, kernel_size: int, name: str, use_bias: bool = True) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        use_bias=use_bias,
        kernel_initializer=KERNEL_INITIALIZER,
        bias_initializer=BIAS_INITIALIZER,
        name=name,
    )


def _dense(units: int, activation: str, name: str) -> keras.layers.Dense:
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=KERNEL_INITIALIZER,
        bias_initializer=BIAS_INITIALIZER,
        name=name,
    )


class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization computed by TensorFlow's fused kernel (FusedBatchNormV3 / oneDNN).

    Keras 3 builds batch norm from tf.nn.moments and elementwise ops, about a dozen kernels forward and
    more backward per layer; the fused kernel does it in one pass each way, which made the whole train
    step faster (docs/performance.md). Same variables (gamma, beta, moving_mean, moving_variance), same
    checkpoints and the same semantics: batch statistics in training, moving statistics in evaluation,
    the moving variance updated with the biased batch variance as Keras does.
    """

    def call(self, inputs, training=False, mask=None):
        # Keras' own path where the fused kernel does not apply; `synchronized` (statistics all-reduced over
        # replicas, see distribute.py) needs the separate moments.
        if (self.axis not in (-1, len(inputs.shape) - 1) or len(inputs.shape) != 4 or mask is not None
                or getattr(self, "synchronized", False)):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)  # statistics in float32 also under a bfloat16 policy
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
            # The kernel returns the unbiased (n - 1) variance; Keras keeps the biased one.
            count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
            variance = variance * ((count - 1.0) / count)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, data_format="NHWC", is_training=False)
        return tf.cast(y, self.compute_dtype)


def _bn(name: str) -> keras.layers.BatchNormalization:
    return FusedBatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


class SqueezeExcite(keras.layers.Layer):
    """Channel gate of Hu et al. 2018: GAP -> dense(c//r, relu) -> dense(c, sigmoid) -> scale."""

    def __init__(self, channels: int, ratio: int, name: str = "se", **kwargs):
        super().__init__(name=name, **kwargs)
        self.channels = channels
        self.hidden = max(1, channels // ratio)
        self.squeeze = _dense(self.hidden, "relu", "squeeze")
        self.excite = _dense(channels, "sigmoid", "excite")

    def build(self, input_shape):
        pooled = (input_shape[0], 1, 1, self.channels)
        self.squeeze.build(pooled)
        self.excite.build(pooled[:-1] + (self.hidden,))

    def call(self, x):
        s = ops.mean(x, axis=(1, 2), keepdims=True)  # [B, 1, 1, c]
        return x * self.excite(self.squeeze(s))


class SpatialSqueezeExcite(keras.layers.Layer):
    """Spatial gate of Roy et al. 2018 (sSE): conv1x1 to one channel -> sigmoid -> scale every pixel."""

    def __init__(self, channels: int, name: str = "sse", **kwargs):
        super().__init__(name=name, **kwargs)
        self.channels = channels
        self.gate = _conv(1, 1, "gate")

    def build(self, input_shape):
        self.gate.build(input_shape)

    def call(self, x):
        return x * ops.sigmoid(self.gate(x))


class ConcurrentSqueezeExcite(keras.layers.Layer):
    """scSE of Roy et al. 2018: channel gate and spatial gate side by side, their outputs added
    (the variant the TGS solutions used). The channel gate keeps the path ``se`` so its variables are named
    as in a cSE model."""

    def __init__(self, channels: int, ratio: int, name: str = "scse", **kwargs):
        super().__init__(name=name, **kwargs)
        self.se = SqueezeExcite(channels, ratio, name="se")
        self.sse = SpatialSqueezeExcite(channels, name="sse")

    def build(self, input_shape):
        self.se.build(input_shape)
        self.sse.build(input_shape)

    def call(self, x):
        return self.se(x) + self.sse(x)


def _gate(channels: int, config: "ModelConfig"):
    if not config.se:
        return None
    if config.se_type == "scse":
        return ConcurrentSqueezeExcite(channels, config.se_ratio, name="scse")
    return SqueezeExcite(channels, config.se_ratio, name="se")


class ResidualBlock(keras.layers.Layer):
    """Pre-activation residual block with an optional SE gate on the residual branch.

    Order: BN-ReLU-conv3x3-BN-ReLU-conv3x3 (He et al. 2016, "Identity Mappings in Deep
    Residual Networks"). Putting BN and ReLU *before* each conv leaves the shortcut a pure
    identity with nothing applied after the addition, so signals and gradients pass
    unchanged between any two blocks; the paper shows this trains more easily and
    generalises better than the original post-activation order. The SE gate rescales the
    residual branch before the addition, exactly as in SE-ResNet (Hu et al. 2018), so the
    identity path stays untouched.

    When the width changes, the shortcut is a 1x1 projection. Following the authors'
    reference pre-activation code ("both_preact"), the first BN-ReLU is then shared: the
    projection reads the pre-activated input, so both branches see normalised features
    (e.g. the raw upsample/skip concatenation in the decoder).
    conv1 has no bias because BN2 immediately follows it (a bias would be cancelled).
    """

    def __init__(self, in_channels: int, channels: int, config: "ModelConfig", name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self.in_channels = in_channels
        self.channels = channels
        self.bn1 = _bn("bn1")
        self.conv1 = _conv(channels, 3, "conv1", use_bias=False)
        self.bn2 = _bn("bn2")
        self.conv2 = _conv(channels, 3, "conv2")
        self.se = _gate(channels, config)  # cSE or scSE on the residual branch; None without --se
        self.projection = _conv(channels, 1, "projection") if in_channels != channels else None

    def build(self, input_shape):
        out_shape = tuple(input_shape[:-1]) + (self.channels,)
        self.bn1.build(input_shape)
        self.conv1.build(input_shape)
        self.bn2.build(out_shape)
        self.conv2.build(out_shape)
        if self.se is not None:
            self.se.build(out_shape)
        if self.projection is not None:
            self.projection.build(input_shape)

    def call(self, x, training=False):
        pre = ops.relu(self.bn1(x, training=training))
        shortcut = x if self.projection is None else self.projection(pre)
        y = self.conv1(pre)
        y = self.conv2(ops.relu(self.bn2(y, training=training)))
        if self.se is not None:
            y = self.se(y)
        return shortcut + y


def _make_blocks(owner: keras.layers.Layer, config: ModelConfig, in_channels: int, channels: int) -> None:
    """Attach blocks_per_level residual blocks to ``owner`` as attributes block0, block1, ..."""
    owner.num_blocks = config.blocks_per_level
    for i in range(config.blocks_per_level):
        block = ResidualBlock(in_channels if i == 0 else channels, channels, config, name=f"block{i}")
        setattr(owner, f"block{i}", block)


def _build_blocks(owner: keras.layers.Layer, input_shape, channels: int):
    for i in range(owner.num_blocks):
        getattr(owner, f"block{i}").build(input_shape)
        input_shape = tuple(input_shape[:-1]) + (channels,)
    return input_shape


def _run_blocks(owner: keras.layers.Layer, x, training):
    for i in range(owner.num_blocks):
        x = getattr(owner, f"block{i}")(x, training=training)
    return x


class SpatialDropout(keras.layers.Layer):
    """Channel-wise ("spatial") dropout, Tompson et al. 2015; identity unless training=True.

    Replaces keras.layers.SpatialDropout2D, whose RNG lives in a keras SeedGenerator: that
    variable gets a global, non-nested path ("seed_generator_3/seed_generator_state") and
    tf.train.Checkpoint does not save it. Here the stateless-RNG seed/counter pair is an
    ordinary non-trainable int64 weight ``rng_state`` built under this layer's scope, so it
    has a readable path, is checkpointed and restored (exact resume of the dropout masks),
    and is excluded from ``count_params`` (not a parameter). The initial seed is drawn from
    Python's RNG, which keras.utils.set_random_seed seeds, like the kernel initializers.
    """

    def __init__(self, rate: float, name: str = "dropout", **kwargs):
        super().__init__(name=name, **kwargs)
        self.rate = float(rate)
        self._initial_seed = random.randint(1, 2**31 - 1)

    def build(self, input_shape):
        seed = self._initial_seed
        self.rng_state = self.add_weight(
            name="rng_state",
            shape=(2,),
            dtype="int64",
            initializer=lambda shape, dtype=None: ops.convert_to_tensor([seed, 0], dtype="int64"),
            trainable=False,
        )

    def call(self, x, training=False):
        if not training:
            return x
        seed = self.rng_state.value
        self.rng_state.assign(seed + ops.convert_to_tensor([0, 1], dtype="int64"))
        shape = tf.shape(x)
        return tf.nn.experimental.stateless_dropout(
            x, rate=self.rate, noise_shape=[shape[0], 1, 1, shape[3]], seed=seed
        )


def _spatial_dropout(rate: float):
    return SpatialDropout(rate, name="dropout") if rate > 0 else None


class EncoderLevel(keras.layers.Layer):
    """Residual blocks at one width; returns (skip features, 2x2 max-pooled features)."""

    def __init__(self, config: ModelConfig, level: int, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        in_channels = config.base_width if level == 0 else level_width(config, level - 1)
        self.width = level_width(config, level)
        _make_blocks(self, config, in_channels, self.width)
        self.pool = keras.layers.MaxPooling2D(pool_size=2, strides=2, padding="valid", name="pool")

    def build(self, input_shape):
        self.pool.build(_build_blocks(self, input_shape, self.width))

    def call(self, x, training=False):
        skip = _run_blocks(self, x, training)
        return skip, self.pool(skip)


class Encoder(keras.layers.Layer):
    def __init__(self, config: ModelConfig, name: str = "encoder", **kwargs):
        super().__init__(name=name, **kwargs)
        self.depth = config.depth
        self.base_width = config.base_width
        self.stem = _conv(config.base_width, 3, "stem")
        for level in range(config.depth):
            setattr(self, f"level{level}", EncoderLevel(config, level, name=f"level{level}"))

    def build(self, input_shape):
        self.stem.build(input_shape)
        batch, size = input_shape[0], input_shape[1]
        channels = self.base_width
        for level in range(self.depth):
            layer = getattr(self, f"level{level}")
            layer.build((batch, size, size, channels))
            size, channels = size // 2, layer.width

    def call(self, x, training=False):
        """Returns (deepest pooled features, [skip_0, ..., skip_{depth-1}])."""
        x = self.stem(x)
        skips = []
        for level in range(self.depth):
            skip, x = getattr(self, f"level{level}")(x, training=training)
            skips.append(skip)
        return x, skips


class Bottleneck(keras.layers.Layer):
    """Residual blocks at base_width * 2**depth, followed by spatial dropout (if enabled)."""

    def __init__(self, config: ModelConfig, name: str = "bottleneck", **kwargs):
        super().__init__(name=name, **kwargs)
        self.width = level_width(config, config.depth)
        _make_blocks(self, config, level_width(config, config.depth - 1), self.width)
        self.dropout = _spatial_dropout(config.dropout)

    def build(self, input_shape):
        out_shape = _build_blocks(self, input_shape, self.width)
        if self.dropout is not None:
            self.dropout.build(out_shape)

    def call(self, x, training=False):
        x = _run_blocks(self, x, training)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        return x


class DecoderLevel(keras.layers.Layer):
    """Transposed-conv upsample onto the skip's exact size, concat, dropout, residual blocks."""

    def __init__(self, config: ModelConfig, level: int, size_in: int, size_out: int, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        width = level_width(config, level)
        self.width = width
        self.size_out = size_out
        self.upsample = keras.layers.Conv2DTranspose(
            width,
            3,
            strides=2,
            padding=upsample_padding(size_in, size_out),
            kernel_initializer=KERNEL_INITIALIZER,
            bias_initializer=BIAS_INITIALIZER,
            name="upsample",
        )
        self.dropout = _spatial_dropout(config.dropout)
        _make_blocks(self, config, 2 * width, width)

    def build(self, x_shape, skip_shape):
        self.upsample.build(x_shape)
        concat_shape = tuple(skip_shape[:-1]) + (self.width + skip_shape[-1],)
        if self.dropout is not None:
            self.dropout.build(concat_shape)
        _build_blocks(self, concat_shape, self.width)

    def call(self, x, skip, training=False):
        x = ops.concatenate([self.upsample(x), skip], axis=-1)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        return _run_blocks(self, x, training)


class Decoder(keras.layers.Layer):
    def __init__(self, config: ModelConfig, name: str = "decoder", **kwargs):
        super().__init__(name=name, **kwargs)
        self.depth = config.depth
        sizes = level_sizes(config.depth, config.input_size)
        for level in reversed(range(config.depth)):
            setattr(
                self,
                f"level{level}",
                DecoderLevel(config, level, sizes[level + 1], sizes[level], name=f"level{level}"),
            )

    def build(self, x_shape, skips_shape):
        for level in reversed(range(self.depth)):
            layer = getattr(self, f"level{level}")
            layer.build(x_shape, skips_shape[level])
            x_shape = tuple(skips_shape[level][:-1]) + (layer.width,)

    def call(self, x, skips, training=False):
        """Returns every level's output, deepest first; the last is level 0's, at full size."""
        outputs = []
        for level in reversed(range(self.depth)):
            x = getattr(self, f"level{level}")(x, skips[level], training=training)
            outputs.append(x)
        return outputs


def _resize(x, size: int):
    """Bilinear resize of [B, h, w, C] to [B, size, size, C] in x's dtype (no-op at that size already)."""
    if x.shape[1] == size:
        return x
    return ops.cast(tf.image.resize(x, (size, size), method="bilinear"), x.dtype)


def hypercolumn(level_outputs, size: int):
    """Concatenation of every decoder level's output, upsampled to `size`: level 0 first, then 1, 2, ..."""
    return ops.concatenate([_resize(x, size) for x in reversed(level_outputs)], axis=-1)


class SideOutputs(keras.layers.Layer):
    """Deep supervision: a 1x1 conv to one logit on each decoder level's output, upsampled to full size."""

    def __init__(self, config: ModelConfig, name: str = "side", **kwargs):
        super().__init__(name=name, **kwargs)
        self.depth = config.depth
        for level in range(config.depth):
            setattr(self, f"level{level}", _conv(1, 1, f"level{level}"))

    def build(self, level_shapes):
        """level_shapes: the decoder's output shapes, deepest first (as Decoder.call returns them)."""
        for level, shape in zip(reversed(range(self.depth)), level_shapes):
            getattr(self, f"level{level}").build(shape)

    def call(self, level_outputs, size: int):
        """Logits [B, size, size, 1] per decoder level, deepest first."""
        return [_resize(getattr(self, f"level{level}")(x), size)
                for level, x in zip(reversed(range(self.depth)), level_outputs)]


class ImageHead(keras.layers.Layer):
    """The "has salt" classifier: global average pool of the bottleneck -> dense -> one logit per image."""

    def __init__(self, name: str = "image_head", **kwargs):
        super().__init__(name=name, **kwargs)
        self.dense = keras.layers.Dense(1, kernel_initializer=KERNEL_INITIALIZER, bias_initializer=BIAS_INITIALIZER,
                                        name="dense")

    def build(self, input_shape):
        self.dense.build((input_shape[0], input_shape[-1]))

    def call(self, x):
        return self.dense(ops.mean(x, axis=(1, 2)))[:, 0]


class Head(keras.layers.Layer):
    """Final BN -> ReLU -> 1x1 conv to a single logit channel."""

    def __init__(self, name: str = "head", **kwargs):
        super().__init__(name=name, **kwargs)
        self.bn = _bn("bn")
        self.conv = _conv(1, 1, "conv")

    def build(self, input_shape):
        self.bn.build(input_shape)
        self.conv.build(input_shape)

    def call(self, x, training=False):
        return self.conv(ops.relu(self.bn(x, training=training)))


class UNet(keras.Model):
    """Residual SE U-Net. ``model(x, training=...)`` maps [B,101,101,C] to [B,101,101,1] mask logits;
    ``model.forward(x, training=...)`` returns every output (see ``forward``)."""

    def __init__(self, config: ModelConfig, name: str = "unet", **kwargs):
        super().__init__(name=name, **kwargs)
        self.config = config
        self.encoder = Encoder(config)
        self.bottleneck = Bottleneck(config)
        self.decoder = Decoder(config)
        self.head = Head()
        if config.deep_supervision:
            self.side = SideOutputs(config)
            self.image_head = ImageHead()

    def build(self, input_shape):
        """Creates every variable from shapes alone (no forward pass, no symbolic tracing).

        ``input_shape`` is the external [B, 101, 101, C]; the layers are built at the network's size
        (``config.input_size``). Each sublayer's build runs inside its own (nested) name scope, which is what
        gives the hierarchical variable paths.
        """
        config = self.config
        batch = input_shape[0]
        sizes = level_sizes(config.depth, config.input_size)
        shape = lambda level, channels: (batch, sizes[level], sizes[level], channels)  # noqa: E731
        self.encoder.build(shape(0, input_shape[-1]))
        self.bottleneck.build(shape(config.depth, level_width(config, config.depth - 1)))
        self.decoder.build(
            shape(config.depth, level_width(config, config.depth)),
            [shape(level, level_width(config, level)) for level in range(config.depth)],
        )
        head_channels = (sum(level_width(config, level) for level in range(config.depth)) if config.hypercolumn
                         else config.base_width)
        self.head.build(shape(0, head_channels))
        if config.deep_supervision:
            self.side.build([shape(level, level_width(config, level)) for level in reversed(range(config.depth))])
            self.image_head.build(shape(config.depth, level_width(config, config.depth)))

    def _check_input(self, x) -> None:
        shape = tuple(x.shape)
        expected = (IMAGE_SIZE, IMAGE_SIZE, self.config.input_channels)
        if len(shape) != 4 or any(s is not None and s != e for s, e in zip(shape[1:], expected)):
            raise ValueError(f"expected input of shape [B, {IMAGE_SIZE}, {IMAGE_SIZE}, "
                             f"{self.config.input_channels}], got {shape}")

    def pad(self, x):
        """[B, 101, 101, C] -> [B, input_size, input_size, C] by the configured padding (identity at 101)."""
        before, after = self.config.padding
        if before == after == 0:
            return x
        if self.config.pad_mode == "reflect":
            return tf.pad(x, [[0, 0], [before, after], [before, after], [0, 0]], mode="REFLECT")
        index = tf.clip_by_value(tf.range(-before, IMAGE_SIZE + after), 0, IMAGE_SIZE - 1)  # edge: repeat
        return tf.gather(tf.gather(x, index, axis=1), index, axis=2)

    def crop(self, y):
        """The centre 101x101 of a network-size map: what losses, metrics and predictions see."""
        before, _ = self.config.padding
        if before == 0 and y.shape[1] == IMAGE_SIZE:
            return y
        return y[:, before:before + IMAGE_SIZE, before:before + IMAGE_SIZE, :]

    def forward(self, x, training=False, record=None) -> dict:
        """Every output of the network for external input x [B, 101, 101, C], as float32:

            "mask"      [B, 101, 101, 1]  the (fused) mask logits, what ``model(x)`` returns
            "sides"     tuple of [B, 101, 101, 1] logits, one per decoder level, deepest first  (deep supervision)
            "has_salt"  [B] logit of the image-level classifier on the bottleneck               (deep supervision)

        ``record``, if a list, receives (name, layer, output) per block in forward order (``trace``).
        """
        self._check_input(x)
        note = (lambda *entry: record.append(entry)) if record is not None else (lambda *entry: None)
        config = self.config
        x = self.encoder.stem(self.pad(x))
        note("encoder/stem", self.encoder.stem, x)
        skips = []
        for level in range(config.depth):
            layer = getattr(self.encoder, f"level{level}")
            skip, x = layer(x, training=training)
            skips.append(skip)
            note(f"encoder/level{level}", layer, skip)
        bottom = self.bottleneck(x, training=training)
        note("bottleneck", self.bottleneck, bottom)
        levels = self.decoder(bottom, skips, training=training)
        for level, y in zip(reversed(range(config.depth)), levels):
            note(f"decoder/level{level}", getattr(self.decoder, f"level{level}"), y)
        features = hypercolumn(levels, config.input_size) if config.hypercolumn else levels[-1]
        outputs = {"mask": self.crop(ops.cast(self.head(features, training=training), "float32"))}
        if config.deep_supervision:
            outputs["sides"] = tuple(self.crop(ops.cast(side, "float32"))
                                     for side in self.side(levels, size=config.input_size))
            outputs["has_salt"] = ops.cast(self.image_head(bottom), "float32")
            note("image_head", self.image_head, outputs["has_salt"])
        note("head", self.head, outputs["mask"])
        return outputs

    def trace(self, x, training=False) -> list[tuple[str, keras.layers.Layer, object]]:
        """Runs the forward pass block by block; returns [(name, layer, output)] in order.

        For encoder levels the recorded output is the skip (pre-pool) tensor. The final entry's output (the
        head's, cropped to 101x101) equals ``self(x, training=training)``.
        """
        record = []
        self.forward(x, training=training, record=record)
        return record

    def call(self, x, training=False, all_outputs=False):
        """Mask logits [B, 101, 101, 1]; with ``all_outputs=True`` the dict of ``forward`` (through Keras'
        ``__call__``, as the train step calls it)."""
        outputs = self.forward(x, training=training)
        return outputs if all_outputs else outputs["mask"]


def outputs_of(model, x, training: bool) -> dict:
    """Every output of `model` on x as UNet.forward's dict: a UNet's through Keras' __call__ (all_outputs=True);
    any other Keras model's single output is the "mask" logits."""
    if isinstance(model, UNet):
        return model(x, training=training, all_outputs=True)
    return {"mask": ops.cast(model(x, training=training), "float32")}


PRECISIONS = ("float32", "mixed_bfloat16")


def build_model(config: ModelConfig, precision: str = "float32") -> UNet:
    """Creates the U-Net and builds all its variables for [None, 101, 101, C] float32 input.

    Weights are reproducible: call ``keras.utils.set_random_seed(s)`` first. ``precision`` is a Keras dtype
    policy: "mixed_bfloat16" computes activations in bfloat16 (logits too: cast them before a loss) while the
    variables stay float32, so checkpoints do not depend on it. Layers take the global policy when they are
    created; it is set for the construction only, so nothing else in the process changes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        model = UNet(config)
        model.build((None, IMAGE_SIZE, IMAGE_SIZE, config.input_channels))
    finally:
        keras.config.set_dtype_policy(previous)
    return model


def count_params(model: keras.Model) -> int:
    """Number of parameters: trainable + non-trainable (BN moving statistics).

    Only floating-point weights count; the integer dropout RNG counters are state, not
    parameters.
    """
    total = 0
    for w in model.weights:
        if "float" in str(w.dtype):
            total += int(np.prod(w.shape))
    return total


def forward_flops_per_image(config: ModelConfig) -> int:
    """Analytical forward FLOPs for one image at the network's size (``config.input_size``): 2 * MACs of
    convs, transposed convs and dense layers. Biases, BN, ReLU, pooling, gate scaling, resizes, padding and
    additions are ignored.

    Conv kxk (same padding) on an HxW output: 2 * H * W * k * k * Cin * Cout.
    Transposed conv: every input pixel scatters a k x k x Cout patch per input channel:
    2 * Hin * Win * k * k * Cin * Cout.  Dense: 2 * in * out.
    """
    sizes = level_sizes(config.depth, config.input_size)

    def conv(size, k, cin, cout):
        return 2 * size * size * k * k * cin * cout

    def block(size, cin, cout):
        flops = conv(size, 3, cin, cout) + conv(size, 3, cout, cout)
        if cin != cout:
            flops += conv(size, 1, cin, cout)
        if config.se:
            hidden = max(1, cout // config.se_ratio)
            flops += 2 * cout * hidden + 2 * hidden * cout
            if config.se_type == "scse":
                flops += conv(size, 1, cout, 1)
        return flops

    def blocks(size, cin, cout):
        return sum(block(size, cin if i == 0 else cout, cout) for i in range(config.blocks_per_level))

    w = lambda level: level_width(config, level)  # noqa: E731
    total = conv(sizes[0], 3, config.input_channels, config.base_width)
    for level in range(config.depth):
        cin = config.base_width if level == 0 else w(level - 1)
        total += blocks(sizes[level], cin, w(level))
    total += blocks(sizes[config.depth], w(config.depth - 1), w(config.depth))
    for level in reversed(range(config.depth)):
        s_in = sizes[level + 1]
        total += 2 * s_in * s_in * 9 * w(level + 1) * w(level)
        total += blocks(sizes[level], 2 * w(level), w(level))
    head_channels = sum(w(level) for level in range(config.depth)) if config.hypercolumn else config.base_width
    total += conv(sizes[0], 1, head_channels, 1)
    if config.deep_supervision:
        total += sum(conv(sizes[level], 1, w(level), 1) for level in range(config.depth))
        total += 2 * w(config.depth)
    return int(total)
