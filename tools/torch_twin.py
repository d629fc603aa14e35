"""A PyTorch twin of salt_tf's U-Net (the default model, or a flagfile's: the recipe), and the speed ratio of the
project's train step to the twin's in one sitting.

    python tools/torch_twin.py --steps=8 --repeats=3 --data_dir=../shared/data/tgs_salt --json=twin.json
    python tools/torch_twin.py --systems=tf,eager          # a subset of the systems
    python tools/torch_twin.py --flagfile=flags/recipe.cfg --data_dir=../shared/data/tgs_salt   # the recipe's step

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

and the options of ``ModelConfig`` the recipe uses (flags/recipe.cfg), as salt_tf.model computes them:

    --se_type=scse        the gate is block{i}/scse: scse/se (the channel gate above) + scse/sse, the spatial
                          gate y * sigmoid(gate(y)), gate a conv1x1 (bias) to one channel; the two outputs added
    --hypercolumn         the head (BN -> ReLU -> conv1x1) reads the concatenation [level 0, level 1, ...] of every
                          decoder level's output resized to 101x101
    --deep_supervision    side/level{L}: conv1x1 (bias) to one logit on decoder level L's output, resized to 101x101;
                          image_head/dense: the "has salt" logit of the bottleneck's mean over H, W
    resizes               tf.image.resize bilinear (TensorFlow 2: half-pixel centres, no antialiasing when
                          upsampling) = F.interpolate(mode="bilinear", align_corners=False), tested equal

Batch norm: epsilon 1e-3 and momentum 0.9 in Keras' convention (0.1 in PyTorch's). Kernels are He-normal as
Keras' "he_normal" draws them (normal truncated at 2 sigma, sigma = sqrt(2 / fan_in) / 0.8796, Keras' fan_in
also for transposed convs: kh * kw * output channels), biases zero. One difference that does not change a
step's arithmetic: PyTorch updates the moving variance with the unbiased batch variance, Keras with the biased.

The timed step is the project's (``tools/bench.py``'s "custom step"): forward in training mode, BCE + Dice
(``losses.CombinedLoss("bce:1,dice:1")``: per image the pixel-mean BCE plus the soft Dice loss with smooth 1,
averaged over the batch), gradients, their global norm (the project's step computes it every step), an Adam
update (lr 1e-3, Keras' epsilon 1e-7), and the loss and norm copied to the host. Batch 32.

With ``--flagfile=F`` (a train flagfile, e.g. flags/recipe.cfg) the step is F's instead. The tf child parses F with
the train command's own flags and builds its step with the train command's builders (configs.model_config,
schedules.build_optimizer, losses.build_losses: loss stage 0, the loop config's batch size and clip norm;
determinism from F's --seed and --deterministic). A first TensorFlow child (``config``) reads the same objects for
the twin: its model, its loss (``TwinLoss``: the --loss terms bce, dice, lovasz, lovasz_elu, lovasz_sym,
lovasz_sym_elu per image, the Lovász hinge sorted by a stable sort as TensorFlow's top_k breaks ties; with deep
supervision the same loss at the fused output, + --side_loss_weight x its sum over the side outputs on images
with salt only, + --image_loss_weight x the image head's sigmoid cross-entropy), Adam at F's --learning_rate
(constant: the schedule moves it per epoch) and clip norm. --base_width, --depth, --blocks_per_level and
--batch_size, when given, override F's; the batch is the tool's (--data_dir), not F's data. Mixed precision, SGD,
weight decay, the focal loss, dropout and a padded --input_size are not mirrored: one ``error:`` line (exit 2)
before any timing.

The command runs, one after another and each in its own child process (thread pools are fixed per process):

  tf          the project's deterministic default step: ``determinism.configure(0, True)`` (one inter-op thread,
              op determinism), ``step.TrainStep.train_step`` on a fixed batch, its loss to the host: the code path
              of tools/bench.py's "custom step, deterministic on", re-implemented here (not imported); with
              --flagfile, the flagfile's step as the train command builds it
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
# The tool's model and batch flags: the default model's shape, or (with --flagfile) overrides of the flagfile's.
SHAPE_FLAGS = {"base_width": 16, "depth": 4, "blocks_per_level": 2, "batch_size": 32}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="Kaggle layout folder (default: synthetic demo set)")
    parser.add_argument("--flagfile", default=None,
                        help="a train flagfile (e.g. flags/recipe.cfg): time the step the train command builds from "
                             "it and the twin of that model, loss and optimizer (default: the default model)")
    for name, default in SHAPE_FLAGS.items():
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"default {default}; with --flagfile, overrides the flagfile's")
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
    parser.add_argument("--config_file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flagfile is None:
        for name, default in SHAPE_FLAGS.items():
            setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    return args


def parse_train_flags(args):
    """absl's FLAGS with the train command's flags defined and parsed from --flagfile, the tool's shape flags that
    were given after it (a later flag wins). The tool's batch is its own (--data_dir): the flagfile's data flags
    are overridden by a demo set that is never written, so its data folder need not exist here.

    Raises:
      absl.flags.Error: a flag of the flagfile is unknown or fails a train validator.
    """
    from absl import flags

    from salt_tf import flags as salt_flags

    salt_flags.define_flags()
    overrides = [f"--{name}={getattr(args, name)}" for name in SHAPE_FLAGS if getattr(args, name) is not None]
    flags.FLAGS(salt_flags.join_repeated(["torch_twin", f"--flagfile={args.flagfile}", *overrides,
                                          "--dataset=demo", f"--data_dir={tempfile.gettempdir()}"]))
    return flags.FLAGS


def flagfile_step(args):
    """The train step of --flagfile as the train command builds it (train._run): determinism from --seed and
    --deterministic, the model of configs.model_config, schedules.build_optimizer, losses.build_losses (stage 0
    is timed), the batch size and clip norm of the loop's config. Returns (TrainStep, ModelConfig, applied)."""
    from salt_tf import determinism

    flag_values = parse_train_flags(args)
    applied = determinism.configure(flag_values.seed, flag_values.deterministic)
    from salt_tf import configs, losses, model as model_lib, schedules, step as step_lib

    model_config, loop_config = configs.model_config(), configs.loop_config()
    model = model_lib.build_model(model_config, precision=flag_values.precision)
    optimizer = schedules.build_optimizer(configs.optimizer_config())
    loss_stages = losses.build_losses(configs.loss_config(), model_config.deep_supervision)
    step = step_lib.TrainStep(model, optimizer, loss_stages, batch_size=loop_config.batch_size,
                              clip_norm=loop_config.clip_norm)
    return step, model_config, applied


def default_step(args):
    """The project's deterministic default step (tools/bench.py's "custom step, deterministic on"): ModelConfig
    of the tool's shape flags, Adam 1e-3, BCE + Dice. Returns (TrainStep, ModelConfig, applied)."""
    from salt_tf import determinism

    applied = determinism.configure(0, True)
    import keras

    from salt_tf import losses, model as model_lib, step as step_lib

    config = model_lib.ModelConfig(base_width=args.base_width, depth=args.depth,
                                   blocks_per_level=args.blocks_per_level)
    step = step_lib.TrainStep(model_lib.build_model(config), keras.optimizers.Adam(1e-3),
                              losses.CombinedLoss("bce:1,dice:1"), batch_size=args.batch_size)
    return step, config, applied


def config_child(args) -> dict:
    """What the twin needs of --flagfile, read from the objects the train command builds (JSON-ready): the model
    config, the loss of stage 0 (terms, deep-supervision weights), the optimizer config, batch size, clip norm,
    precision; {"error": one line} when the flagfile does not parse."""
    from absl import flags

    try:
        flag_values = parse_train_flags(args)
    except flags.Error as e:
        return {"error": str(e)}
    from salt_tf import configs, losses

    model_config, loop_config = configs.model_config(), configs.loop_config()
    loss = losses.build_losses(configs.loss_config(), model_config.deep_supervision)[0]
    mask_loss = loss.mask_loss if model_config.deep_supervision else loss
    return {"model": dataclasses.asdict(model_config), "loss_spec": loss.spec,
            "loss": {"terms": [list(term) for term in mask_loss.terms],
                     "deep_supervision": model_config.deep_supervision,
                     "side_weight": getattr(loss, "side_weight", 0.0), "image_weight": getattr(loss, "image_weight", 0.0)},
            "optimizer": dataclasses.asdict(configs.optimizer_config()), "batch_size": loop_config.batch_size,
            "clip_norm": loop_config.clip_norm, "precision": flag_values.precision}


def tf_child(args) -> dict:
    """The project's deterministic step (the default model's, or --flagfile's), timed as tools/bench.py times
    "custom step, deterministic on", and TensorFlow's float32 matmul ceiling measured as bench.py does. Writes the
    batch to --batch_file."""
    step, config, applied = flagfile_step(args) if args.flagfile else default_step(args)
    import tensorflow as tf

    from salt_tf import model as model_lib, pipeline
    from salt_tf.data import kaggle, synthetic

    data_dir = args.data_dir
    b = step.batch_size
    if data_dir is None:
        data_dir = os.path.join(tempfile.mkdtemp(), "demo")
        synthetic.generate(data_dir, num_images=max(200, 2 * b), seed=0)
    images, masks = pipeline.to_arrays(kaggle.load_labelled(data_dir), use_depth=False)
    val = 400 if len(images) > 800 else len(images) // 5
    batch_images, batch_masks = images[val:val + b], masks[val:val + b]
    if args.batch_file:
        np.savez(args.batch_file, images=batch_images, masks=batch_masks)
    x, y = tf.constant(batch_images), tf.constant(batch_masks)
    rates = timing.rates(lambda: step.train_step(x, y)[0]["loss"].numpy(), b, args.steps, args.repeats,
                         warmup=args.warmup)
    rate = statistics.median(rates)
    flops = model_lib.forward_flops_per_image(config)
    return {"images_per_second": rate, "rates": rates, "applied": applied,
            "parameters": model_lib.count_params(step.model), "loss": repr(step.loss_stages[0]),
            "forward_gflop_per_image": flops / 1e9, "train_gflops_per_second": rate * 3 * flops / 1e9,
            "matmul_gflops_per_second": timing.tf_matmul_gflops(tf, args.matmul_size, args.repeats), "tensorflow": tf.__version__,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()}


def isa_tf_child() -> dict:
    """One small TensorFlow convolution; with ONEDNN_VERBOSE=1 (set by the parent) oneDNN prints its ISA line."""
    import tensorflow as tf

    tf.nn.conv2d(tf.ones([8, 32, 32, 16]), tf.ones([3, 3, 16, 16]), 1, "SAME").numpy()
    return {}


# The command's TensorFlow children stop here, before PyTorch is imported: in one process with TensorFlow loaded,
# creating a torch optimizer crashed (segmentation fault; torch 2.14.1, TF 2.21), so the two never share a process.
TF_CHILDREN = {"tf": tf_child, "isa_tf": lambda args: isa_tf_child(), "config": config_child}
if __name__ == "__main__" and any(arg in [f"--child={c}" for c in TF_CHILDREN] for arg in sys.argv[1:]):
    _args = parse_args(sys.argv[1:])
    print("TWIN " + json.dumps(TF_CHILDREN[_args.child](_args)), flush=True)
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
    se_type: str = "channel"  # "channel" (cSE) or "scse" (channel + spatial gates, added)
    hypercolumn: bool = False  # the head sees every decoder level, upsampled to 101x101
    deep_supervision: bool = False  # side logits per decoder level + the image-level "has salt" logit


def twin_config(config) -> TwinConfig:
    """A TwinConfig from a TwinConfig, a ``salt_tf.model.ModelConfig`` or a dict (or anything with its attribute
    names).

    Raises ValueError for a configuration the twin does not mirror (dropout, padded input, an unknown gate type,
    a depth that pools 101 below 2x2).
    """
    get = config.get if isinstance(config, dict) else lambda name, default: getattr(config, name, default)
    unsupported = {"dropout": 0.0, "input_size": IMAGE_SIZE}
    for name, supported in unsupported.items():
        if get(name, supported) != supported:
            raise ValueError(f"the torch twin mirrors {name}={supported!r} only, got {get(name, None)!r}")
    result = TwinConfig(**{f.name: get(f.name, f.default) for f in dataclasses.fields(TwinConfig)})
    if result.base_width < 1 or result.blocks_per_level < 1 or result.se_ratio < 1 or result.input_channels < 1:
        raise ValueError(f"invalid twin config {result}")
    if result.se_type not in ("channel", "scse"):
        raise ValueError(f"the torch twin mirrors se_type 'channel' or 'scse', got {result.se_type!r}")
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


class SpatialSqueezeExcite(nn.Module):
    """Spatial gate (Roy et al. 2018, sSE): conv1x1 (bias) to one channel -> sigmoid -> scale every pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = _conv(channels, 1, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.gate(x))


class ConcurrentSqueezeExcite(nn.Module):
    """scSE: the channel gate (``se``, named as in a cSE model) and the spatial gate (``sse``), outputs added."""

    def __init__(self, channels: int, ratio: int):
        super().__init__()
        self.se = SqueezeExcite(channels, ratio)
        self.sse = SpatialSqueezeExcite(channels)

    def forward(self, x):
        return self.se(x) + self.sse(x)


class ResidualBlock(nn.Module):
    """Pre-activation residual block, the gate on the residual branch (``se``: cSE, or ``scse``), 1x1 projection
    of the pre-activated input."""

    def __init__(self, in_channels: int, channels: int, config: TwinConfig):
        super().__init__()
        self.bn1 = _bn(in_channels)
        self.conv1 = _conv(in_channels, channels, 3, bias=False)
        self.bn2 = _bn(channels)
        self.conv2 = _conv(channels, channels, 3)
        # The attribute is the Keras layer's name (model._gate): "se" for a channel gate, "scse" for both gates.
        self.gate_name = None
        if config.se:
            self.gate_name = "scse" if config.se_type == "scse" else "se"
            gate = (ConcurrentSqueezeExcite if config.se_type == "scse" else SqueezeExcite)(channels, config.se_ratio)
            self.add_module(self.gate_name, gate)
        self.projection = _conv(in_channels, channels, 1) if in_channels != channels else None

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        shortcut = x if self.projection is None else self.projection(pre)
        y = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        if self.gate_name is not None:
            y = getattr(self, self.gate_name)(y)
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


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``salt_tf.model._resize`` in NCHW: ``tf.image.resize(x, (size, size), "bilinear")`` (TensorFlow 2's half-pixel
    centres, no antialiasing when upsampling) is ``F.interpolate(..., align_corners=False)``; identity at `size`."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class SideOutputs(nn.Module):
    """Deep supervision: conv1x1 (bias) to one logit on each decoder level's output (``level{L}``), resized."""

    def __init__(self, config: TwinConfig):
        super().__init__()
        self.depth = config.depth
        for level in range(config.depth):
            self.add_module(f"level{level}", _conv(config.base_width * 2 ** level, 1, 1))

    def forward(self, level_outputs, size: int):
        """Logits [B, 1, size, size] per decoder level, deepest first (as level_outputs)."""
        return [resize(getattr(self, f"level{level}")(x), size)
                for level, x in zip(reversed(range(self.depth)), level_outputs)]


class ImageHead(nn.Module):
    """The "has salt" classifier: mean over H, W of the bottleneck -> dense -> one logit per image [B]."""

    def __init__(self, channels: int):
        super().__init__()
        self.dense = _dense(channels, 1)

    def forward(self, x):
        return self.dense(x.mean(dim=(2, 3)))[:, 0]


class UNet(nn.Module):
    """The twin: [B, C, 101, 101] float32 images -> [B, 1, 101, 101] mask logits (NCHW, PyTorch's layout);
    ``outputs(x)`` gives every output, as ``salt_tf.model.UNet.forward``."""

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
        self.head = Head(sum(w * 2 ** level for level in range(depth)) if config.hypercolumn else w)
        if config.deep_supervision:
            self.side = SideOutputs(config)
            self.image_head = ImageHead(w * 2 ** depth)

    def outputs(self, x) -> dict:
        """{"mask": [B, 1, 101, 101] logits} and with deep supervision "sides" (tuple of [B, 1, 101, 101] logits,
        deepest level first) and "has_salt" ([B] logits of the image head)."""
        x, skips = self.encoder(x)
        bottom = self.bottleneck(x)
        levels, x = [], bottom
        for level in reversed(range(self.config.depth)):
            x = getattr(self.decoder, f"level{level}")(x, skips[level])
            levels.append(x)
        # The hypercolumn: level 0 first, then 1, 2, ... each resized to full size (model.hypercolumn).
        features = torch.cat([resize(y, IMAGE_SIZE) for y in reversed(levels)], dim=1) \
            if self.config.hypercolumn else levels[-1]
        result = {"mask": self.head(features)}
        if self.config.deep_supervision:
            result["sides"] = tuple(self.side(levels, IMAGE_SIZE))
            result["has_salt"] = self.image_head(bottom)
        return result

    def forward(self, x):
        return self.outputs(x)["mask"]


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


def _per_image(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, N]: every loss reduces over axis 1 only (losses._flatten); NCHW with one channel flattens to
    the same pixel order as salt_tf's NHWC, which the Lovász sort's tie order depends on."""
    return x.reshape(x.shape[0], -1)


def bce(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``losses.bce``: the pixel-mean sigmoid cross-entropy of each image, [B, N] -> [B]."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)


def dice(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``losses.dice`` (smooth 1): 1 - (2 sum(p y) + 1) / (sum p + sum y + 1), p = sigmoid(logits), [B, N] -> [B]."""
    p = torch.sigmoid(logits)
    return 1.0 - (2.0 * (p * labels).sum(dim=1) + 1.0) / (p.sum(dim=1) + labels.sum(dim=1) + 1.0)


def lovasz_weights(labels_sorted: torch.Tensor) -> torch.Tensor:
    """``lovasz_grad`` of the reference (``losses._lovasz_weights`` before its move back to pixel order): the
    Jaccard loss's increments along labels sorted by decreasing error, [B, N]. An empty mask gets 1 on its first
    (largest-error) pixel and 0 elsewhere (the union is >= 1 everywhere)."""
    positives = labels_sorted.sum(dim=1, keepdim=True)
    jaccard = 1.0 - (positives - labels_sorted.cumsum(dim=1)) / (positives + (1.0 - labels_sorted).cumsum(dim=1))
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def lovasz(labels: torch.Tensor, logits: torch.Tensor, elu_plus_one: bool = False,
           symmetric: bool = False) -> torch.Tensor:
    """``losses.lovasz_hinge`` / ``losses.lovasz_symmetric`` per image, [B, N] -> [B], as the reference's PyTorch
    ``lovasz_hinge_flat``: errors 1 - logit (2y - 1) sorted in decreasing order (a stable sort: ties keep the lower
    pixel first, as TensorFlow's top_k), relu(errors) (elu(errors) + 1 with `elu_plus_one`) dotted with the
    constant Lovász weights of the sorted labels; the gradient reaches the logits through the sort's values.

    symmetric: (hinge(logits, y) + hinge(-logits, 1 - y)) / 2. Both terms have the same errors, bit for bit, so
    one sort serves both (as in losses.lovasz_symmetric); the mirrored term's weights are those of 1 - y.
    """
    errors_sorted, order = torch.sort(1.0 - logits * (2.0 * labels - 1.0), dim=1, descending=True, stable=True)
    labels_sorted = torch.gather(labels, 1, order)
    margins = F.elu(errors_sorted) + 1.0 if elu_plus_one else F.relu(errors_sorted)
    weights = lovasz_weights(labels_sorted)
    if symmetric:
        weights = 0.5 * (weights + lovasz_weights(1.0 - labels_sorted))
    return (margins * weights).sum(dim=1)


# The terms of salt_tf's --loss the twin mirrors (losses.LOSS_NAMES but focal), each [B, N] labels and logits -> [B].
LOSS_TERMS = {
    "bce": bce,
    "dice": dice,
    "lovasz": lovasz,
    "lovasz_elu": lambda y, z: lovasz(y, z, elu_plus_one=True),
    "lovasz_sym": lambda y, z: lovasz(y, z, symmetric=True),
    "lovasz_sym_elu": lambda y, z: lovasz(y, z, elu_plus_one=True, symmetric=True),
}


class TwinLoss:
    """salt_tf's loss of a run (``losses.build_losses(...)[0]``), averaged over the batch as the step does.

    Without deep supervision ``losses.CombinedLoss(terms)``: per image the weighted sum of the terms of the mask
    logits. With it ``losses.DeepSupervisionLoss``: that of the fused mask logits, + side_weight x the sum over the
    side outputs of the same combined loss, on images with salt only (an empty image's side term is 0), +
    image_weight x the sigmoid cross-entropy of the image head's logit against "the mask has salt" (max > 0.5).
    """

    def __init__(self, terms=(("bce", 1.0), ("dice", 1.0)), deep_supervision: bool = False,
                 side_weight: float = 0.1, image_weight: float = 0.05):
        """Args:
          terms: (name, weight) pairs, names from LOSS_TERMS (``losses.parse_loss_spec`` of --loss).
          deep_supervision: score the side outputs and the image head too (the model's deep_supervision).
          side_weight, image_weight: --side_loss_weight, --image_loss_weight.
        Raises:
          ValueError: a term the twin does not mirror.
        """
        unknown = [name for name, _ in terms if name not in LOSS_TERMS]
        if unknown:
            raise ValueError(f"the torch twin mirrors the losses {', '.join(LOSS_TERMS)}; got {', '.join(unknown)}")
        self.terms = tuple((name, float(weight)) for name, weight in terms)
        self.deep_supervision, self.side_weight, self.image_weight = deep_supervision, side_weight, image_weight

    def mask_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The combined loss per image: sum of weight x term, [B, N] labels and logits -> [B]."""
        total = None
        for name, weight in self.terms:
            term = weight * LOSS_TERMS[name](labels, logits)
            total = term if total is None else total + term
        return total

    def per_image(self, outputs, masks: torch.Tensor) -> torch.Tensor:
        """The loss of each image [B].

        Args:
          outputs: ``UNet.outputs``' dict, or the mask logits alone (without deep supervision).
          masks: [B, ...] 0/1 labels with as many pixels per image as the logits (any layout).
        """
        if not isinstance(outputs, dict):
            outputs = {"mask": outputs}
        mask = _per_image(outputs["mask"])
        labels = _per_image(masks).to(mask.dtype)
        total = self.mask_loss(labels, mask)
        if not self.deep_supervision:
            return total
        has_salt = (labels.amax(dim=1) > 0.5).to(mask.dtype)
        side = None
        for logits in outputs["sides"]:
            term = self.mask_loss(labels, _per_image(logits))
            side = term if side is None else side + term
        image = F.binary_cross_entropy_with_logits(outputs["has_salt"], has_salt, reduction="none")
        return total + self.side_weight * (side * has_salt) + self.image_weight * image

    def __call__(self, outputs, masks: torch.Tensor) -> torch.Tensor:
        """The batch mean of ``per_image`` (the step's ``tf.nn.compute_average_loss`` on one replica)."""
        return self.per_image(outputs, masks).mean()


def bce_dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The project's default loss, ``losses.CombinedLoss("bce:1,dice:1")`` averaged over the batch.

    Args:
      logits: [B, ...] mask logits; masks: [B, ...] 0/1 labels of the same size (any layout: reduced per image).
    Returns:
      A scalar: mean over images of (pixel-mean sigmoid cross-entropy + 1 - (2 sum(p y) + 1) / (sum p + sum y + 1)),
      p = sigmoid(logits).
    """
    return TwinLoss()(logits.float(), masks)


def make_step(model: UNet, compile: bool = False, loss: TwinLoss | None = None,
              learning_rate: float = LEARNING_RATE, clip_norm: float = 0.0):
    """The twin's training step, ``step(images, masks) -> [loss, gradient norm]`` (Python floats).

    Args:
      model: the twin (its memory format is the caller's choice; inputs should match it).
      compile: run forward + loss through ``torch.compile`` (default backend); the backward is compiled with it.
      loss: the loss of every output (default: BCE + Dice of the mask logits).
      learning_rate: Adam's (constant: the timed steps are a sliver of one epoch of the project's schedule).
      clip_norm: > 0: scale the gradients by clip_norm / max(norm, clip_norm) (tf.clip_by_global_norm).
    Returns:
      The step function. Each call: zero the gradients, forward in training mode, the loss, backward, the gradients'
      global 2-norm (and clipping), one Adam update (eps 1e-7), and loss and norm to the host (one synchronisation).
    """
    loss = loss if loss is not None else TwinLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, eps=ADAM_EPSILON)
    parameters = list(model.parameters())

    def forward_loss(images, masks):
        return loss(model.outputs(images), masks)

    if compile:
        forward_loss = torch.compile(forward_loss)

    def step(images, masks):
        optimizer.zero_grad(set_to_none=True)
        value = forward_loss(images, masks)
        value.backward()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        if clip_norm > 0:
            torch._foreach_mul_([p.grad for p in parameters], clip_norm / torch.clamp(norm, min=clip_norm))
        optimizer.step()
        return torch.stack([value.detach(), norm]).tolist()

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
              threads: int = 2, warmup: int = 2, loss: TwinLoss | None = None, learning_rate: float = LEARNING_RATE,
              clip_norm: float = 0.0) -> dict:
    """Times the twin's training step like the project's: warm-up excluded, median of repeats.

    Args:
      config: the architecture (see ``build_model``); batch_size: images per step.
      steps: timed steps per repeat; repeats: timed repeats (the median is reported); warmup: untimed steps first
        (they include torch.compile's compilation).
      compile: torch.compile the forward and loss; channels_last: the model and the batch in channels-last format.
      images, masks: NHWC float32 batch [B, 101, 101, C] / [B, 101, 101, 1] (the layout salt_tf feeds); None: a
        seeded random batch (images uniform, masks of random rectangles).
      threads: torch intra-op threads (inter-op: 1).
      loss, learning_rate, clip_norm: the step's (``make_step``; default: BCE + Dice, 1e-3, no clipping).
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
    step = make_step(model, compile=compile, loss=loss, learning_rate=learning_rate, clip_norm=clip_norm)
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


def twin_recipe(recipe: dict) -> dict:
    """The twin's side of a flagfile, from ``config_child``'s dict.

    Returns:
      {"config": TwinConfig, "loss": TwinLoss, "learning_rate", "clip_norm"} (``time_twin``'s keyword arguments).
    Raises:
      ValueError: one line naming what the twin does not mirror (mixed precision, SGD, weight decay, focal loss,
        dropout, padded input).
    """
    optimizer = recipe["optimizer"]
    if recipe["precision"] != "float32":
        raise ValueError(f"the torch twin is float32 only, got --precision={recipe['precision']}")
    if optimizer["optimizer"] != "adam" or optimizer["weight_decay"]:
        raise ValueError(f"the torch twin mirrors Adam without weight decay only, got --optimizer="
                         f"{optimizer['optimizer']} --weight_decay={optimizer['weight_decay']}")
    loss = recipe["loss"]
    return {"config": twin_config(recipe["model"]),
            "loss": TwinLoss(loss["terms"], loss["deep_supervision"], loss["side_weight"], loss["image_weight"]),
            "learning_rate": optimizer["learning_rate"], "clip_norm": recipe["clip_norm"]}


def twin_child(args) -> dict:
    system = args.child
    if args.config_file:
        with open(args.config_file) as f:
            step_args = twin_recipe(json.load(f))
    else:
        step_args = {"config": TwinConfig(base_width=args.base_width, depth=args.depth,
                                          blocks_per_level=args.blocks_per_level)}
    images, masks = _load_batch(args)
    result = time_twin(batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                       compile=system.startswith("compile"), channels_last=system.endswith("_cl"), images=images,
                       masks=masks, threads=args.threads, warmup=args.warmup, **step_args)
    result["parameters"] = parameter_count(build_model(step_args["config"]))["total"]
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
                   if k in ("data_dir", "flagfile", "config_file", *SHAPE_FLAGS, "steps", "repeats", "warmup",
                            "threads", "matmul_size", "batch_file") and v is not None]
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


def _fail(message: str) -> None:
    """A user's mistake: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def resolve_flagfile(args, workdir: str) -> dict:
    """Reads --flagfile through the train command's flags (``config_child``, a TensorFlow child), checks that the
    twin mirrors it, writes it to workdir/config.json for the twin's children (--config_file) and sets the tool's
    shape flags to its values. Exits with one `error:` line (status 2) before any timing when the file is missing,
    does not parse, or asks for what the twin does not mirror.

    Returns:
      config_child's dict.
    """
    if not os.path.isfile(args.flagfile):
        _fail(f"--flagfile={args.flagfile}: no such file; give a train flagfile such as flags/recipe.cfg")
    args.flagfile = os.path.abspath(args.flagfile)
    recipe, _ = _run_child(args, "config")
    if "error" in recipe:
        _fail(f"--flagfile={args.flagfile}: {recipe['error']}")
    try:
        twin_recipe(recipe)
    except ValueError as e:
        _fail(f"--flagfile={args.flagfile}: {e}")
    args.config_file = os.path.join(workdir, "config.json")
    with open(args.config_file, "w") as f:
        json.dump(recipe, f)
    for name in ("base_width", "depth", "blocks_per_level"):
        setattr(args, name, recipe["model"][name])
    args.batch_size = recipe["batch_size"]
    return recipe


def main(argv=None) -> dict:
    """Runs the command (see the module docstring); returns the summary that --json writes."""
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.child:
        if args.child == "isa_torch":
            result = isa_torch_child()
        elif args.child in TF_CHILDREN:  # normally run before PyTorch is imported (see above)
            result = TF_CHILDREN[args.child](args)
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
    recipe = resolve_flagfile(args, workdir) if args.flagfile else None
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
    if recipe is None:
        model = f"base_width={args.base_width} depth={args.depth} blocks={args.blocks_per_level}, float32, BCE + Dice, Adam"
    else:
        m = recipe["model"]
        model = (f"--flagfile={args.flagfile}: base_width={m['base_width']} depth={m['depth']} blocks="
                 f"{m['blocks_per_level']} se_type={m['se_type'] if m['se'] else 'none'} hypercolumn={m['hypercolumn']}"
                 f" deep_supervision={m['deep_supervision']}, float32, loss {recipe['loss_spec']}, Adam "
                 f"lr {recipe['optimizer']['learning_rate']:g}")
    print(f"model: {model}, batch {args.batch_size}; {args.warmup} warm-up steps, {args.steps} steps x "
          f"{args.repeats} repeats (median); PyTorch threads: {args.threads} intra-op, 1 inter-op")
    width = max(len(row["system"]) for row in table)
    print(f"{'system':<{width}}  {'img/s':>8}  {'ratio':>6}")
    for row in table:
        if row["images_per_second"] is None:
            print(f"{row['system']:<{width}}  error: {row['error']}")
            continue
        ratio = f"{row['ratio_to_project_step']:6.2f}" if row["ratio_to_project_step"] else "     -"
        print(f"{row['system']:<{width}}  {row['images_per_second']:8.2f}  {ratio}")
    summary = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "batch_file", "config_file")},
               "cpu": cpu, "matmul_gflops_per_second": ceilings, "table": table, "results": results}
    if recipe is not None:
        summary["flagfile_configs"] = recipe
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
