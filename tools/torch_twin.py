"""A PyTorch twin of salt_tf's default U-Net, and the speed ratio of the project's step to it in one sitting.

    python tools/torch_twin.py --steps=8 --repeats=3 --data_dir=../shared/data/tgs_salt --json=twin.json
    python tools/torch_twin.py --systems=tf,eager          # a subset of the systems

For comparison only: an optional dependency (``pip install -e '.[torch]'``), never imported by salt_tf.

The twin mirrors ``salt_tf.model.build_model(ModelConfig())`` layer for layer (the submodules carry the Keras
layers' names, so ``encoder.level1.block0.se.squeeze.weight`` is ``unet/encoder/level1/block0/se/squeeze/kernel``):

    encoder/stem          conv3x3 (bias) -> w                                   101x101
    encoder/level{L}      blocks_per_level pre-activation residual blocks at w*2**L, then 2x2 max-pool
                          (floor: 101 -> 50 -> 25 -> 12 -> 6)
    bottleneck            blocks_per_level residual blocks at w*2**D
    decoder/level{L}      3x3 stride-2 transposed conv to w*2**L with no padding (2s+1 pixels), cropped to the
                          skip's size when that is 2s: TensorFlow's 'same' transposed conv keeps exactly those
                          first 2s rows and columns; concat [upsampled, skip]; residual blocks at w*2**L
    head                  BN -> ReLU -> conv1x1 (bias) -> 1 logit channel
    residual block        pre = relu(bn1(x)); y = conv2(relu(bn2(conv1(pre))))  (conv1 without bias);
                          y = SE(y) = y * sigmoid(excite(relu(squeeze(mean_hw(y)))))  (hidden max(1, c // r));
                          out = (x or conv1x1(pre) when the width changes) + y

Batch norm: epsilon 1e-3 and momentum 0.9 in Keras' convention (0.1 in PyTorch's). Kernels are He-normal as
Keras' "he_normal" draws them (normal truncated at 2 sigma, sigma = sqrt(2 / fan_in) / 0.8796, Keras' fan_in
also for transposed convs: kh * kw * output channels), biases zero. One difference that does not change a
step's arithmetic: PyTorch updates the moving variance with the unbiased batch variance, Keras with the biased.

The timed step is the project's (``tools/bench.py``'s "custom step"): forward in training mode, BCE + Dice
(``losses.CombinedLoss("bce:1,dice:1")``: per image the pixel-mean BCE plus the soft Dice loss with smooth 1,
averaged over the batch), gradients, their global norm (the project's step computes it every step), an Adam
update (lr 1e-3, Keras' epsilon 1e-7), and the loss and norm copied to the host. Batch 32.

The command runs, one after another and each in its own child process (thread pools are fixed per process):

  tf          the project's deterministic default step: ``determinism.configure(0, True)`` (one inter-op thread,
              op determinism), ``step.TrainStep.train_step`` on a fixed batch, its loss to the host: the code path
              of tools/bench.py's "custom step, deterministic on", re-implemented here (not imported)
  eager       the twin in PyTorch eager mode (NCHW)
  eager_cl    the twin in eager mode, channels-last memory format (not in the default set)
  compile     the twin's forward + loss through ``torch.compile`` (default inductor backend; the backward is
              compiled by AOTAutograd; Adam runs eagerly), NCHW
  compile_cl  the same, channels-last

and prints one table (system, img/s, ratio to the project's step) with the CPU (model name, vector extensions,
the oneDNN ISA TensorFlow and PyTorch dispatch to, from ONEDNN_VERBOSE=1 on one convolution in a separate
child) and the float32 4096x4096 matmul ceilings of TensorFlow (measured as tools/bench.py does) and PyTorch.
Every rate: warm-up steps excluded, --steps timed steps per repeat, median of --repeats. Every system uses the
same batch (written by the tf child; random if tf is not run). PyTorch gets ``torch.set_num_threads(2)`` (intra-op:
the machine's cores, --threads) and ``torch.set_num_interop_threads(1)``, as the deterministic TensorFlow step
has one inter-op thread and TensorFlow's default intra-op pool (one thread per core).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import timing  # tools/timing.py (this script's folder is on sys.path)

IMAGE_SIZE = 101  # salt_tf.IMAGE_SIZE; not imported, so this module never loads TensorFlow
BN_EPSILON = 1e-3  # salt_tf.model.BN_EPSILON
BN_MOMENTUM_TORCH = 0.1  # 1 - salt_tf.model.BN_MOMENTUM (PyTorch weighs the new batch statistic)
ADAM_EPSILON = 1e-7  # Keras' Adam default
LEARNING_RATE = 1e-3
SYSTEMS = ("tf", "eager", "eager_cl", "compile", "compile_cl")
DEFAULT_SYSTEMS = ("tf", "eager", "compile", "compile_cl")
SYSTEM_LABELS = {
    "tf": "salt_tf step, deterministic (TrainStep.train_step)",
    "eager": "PyTorch twin, eager (NCHW)",
    "eager_cl": "PyTorch twin, eager (channels-last)",
    "compile": "PyTorch twin, torch.compile (NCHW)",
    "compile_cl": "PyTorch twin, torch.compile (channels-last)",
}
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="Kaggle layout folder (default: synthetic demo set)")
    parser.add_argument("--base_width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--blocks_per_level", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (each system)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="PyTorch intra-op threads")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--matmul_size", type=int, default=4096, help="side of the float32 matmul ceiling")
    parser.add_argument("--isa", type=int, default=1, help="1: probe the oneDNN ISA of TF and PyTorch (2 children)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch_file", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def tf_child(args) -> dict:
    """The project's deterministic default step, timed as tools/bench.py times "custom step, deterministic on",
    and TensorFlow's float32 matmul ceiling measured as bench.py does. Writes the batch to --batch_file."""
    from salt_tf import determinism

    applied = determinism.configure(0, True)
    import keras
    import tensorflow as tf

    from salt_tf import losses, model as model_lib, pipeline, step as step_lib
    from salt_tf.data import kaggle, synthetic

    data_dir = args.data_dir
    if data_dir is None:
        data_dir = os.path.join(tempfile.mkdtemp(), "demo")
        synthetic.generate(data_dir, num_images=max(200, 2 * args.batch_size), seed=0)
    images, masks = pipeline.to_arrays(kaggle.load_labelled(data_dir), use_depth=False)
    config = model_lib.ModelConfig(base_width=args.base_width, depth=args.depth,
                                   blocks_per_level=args.blocks_per_level)
    b = args.batch_size
    val = 400 if len(images) > 800 else len(images) // 5
    step = step_lib.TrainStep(model_lib.build_model(config), keras.optimizers.Adam(1e-3),
                              losses.CombinedLoss("bce:1,dice:1"), batch_size=b)
    batch_images, batch_masks = images[val:val + b], masks[val:val + b]
    if args.batch_file:
        np.savez(args.batch_file, images=batch_images, masks=batch_masks)
    x, y = tf.constant(batch_images), tf.constant(batch_masks)
    rates = timing.rates(lambda: step.train_step(x, y)[0]["loss"].numpy(), b, args.steps, args.repeats,
                         warmup=args.warmup)
    rate = statistics.median(rates)
    flops = model_lib.forward_flops_per_image(config)
    n = args.matmul_size
    a = tf.random.normal([n, n])
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, a)))
    ceiling = timing.median_rate(lambda: matmul().numpy(), 1, 5, args.repeats, warmup=1)
    return {"images_per_second": rate, "rates": rates, "applied": applied,
            "parameters": model_lib.count_params(step.model),
            "forward_gflop_per_image": flops / 1e9, "train_gflops_per_second": rate * 3 * flops / 1e9,
            "matmul_gflops_per_second": ceiling * 2 * n ** 3 / 1e9, "tensorflow": tf.__version__,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}


def isa_tf_child() -> dict:
    """One small TensorFlow convolution; with ONEDNN_VERBOSE=1 (set by the parent) oneDNN prints its ISA line."""
    import tensorflow as tf

    tf.nn.conv2d(tf.ones([8, 32, 32, 16]), tf.ones([3, 3, 16, 16]), 1, "SAME").numpy()
    return {}


# The command's TensorFlow children stop here, before PyTorch is imported: in one process with TensorFlow loaded,
# creating a torch optimizer crashed (segmentation fault; torch 2.14.1, TF 2.21), so the two never share a process.
if __name__ == "__main__" and any(arg in ("--child=tf", "--child=isa_tf") for arg in sys.argv[1:]):
    _args = parse_args(sys.argv[1:])
    print("TWIN " + json.dumps(tf_child(_args) if _args.child == "tf" else isa_tf_child()), flush=True)
    sys.exit(0)

import torch
import torch.nn.functional as F
from torch import nn

# Keras' truncated normal: the std of a unit normal truncated at +-2 sigma.
_TRUNCATED_STD = 0.87962566103423978


@dataclasses.dataclass(frozen=True)
class TwinConfig:
    """The architecture parameters the twin shares with ``salt_tf.model.ModelConfig`` (same names and defaults)."""

    base_width: int = 16
    depth: int = 4
    blocks_per_level: int = 2
    se: bool = True
    se_ratio: int = 4
    input_channels: int = 1


def twin_config(config) -> TwinConfig:
    """A TwinConfig from a TwinConfig or a ``salt_tf.model.ModelConfig`` (or anything with its attribute names).

    Raises ValueError for a configuration the twin does not mirror (scSE gates, dropout, hypercolumn, deep
    supervision, padded input, a depth that pools 101 below 2x2).
    """
    unsupported = {"se_type": "channel", "dropout": 0.0, "hypercolumn": False, "deep_supervision": False,
                   "input_size": IMAGE_SIZE}
    for name, supported in unsupported.items():
        if getattr(config, name, supported) != supported:
            raise ValueError(f"the torch twin mirrors {name}={supported!r} only, got {getattr(config, name)!r}")
    result = TwinConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TwinConfig)
                           if hasattr(config, f.name)})
    if result.base_width < 1 or result.blocks_per_level < 1 or result.se_ratio < 1 or result.input_channels < 1:
        raise ValueError(f"invalid twin config {result}")
    if not 1 <= result.depth or level_sizes(result.depth)[-1] < 2:
        raise ValueError(f"depth {result.depth} pools 101x101 below 2x2")
    return result


def level_sizes(depth: int, image_size: int = IMAGE_SIZE) -> list[int]:
    """Spatial sizes at levels 0..depth under 2x2 floor max-pooling (as salt_tf.model.level_sizes)."""
    sizes = [image_size]
    for _ in range(depth):
        sizes.append(sizes[-1] // 2)
    return sizes


def _he_normal_(weight: torch.Tensor, fan_in: int) -> None:
    """Keras' "he_normal" in place: a normal truncated at +-2 sigma whose std after truncation is sqrt(2/fan_in)."""
    std = math.sqrt(2.0 / fan_in) / _TRUNCATED_STD
    with torch.no_grad():
        nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


def _conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    _he_normal_(conv.weight, in_channels * kernel_size * kernel_size)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _dense(in_features: int, out_features: int) -> nn.Linear:
    dense = nn.Linear(in_features, out_features)
    _he_normal_(dense.weight, in_features)
    nn.init.zeros_(dense.bias)
    return dense


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM_TORCH)


class SqueezeExcite(nn.Module):
    """Channel gate (Hu et al. 2018): mean over H, W -> dense(c // r, relu) -> dense(c, sigmoid) -> scale."""

    def __init__(self, channels: int, ratio: int):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.squeeze = _dense(channels, hidden)
        self.excite = _dense(hidden, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class ResidualBlock(nn.Module):
    """Pre-activation residual block, SE on the residual branch, 1x1 projection of the pre-activated input."""

    def __init__(self, in_channels: int, channels: int, config: TwinConfig):
        super().__init__()
        self.bn1 = _bn(in_channels)
        self.conv1 = _conv(in_channels, channels, 3, bias=False)
        self.bn2 = _bn(channels)
        self.conv2 = _conv(channels, channels, 3)
        self.se = SqueezeExcite(channels, config.se_ratio) if config.se else None
        self.projection = _conv(in_channels, channels, 1) if in_channels != channels else None

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        shortcut = x if self.projection is None else self.projection(pre)
        y = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        if self.se is not None:
            y = self.se(y)
        return shortcut + y


class _Blocks(nn.Module):
    """blocks_per_level residual blocks as attributes block0, block1, ... (the Keras names)."""

    def __init__(self, config: TwinConfig, in_channels: int, channels: int):
        super().__init__()
        self.num_blocks = config.blocks_per_level
        for i in range(config.blocks_per_level):
            self.add_module(f"block{i}", ResidualBlock(in_channels if i == 0 else channels, channels, config))

    def forward(self, x):
        for i in range(self.num_blocks):
            x = getattr(self, f"block{i}")(x)
        return x


class EncoderLevel(_Blocks):
    """Residual blocks, then 2x2 max-pool (floor); returns (skip, pooled)."""

    def forward(self, x):
        skip = super().forward(x)
        return skip, F.max_pool2d(skip, 2, 2)


class Encoder(nn.Module):
    def __init__(self, config: TwinConfig):
        super().__init__()
        self.depth = config.depth
        self.stem = _conv(config.input_channels, config.base_width, 3)
        for level in range(config.depth):
            in_channels = config.base_width * 2 ** max(level - 1, 0)
            self.add_module(f"level{level}", EncoderLevel(config, in_channels, config.base_width * 2 ** level))

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for level in range(self.depth):
            skip, x = getattr(self, f"level{level}")(x)
            skips.append(skip)
        return x, skips


class DecoderLevel(_Blocks):
    """Transposed conv onto the skip's exact size, concat [upsampled, skip], residual blocks."""

    def __init__(self, config: TwinConfig, level: int, size_in: int, size_out: int):
        width = config.base_width * 2 ** level
        super().__init__(config, 2 * width, width)
        if size_out not in (2 * size_in, 2 * size_in + 1):
            raise ValueError(f"cannot upsample {size_in} -> {size_out} with a 3x3 stride-2 kernel")
        self.size_out = size_out
        self.upsample = nn.ConvTranspose2d(2 * width, width, 3, stride=2)  # 2 * size_in + 1 pixels
        _he_normal_(self.upsample.weight, 9 * width)  # Keras' fan_in of a transposed conv: kh * kw * filters
        nn.init.zeros_(self.upsample.bias)

    def forward(self, x, skip):
        up = self.upsample(x)[:, :, :self.size_out, :self.size_out]  # 'same' = the first 2s of the 2s+1
        return super().forward(torch.cat([up, skip], dim=1))


class Head(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bn = _bn(channels)
        self.conv = _conv(channels, 1, 1)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class UNet(nn.Module):
    """The twin: [B, C, 101, 101] float32 images -> [B, 1, 101, 101] mask logits (NCHW, PyTorch's layout)."""

    def __init__(self, config: TwinConfig):
        super().__init__()
        self.config = config
        w, depth = config.base_width, config.depth
        sizes = level_sizes(depth)
        self.encoder = Encoder(config)
        self.bottleneck = _Blocks(config, w * 2 ** (depth - 1), w * 2 ** depth)
        self.decoder = nn.Module()
        for level in reversed(range(depth)):
            self.decoder.add_module(f"level{level}", DecoderLevel(config, level, sizes[level + 1], sizes[level]))
        self.head = Head(w)

    def forward(self, x):
        x, skips = self.encoder(x)
        x = self.bottleneck(x)
        for level in reversed(range(self.config.depth)):
            x = getattr(self.decoder, f"level{level}")(x, skips[level])
        return self.head(x)


def build_model(config=None, seed: int = 0) -> UNet:
    """The twin of ``salt_tf.model.build_model(config)``.

    Args:
      config: a TwinConfig, a ``salt_tf.model.ModelConfig`` or None (the default model: width 16, depth 4, 2 blocks
        per level, SE ratio 4, one input channel).
      seed: ``torch.manual_seed`` before the weights are drawn (same seed, same weights).
    Returns:
      A UNet in training mode, float32 on the CPU, He-normal kernels, zero biases, BN gamma 1 / beta 0.
    Raises:
      ValueError: for a configuration the twin does not mirror (see ``twin_config``).
    """
    config = twin_config(config if config is not None else TwinConfig())
    torch.manual_seed(seed)
    return UNet(config)


def parameter_count(model: nn.Module) -> dict[str, int]:
    """Parameters of `model`, counted like ``salt_tf.model.count_params``.

    Returns:
      {"trainable": sum of the sizes of the parameters (Keras' trainable variables: kernels, biases, BN gamma and
      beta), "non_trainable": of the floating-point buffers (BN running mean and variance, Keras' moving statistics;
      the integer ``num_batches_tracked`` counters are state, not parameters), "total": their sum}.
    """
    trainable = sum(p.numel() for p in model.parameters())
    non_trainable = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return {"trainable": trainable, "non_trainable": non_trainable, "total": trainable + non_trainable}


_KERAS_SUFFIXES = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
                   "moving_mean": "running_mean", "moving_variance": "running_var"}


def torch_name(keras_path: str) -> str:
    """The twin's state-dict key of a Keras variable path: the same module names, PyTorch's tensor names
    ('unet/decoder/level0/block1/se/excite/kernel' -> 'decoder.level0.block1.se.excite.weight')."""
    parts = keras_path.split("/")
    if parts[0] == "unet":
        parts = parts[1:]
    parts[-1] = _KERAS_SUFFIXES[parts[-1]]
    return ".".join(parts)


def load_keras_weights(model: UNet, arrays: dict[str, np.ndarray]) -> None:
    """Copies a Keras UNet's variables into the twin, so both compute the same function.

    Args:
      model: the twin, built for the same config.
      arrays: {Keras ``variable.path``: value} for every float variable of ``salt_tf.model.build_model(config)``.
    Raises:
      KeyError/ValueError: when a variable has no counterpart, a shape differs, or a twin tensor is left unset.
    """
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    seen = set()
    for path, value in arrays.items():
        name = torch_name(path)
        target = state[name]
        value = np.asarray(value, dtype=np.float32)
        if value.ndim == 4:
            # Conv2D (kh, kw, in, out) -> (out, in, kh, kw); Conv2DTranspose (kh, kw, out, in) -> (in, out, kh, kw).
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T  # Dense (in, out) -> Linear (out, in)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{path} -> {name}: shape {value.shape} vs {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))
        seen.add(name)
    missing = set(state) - seen
    if missing:
        raise ValueError(f"twin tensors without a Keras variable: {sorted(missing)}")


def bce_dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The project's default loss, ``losses.CombinedLoss("bce:1,dice:1")`` averaged over the batch.

    Args:
      logits: [B, ...] mask logits; masks: [B, ...] 0/1 labels of the same size (any layout: reduced per image).
    Returns:
      A scalar: mean over images of (pixel-mean sigmoid cross-entropy + 1 - (2 sum(p y) + 1) / (sum p + sum y + 1)),
      p = sigmoid(logits).
    """
    batch = logits.shape[0]
    z = logits.reshape(batch, -1).float()
    y = masks.reshape(batch, -1).float()
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(dim=1)
    p = torch.sigmoid(z)
    dice = 1.0 - (2.0 * (p * y).sum(dim=1) + 1.0) / (p.sum(dim=1) + y.sum(dim=1) + 1.0)
    return (bce + dice).mean()


def make_step(model: UNet, compile: bool = False):
    """The twin's training step, ``step(images, masks) -> [loss, gradient norm]`` (Python floats).

    Args:
      model: the twin (its memory format is the caller's choice; inputs should match it).
      compile: run forward + loss through ``torch.compile`` (default backend); the backward is compiled with it.
    Returns:
      The step function. Each call: zero the gradients, forward in training mode, BCE + Dice, backward, the gradients'
      global 2-norm, one Adam update (lr 1e-3, eps 1e-7), and loss and norm to the host (one synchronisation).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, eps=ADAM_EPSILON)
    parameters = list(model.parameters())

    def forward_loss(images, masks):
        return bce_dice_loss(model(images), masks)

    if compile:
        forward_loss = torch.compile(forward_loss)

    def step(images, masks):
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(images, masks)
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        optimizer.step()
        return torch.stack([loss.detach(), norm]).tolist()

    return step


def set_threads(threads: int) -> dict:
    """torch intra-op threads = `threads`, inter-op threads = 1 (call before any torch op); returns what is set."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set or parallel work already started
        pass
    return {"intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads()}


def time_twin(config=None, batch_size: int = 32, steps: int = 8, repeats: int = 3, compile: bool = False,
              channels_last: bool = False, images: np.ndarray | None = None, masks: np.ndarray | None = None,
              threads: int = 2, warmup: int = 2) -> dict:
    """Times the twin's training step like the project's: warm-up excluded, median of repeats.

    Args:
      config: the architecture (see ``build_model``); batch_size: images per step.
      steps: timed steps per repeat; repeats: timed repeats (the median is reported); warmup: untimed steps first
        (they include torch.compile's compilation).
      compile: torch.compile the forward and loss; channels_last: the model and the batch in channels-last format.
      images, masks: NHWC float32 batch [B, 101, 101, C] / [B, 101, 101, 1] (the layout salt_tf feeds); None: a
        seeded random batch (images uniform, masks of random rectangles).
      threads: torch intra-op threads (inter-op: 1).
    Returns:
      {"images_per_second": median, "rates": per repeat, "warmup_seconds", "threads": {...}, "final_loss",
       "torch": version, "cpu_capability"}.
    """
    thread_info = set_threads(threads)
    config = twin_config(config if config is not None else TwinConfig())
    if images is None or masks is None:
        images, masks = random_batch(batch_size, config.input_channels)
    x = torch.from_numpy(np.ascontiguousarray(images[:batch_size].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(np.ascontiguousarray(masks[:batch_size].transpose(0, 3, 1, 2)))
    model = build_model(config)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        y = y.contiguous(memory_format=torch.channels_last)
    step = make_step(model, compile=compile)
    start = time.perf_counter()
    for _ in range(warmup):
        out = step(x, y)
    warmup_seconds = time.perf_counter() - start
    rates = timing.rates(lambda: step(x, y), batch_size, steps, repeats, warmup=0)
    rate = statistics.median(rates)
    out = step(x, y)
    return {"images_per_second": rate, "rates": rates, "warmup_seconds": warmup_seconds, "threads": thread_info,
            "final_loss": out[0], "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def random_batch(batch_size: int, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded NHWC batch: images uniform in [0, 1), masks 0/1 rectangles (some empty)."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size, IMAGE_SIZE, IMAGE_SIZE, channels), dtype=np.float32)
    masks = np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    for i in range(batch_size):
        if i % 3:
            r0, c0 = rng.integers(0, 80, 2)
            masks[i, r0:r0 + rng.integers(5, 60), c0:c0 + rng.integers(5, 60)] = 1.0
    return images, masks


def torch_matmul_gflops(size: int = 4096, repeats: int = 3) -> float:
    """PyTorch's float32 size x size matmul, GFLOP/s: 5 calls per repeat, median, as bench.py measures TF's."""
    a = torch.randn(size, size)
    rate = timing.median_rate(lambda: torch.matmul(a, a).sum().item(), 1, 5, repeats, warmup=1)
    return rate * 2 * size ** 3 / 1e9


# ------------------------------------------------------------------------------------------------ the command

def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """Model name, logical CPUs and the vector extensions that matter for oneDNN, from /proc/cpuinfo."""
    try:
        text = open(path).read()
    except OSError:
        return {"model_name": "unknown", "flags": []}
    name = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return {"model_name": name.group(1).strip() if name else "unknown", "logical_cpus": os.cpu_count(),
            "flags": [f for f in wanted if f in flags]}


def _load_batch(args, channels: int = 1):
    if args.batch_file and os.path.exists(args.batch_file):
        batch = np.load(args.batch_file)
        return batch["images"], batch["masks"]
    return random_batch(args.batch_size, channels)


def twin_child(args) -> dict:
    system = args.child
    config = TwinConfig(base_width=args.base_width, depth=args.depth, blocks_per_level=args.blocks_per_level)
    images, masks = _load_batch(args)
    result = time_twin(config, args.batch_size, args.steps, args.repeats, compile=system.startswith("compile"),
                       channels_last=system.endswith("_cl"), images=images, masks=masks, threads=args.threads,
                       warmup=args.warmup)
    result["parameters"] = parameter_count(build_model(config))["total"]
    if system == "eager":
        result["matmul_gflops_per_second"] = torch_matmul_gflops(args.matmul_size, args.repeats)
    return result


def isa_torch_child() -> dict:
    """One PyTorch convolution under oneDNN's verbose mode (and ONEDNN_VERBOSE=1 from the parent)."""
    set_threads(1)
    x, w = torch.ones(8, 16, 32, 32), torch.ones(16, 16, 3, 3)
    with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        F.conv2d(x, w, padding=1).sum().item()
        try:  # oneDNN's convolution directly, in case the dispatcher chose another kernel above
            torch.mkldnn_convolution(x, w, None, [1, 1], [1, 1], [1, 1], 1).sum().item()
        except RuntimeError:
            pass
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _run_child(args, child: str, extra_env: dict | None = None) -> tuple[dict, str]:
    passthrough = [f"--{k}={v}" for k, v in vars(args).items()
                   if k in ("data_dir", "base_width", "depth", "blocks_per_level", "batch_size", "steps", "repeats",
                            "warmup", "threads", "matmul_size", "batch_file") and v is not None]
    # The children import the salt_tf next to this tool (the script's own folder, tools/, is what Python puts first).
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={child}", *passthrough],
                         capture_output=True, text=True, env=env, check=False)
    line = [l for l in out.stdout.splitlines() if l.startswith("TWIN ")]
    if out.returncode or not line:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"error": f"exit {out.returncode}: {tail}"}, out.stdout
    return json.loads(line[-1][len("TWIN "):]), out.stdout


def _isa_from_verbose(stdout: str) -> str:
    """The ISA oneDNN names in its verbose header ('onednn_verbose,...,info,cpu,isa:<ISA>'), or 'unknown'."""
    for line in stdout.splitlines():
        match = re.search(r"(?:onednn|dnnl)_verbose.*isa:(.*)$", line)
        if match:
            return match.group(1).strip()
    lines = [line for line in stdout.splitlines() if "verbose" in line]
    return f"unknown ({lines[0][:120]})" if lines else "unknown (no oneDNN verbose output)"


def main(argv=None) -> dict:
    """Runs the command (see the module docstring); returns the summary that --json writes."""
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.child:
        if args.child == "isa_torch":
            result = isa_torch_child()
        elif args.child in ("tf", "isa_tf"):  # normally run before PyTorch is imported (see above)
            result = tf_child(args) if args.child == "tf" else isa_tf_child()
        else:
            result = twin_child(args)
        print("TWIN " + json.dumps(result), flush=True)
        return {}
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        sys.exit(f"--systems: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    workdir = tempfile.mkdtemp()
    args.batch_file = os.path.join(workdir, "batch.npz")
    results = {}
    for system in systems:
        start = time.perf_counter()
        results[system], _ = _run_child(args, system)
        results[system]["child_seconds"] = time.perf_counter() - start
        print(f"{system:<11} {results[system].get('images_per_second', results[system].get('error'))}",
              file=sys.stderr, flush=True)
    cpu = cpu_info()
    if args.isa:
        for framework in ("tf", "torch"):
            probe, stdout = _run_child(args, f"isa_{framework}", {"ONEDNN_VERBOSE": "1"})
            cpu[f"onednn_isa_{framework}"] = _isa_from_verbose(stdout)
            if "cpu_capability" in probe:
                cpu["torch_cpu_capability"] = probe["cpu_capability"]
    base = results.get("tf", {}).get("images_per_second")
    table = []
    for system in systems:
        rate = results[system].get("images_per_second")
        table.append({"system": SYSTEM_LABELS[system], "key": system, "images_per_second": rate,
                      "ratio_to_project_step": rate / base if rate and base else None,
                      "error": results[system].get("error")})
    ceilings = {"tensorflow": results.get("tf", {}).get("matmul_gflops_per_second"),
                "torch": results.get("eager", {}).get("matmul_gflops_per_second")}
    print(f"CPU: {cpu['model_name']}, {cpu.get('logical_cpus')} logical CPUs; flags: {' '.join(cpu['flags'])}")
    if args.isa:
        print(f"oneDNN ISA: TensorFlow {cpu.get('onednn_isa_tf')}; PyTorch {cpu.get('onednn_isa_torch')} "
              f"(cpu capability {cpu.get('torch_cpu_capability')})")
    print(f"float32 {args.matmul_size}^2 matmul ceiling (GFLOP/s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items() if v))
    print(f"model: base_width={args.base_width} depth={args.depth} blocks={args.blocks_per_level}, float32, batch "
          f"{args.batch_size}, BCE + Dice, Adam; {args.warmup} warm-up steps, {args.steps} steps x {args.repeats} "
          f"repeats (median); PyTorch threads: {args.threads} intra-op, 1 inter-op")
    width = max(len(row["system"]) for row in table)
    print(f"{'system':<{width}}  {'img/s':>8}  {'ratio':>6}")
    for row in table:
        if row["images_per_second"] is None:
            print(f"{row['system']:<{width}}  error: {row['error']}")
            continue
        ratio = f"{row['ratio_to_project_step']:6.2f}" if row["ratio_to_project_step"] else "     -"
        print(f"{row['system']:<{width}}  {row['images_per_second']:8.2f}  {ratio}")
    summary = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "batch_file")}, "cpu": cpu,
               "matmul_gflops_per_second": ceilings, "table": table, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
