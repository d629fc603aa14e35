"""Prints a per-block summary of the salt U-Net and benchmarks a training step on this machine.

    python tools/model_summary.py --base_width=16 --depth=4 --blocks_per_level=2 \
        [--se|--nose] [--se_ratio=4] [--use_depth] [--hypercolumn] [--deep_supervision] ... \
        [--bench_steps=3 --bench_repeats=5 --batch_size=32 | --nobench] [--init_scale]

The model flags are the train command's own (salt_tf.flags.define_model_flags), built into a ModelConfig by
salt_tf.configs.model_config, so a flagfile's model lines describe the same model here.

Output: a table of the top-level blocks (encoder stem and levels, bottleneck, decoder
levels, head) with their parameter counts and output shapes, the total parameter count,
the analytical forward GFLOPs per 101x101 image, and -- unless --nobench -- the median
forward+backward throughput (images/s) of a tf.function GradientTape step with a sigmoid
BCE loss and a plain SGD update. Warm-up steps (tracing) are excluded from the timing.
With --init_scale, also how the freshly initialised model treats a batch (the benchmark's random-normal images
and random masks, training mode): each block's output standard deviation and the sigmoid BCE loss's gradient
norm -- how the scSE and cSE models differ before any training (docs/results.md).
"""

from __future__ import annotations

import os
import statistics
import time

from salt_tf import tfstart

tfstart.import_tensorflow()  # first: the commands' quiet start (no CUDA notices on a machine without a GPU)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from salt_tf import IMAGE_SIZE, configs  # noqa: E402
from salt_tf import flags as salt_flags  # noqa: E402
from salt_tf.model import ModelConfig, build_model, count_params, forward_flops_per_image  # noqa: E402

FLAGS = flags.FLAGS
salt_flags.define_model_flags()
flags.adopt_module_key_flags(salt_flags)  # so --help lists the model flags
flags.DEFINE_bool("bench", True, "Benchmark a forward+backward training step.")
flags.DEFINE_integer("batch_size", 32, "Benchmark batch size.")
flags.DEFINE_integer("bench_warmup", 2, "Untimed warm-up steps (includes tracing).")
flags.DEFINE_integer("bench_steps", 3, "Timed steps per repeat.")
flags.DEFINE_integer("bench_repeats", 5, "Timed repeats; the median is reported.")
flags.DEFINE_integer("seed", 0, "Seed for weights and benchmark data.")
flags.DEFINE_bool("init_scale", False, "Print each block's output std and the BCE gradient norm at initialisation.")


def _fmt_shape(shape) -> str:
    return "(None, " + ", ".join(str(int(d)) for d in shape[1:]) + ")"


def print_summary(config: ModelConfig, model) -> None:
    dummy = tf.zeros([1, IMAGE_SIZE, IMAGE_SIZE, config.input_channels], tf.float32)
    rows = [(name, count_params(layer), _fmt_shape(out.shape)) for name, layer, out in model.trace(dummy)]
    print(f"{config}")
    print(f"{'block':<18}{'params':>12}  output shape")
    print("-" * 52)
    for name, params, shape in rows:
        note = "  (skip, before pooling)" if name.startswith("encoder/level") else ""
        print(f"{name:<18}{params:>12,}  {shape}{note}")
    print("-" * 52)
    total = count_params(model)
    assert total == sum(p for _, p, _ in rows), "block table does not cover every parameter"
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    print(f"{'total':<18}{total:>12,}  ({trainable:,} trainable)")
    print(f"forward GFLOPs per {IMAGE_SIZE}x{IMAGE_SIZE} image: "
          f"{forward_flops_per_image(config) / 1e9:.4f} (2 x MACs of conv/transposed conv/dense)")


def benchmark_batch(config: ModelConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """--batch_size random-normal images and random {0, 1} masks drawn from --seed."""
    rng = tf.random.Generator.from_seed(FLAGS.seed)
    images = rng.normal([FLAGS.batch_size, IMAGE_SIZE, IMAGE_SIZE, config.input_channels])
    masks = tf.cast(rng.uniform([FLAGS.batch_size, IMAGE_SIZE, IMAGE_SIZE, 1]) > 0.5, tf.float32)
    return images, masks


def bce(masks, logits):
    """The sigmoid BCE both the benchmark step and --init_scale differentiate."""
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=masks, logits=logits))


def print_init_scale(config: ModelConfig, model) -> None:
    """Each block's output std in training mode, and the BCE gradient norm, of the model as initialised."""
    images, masks = benchmark_batch(config)
    with tf.GradientTape() as tape:
        record = model.trace(images, training=True)  # its last entry is the head's: the mask logits
        loss = bce(masks, record[-1][2])
    gradients = tape.gradient(loss, model.trainable_variables)
    print(f"at initialisation, training mode, batch of {FLAGS.batch_size} random-normal images:")
    for name, _, out in record:
        print(f"  {name:<18} output std {float(tf.math.reduce_std(tf.cast(out, tf.float32))):.3f}")
    print(f"  BCE {float(loss):.4f}, gradient norm {float(tf.linalg.global_norm(gradients)):.4f}")


def benchmark(config: ModelConfig, model) -> None:
    batch = FLAGS.batch_size
    images, masks = benchmark_batch(config)
    variables = model.trainable_variables
    learning_rate = 1e-3

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = bce(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        for v, g in zip(variables, grads):
            v.assign_sub(learning_rate * g)
        return loss

    for _ in range(FLAGS.bench_warmup):
        train_step(images, masks).numpy()
    rates = []
    for _ in range(FLAGS.bench_repeats):
        start = time.perf_counter()
        for _ in range(FLAGS.bench_steps):
            loss = train_step(images, masks)
        loss.numpy()  # Wait for the last step to finish.
        rates.append(FLAGS.bench_steps * batch / (time.perf_counter() - start))
    median = statistics.median(rates)
    print(f"forward+backward (SGD step) at batch {batch}: {median:.1f} images/s median "
          f"({batch / median:.2f} s/step; min {min(rates):.1f}, max {max(rates):.1f} over "
          f"{FLAGS.bench_repeats} repeats x {FLAGS.bench_steps} steps, {FLAGS.bench_warmup} warm-up "
          f"steps excluded; {os.cpu_count()} CPUs visible)")


def main(argv):
    del argv
    config = configs.model_config()
    keras.utils.set_random_seed(FLAGS.seed)
    model = build_model(config, precision=FLAGS.precision)
    print_summary(config, model)
    if FLAGS.init_scale:
        print_init_scale(config, model)
    if FLAGS.bench:
        benchmark(config, model)


if __name__ == "__main__":
    app.run(main)
