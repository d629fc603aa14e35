"""Measures candidate speed-ups of the training step, each in its own child process.

    python tools/perf_variants.py --data_dir=../shared/data/tgs_salt
    python tools/perf_variants.py --variants=baseline,keras_bn --repeats=5

Every variant times the project's real step (`step.TrainStep.train_step`, BCE + Dice, Adam, batch 32) on the
same batch, warm-up excluded, median of --repeats, and the table gives its images/s relative to `baseline`
measured in the same command. Variants that are not the shipped default are built here by patching (an
experiment, not a second code path in salt_tf/). The outcomes are recorded in docs/performance.md.

  baseline        the shipped step (deterministic mode on)
  no_se           ablation: the model without squeeze-and-excitation gates
  no_bn           ablation: batch normalization replaced by the identity (what BN costs at most)
  keras_bn        Keras 3's BatchNormalization (moments + elementwise ops) instead of the fused kernel
  fit             the same model, loss and batch through Keras `model.fit` (8-step epochs)
  fit_keras_bn    `fit` with Keras 3's BatchNormalization
  steps_per_loop  4 steps inside one tf.function (tf.range loop), one host round-trip per 4 steps
  bf16            Keras mixed_bfloat16 policy (bfloat16 convolutions, float32 variables and loss)
  onednn_off      TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's own Eigen kernels)
  xla             the step with jit_compile=True (deterministic mode off: XLA conflicts with it)
  fused_adam      Adam as one ResourceApplyAdam kernel per variable instead of Keras 3's ~8 elementwise ops
                  (other bits: the kernel rounds 1 - beta_1 in float32; see patch_fused_adam)
  nchw_conv       micro-benchmark: one 3x3 conv (16->16 channels, 101x101) forward+backward, NCHW vs NHWC
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

import bench  # the sibling tool: shared flags and data loading
import timing  # tools/timing.py

FLAGS = flags.FLAGS

VARIANTS = ("baseline", "no_se", "no_bn", "keras_bn", "fit", "fit_keras_bn", "steps_per_loop", "bf16",
            "onednn_off", "xla", "fused_adam", "nchw_conv")
STEPS_PER_LOOP = 4


def define_flags() -> None:
    bench.define_common_flags()
    flags.adopt_module_key_flags(bench)  # so --help lists the shared flags
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to measure, from {', '.join(VARIANTS)}.")


def timed(fn, calls: int, repeats: int) -> float:
    """Median seconds per call, after one warm-up call."""
    return statistics.median(1.0 / rate for rate in timing.rates(fn, 1, calls, repeats))


def nchw_conv(args) -> dict:
    import tensorflow as tf

    results = {}
    for layout in ("NHWC", "NCHW"):
        shape = [args.batch_size, 101, 101, 16] if layout == "NHWC" else [args.batch_size, 16, 101, 101]
        x = tf.random.normal(shape)
        w = tf.Variable(tf.random.normal([3, 3, 16, 16]))

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tf.nn.conv2d(x, w, 1, "SAME", data_format=layout)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x, w])

        try:
            seconds = timed(lambda: step()[1].numpy(), args.steps, args.repeats)
            results[layout] = args.batch_size / seconds
        except Exception as error:  # TF's CPU conv has no NCHW kernel without oneDNN
            results[layout] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return {"images_per_second": results["NHWC"], "nchw_images_per_second": results["NCHW"]}


def patch_fused_adam() -> None:
    """Makes every Keras Adam apply its update as TensorFlow's fused `ResourceApplyAdam` kernel, one per variable.

    Keras 3's Adam.update_step spends ~8 elementwise ops per variable (~2,200 for the recipe's 275 variables). The
    kernel does the same arithmetic in one pass but rounds `1 - beta_1` and `1 - beta_2` in float32 where Keras
    computes them in Python's float64 and rounds once (0.100000024 against 0.1 for beta_1 = 0.9), so the weights
    differ from the first step: an experiment, not a free change (docs/performance.md, issue 39).
    """
    import tensorflow as tf
    from keras.src.optimizers import adam

    def update_step(self, gradient, variable, learning_rate):
        step = tf.cast(self.iterations + 1, variable.dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].handle, v=self._velocities[index].handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, variable.dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, variable.dtype), step),
            lr=tf.cast(learning_rate, variable.dtype), beta1=tf.constant(self.beta_1, variable.dtype),
            beta2=tf.constant(self.beta_2, variable.dtype), epsilon=tf.constant(self.epsilon, variable.dtype),
            grad=tf.cast(gradient, variable.dtype))

    adam.Adam.update_step = update_step


def child(args) -> dict:
    variant = args.child
    from salt_tf import determinism

    determinism.configure(0, variant != "xla")
    if variant == "nchw_conv":
        return nchw_conv(args)
    import keras
    import tensorflow as tf

    from salt_tf import configs, losses, model as model_lib, step as step_lib

    if variant == "fused_adam":
        patch_fused_adam()
    if variant == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    if variant == "no_bn":
        model_lib._bn = lambda name: keras.layers.Identity(name=name)
    if variant in ("keras_bn", "fit_keras_bn"):
        model_lib._bn = lambda name: keras.layers.BatchNormalization(
            momentum=model_lib.BN_MOMENTUM, epsilon=model_lib.BN_EPSILON, name=name)

    images, masks = bench.load_arrays(args.data_dir, synthetic_images=200)
    config = configs.model_config()
    if variant == "no_se":
        config = dataclasses.replace(config, se=False)
    b = args.batch_size
    combined = losses.CombinedLoss("bce:1,dice:1")  # the model's outputs are float32 under every precision
    step = step_lib.TrainStep(model_lib.build_model(config), keras.optimizers.Adam(1e-3), combined, batch_size=b)
    x, y = tf.constant(images[:b]), tf.constant(masks[:b])
    if variant in ("fit", "fit_keras_bn"):
        fit_model = step.model
        fit_model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss=lambda labels, logits: tf.reduce_mean(combined(labels, logits)[0]))
        dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
        fit_model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)  # warm-up (tracing)
        seconds = timed(lambda: fit_model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0), 1,
                        args.repeats) / args.steps
    elif variant == "xla":
        train = step.step_function()
        xla_step = tf.function(lambda: train(x, y)[0]["loss"], jit_compile=True)
        seconds = timed(lambda: xla_step().numpy(), args.steps, args.repeats)
    elif variant == "steps_per_loop":
        xs = tf.reshape(tf.constant(images[:b * STEPS_PER_LOOP]), [STEPS_PER_LOOP, b, 101, 101, -1])
        ys = tf.reshape(tf.constant(masks[:b * STEPS_PER_LOOP]), [STEPS_PER_LOOP, b, 101, 101, 1])

        train = step.step_function()

        @tf.function
        def steps():
            total = tf.constant(0.0)
            for i in tf.range(STEPS_PER_LOOP):
                outputs, _ = train(xs[i], ys[i])
                total += outputs["loss"]
            return total

        seconds = timed(lambda: steps().numpy(), max(1, args.steps // STEPS_PER_LOOP), args.repeats)
        seconds /= STEPS_PER_LOOP
    else:
        # Exactly what the epoch loop does per step: the step, then the outputs to the host.
        def one_step():
            outputs, _ = step.train_step(x, y)
            return bool(outputs["finite"]) and [float(v) for v in outputs.values()]

        seconds = timed(one_step, args.steps, args.repeats)
    return {"images_per_second": b / seconds}


def main(argv) -> dict:
    del argv  # flags only
    args = FLAGS
    if args.child:
        print("VARIANT " + json.dumps(child(args)))
        return {}
    variants = [v for v in args.variants if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"error: --variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    results = {}
    for variant in variants:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        if variant == "onednn_off":
            env["TF_ENABLE_ONEDNN_OPTS"] = "0"
        child_variant = "baseline" if variant == "onednn_off" else variant
        out = subprocess.run(bench.child_command(__file__, f"--child={child_variant}"),
                             capture_output=True, text=True, env=env, check=False)
        line = [l for l in out.stdout.splitlines() if l.startswith("VARIANT ")]
        if out.returncode or not line:
            results[variant] = {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        else:
            results[variant] = json.loads(line[0][len("VARIANT "):])
        print(f"{variant:<16} {json.dumps(results[variant])}", flush=True)
    base = results.get("baseline", {}).get("images_per_second")
    print(f"\nbatch {args.batch_size}, {args.steps} steps x {args.repeats} repeats (median); images/s")
    for variant, result in results.items():
        rate = result.get("images_per_second")
        if rate is None:
            print(f"{variant:<16} error: {result['error']}")
            continue
        ratio = f"{rate / base:6.3f}x baseline" if base else ""
        extra = f"   NCHW {result['nchw_images_per_second']}" if "nchw_images_per_second" in result else ""
        print(f"{variant:<16} {rate:8.2f}  {ratio}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": bench.tool_flag_values(), "results": results}, f, indent=2)
    return results


def _command(argv) -> None:
    main(argv)  # app.run exits with main's return value: the results dict is not an exit status


if __name__ == "__main__":
    define_flags()
    app.run(_command)
