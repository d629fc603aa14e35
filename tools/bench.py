"""Training-speed benchmark: one command, one table (and JSON).

    python tools/bench.py                                   # default model, synthetic batches
    python tools/bench.py --data_dir=../shared/data/tgs_salt --json=bench.json
    python tools/bench.py --base_width=8 --se_type=scse     # any model flag of the train command

Measures, each with warm-up excluded and the median of --repeats:
  * custom train step images/s (the project's `step.TrainStep`), --deterministic on and off
  * the same model, data and loss through Keras `model.fit` (what a user would otherwise run), and the ratio,
    per step (8-step fit calls) and over one whole epoch of the augmented pipeline (the epoch loop vs fit)
  * summaries every 100 steps vs off (from the measured cost of a summary step)
  * achieved GFLOP/s of the train step (3 x forward FLOPs per image) vs a measured float32 matmul ceiling
  * input pipeline images/s with augmentation, no model
  * full validation: predict 400 images + competition metric + 49-threshold sweep, seconds (and the
    forward passes alone)
  * predict images/s with flip TTA (identity + hflip in one graph, as `salt_tf.predict` runs it: salt_tf.tta)
  * peak resident memory of each measuring process
Thread-pool settings are fixed when TensorFlow starts, so the determinism on/off pair runs in two child
processes of this command; everything else for a setting runs in that setting's child.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from salt_tf import tfstart

tfstart.import_tensorflow()  # before salt_tf.flags imports it: the commands' quiet start (no CUDA notices)

from salt_tf import flags as salt_flags  # noqa: E402
from timing import median_rate, tf_matmul_gflops  # tools/timing.py (this script's folder is on sys.path)

FLAGS = flags.FLAGS


def define_common_flags() -> None:
    """The flags every benchmark tool takes (perf_variants.py, profile_step.py too): the train command's model
    flags (salt_tf.flags.define_model_flags, built by salt_tf.configs.model_config), the data and the batch."""
    salt_flags.define_model_flags()
    flags.adopt_module_key_flags(salt_flags)  # so --help lists the model flags
    flags.DEFINE_string("data_dir", None, "Kaggle layout folder (default: a synthetic demo set).")
    flags.DEFINE_integer("batch_size", 32, "Training batch size.", lower_bound=1)
    flags.DEFINE_integer("steps", 8, "Timed steps per repeat.", lower_bound=1)
    flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.", lower_bound=1)
    flags.DEFINE_string("json", None, "Also write the results here.")
    flags.DEFINE_string("child", None, "(internal) run one measuring child process.")


def child_command(script: str, *extra: str) -> list[str]:
    """The command of a measuring child: this tool again, with the parent's command line and `extra` flags
    (a later flag overrides an earlier one)."""
    return [sys.executable, os.path.abspath(script), *sys.argv[1:], *extra]


def tool_flag_values() -> dict:
    """{name: value} of the flags this command line could set (the tool's and the model's), for its JSON."""
    return {flag.name: flag.value for flag in FLAGS.get_key_flags_for_module(sys.argv[0]) if flag.name != "child"}


def define_flags() -> None:
    define_common_flags()
    flags.DEFINE_integer("eval_batch_size", 64, "Validation and predict batch size.", lower_bound=1)
    flags.DEFINE_integer("deterministic", 1, "(internal) the child's --deterministic setting.")
    flags.DEFINE_integer("matmul_size", 4096, "Side of the float32 matmul whose rate is the GFLOP/s ceiling (as "
                         "tools/torch_twin.py's --matmul_size; a small one for smoke tests).", lower_bound=1)


def load_arrays(data_dir, synthetic_images: int = 800):
    """(images, masks) arrays of --data_dir, or of a synthetic demo set of `synthetic_images` images."""
    from salt_tf import pipeline
    from salt_tf.data import kaggle, synthetic

    if data_dir is None:
        data_dir = os.path.join(tempfile.mkdtemp(), "demo")
        synthetic.generate(data_dir, num_images=synthetic_images, seed=0)
    data = kaggle.load_labelled(data_dir)
    return pipeline.to_arrays(data, use_depth=False)


def child(args) -> dict:
    """Measures everything for one determinism setting; prints one JSON line."""
    from salt_tf import determinism

    applied = determinism.configure(0, bool(args.deterministic))
    import keras
    import tensorflow as tf

    from salt_tf import configs, losses, loop, model as model_lib, pipeline, step as step_lib, summaries

    images, masks = load_arrays(args.data_dir)
    config = configs.model_config()
    flops = model_lib.forward_flops_per_image(config)
    b = args.batch_size
    results = {"deterministic": bool(args.deterministic), "applied": applied}

    # The project's step (so what is measured is what trains), and the validation set of the loop.
    val = 400 if len(images) > 800 else len(images) // 5
    step = step_lib.TrainStep(model_lib.build_model(config, precision=args.precision),
                              keras.optimizers.Adam(1e-3), losses.CombinedLoss("bce:1,dice:1"), batch_size=b)
    validation = loop.Validation(images[:val], masks[:val], batch_size=args.eval_batch_size)
    x, y = tf.constant(images[val:val + b]), tf.constant(masks[val:val + b])
    results["custom_images_per_second"] = median_rate(lambda: step.train_step(x, y)[0]["loss"].numpy(),
                                                      b, args.steps, args.repeats)
    results["train_gflops_per_second"] = results["custom_images_per_second"] * 3 * flops / 1e9

    if args.deterministic:
        # Summary-step cost: snapshot + step + statistics + writes, against a plain step. The events go to a
        # scratch folder: writing them is part of the cost.
        events = summaries.Summaries(tempfile.mkdtemp())

        def summary_step():
            before = step.snapshot()
            outputs, gradients = step.train_step(x, y)
            events.step_statistics(dict(outputs), step.variable_statistics(gradients, before),
                                   step.model.trainable_variables, step.model.non_trainable_variables, 0)

        summary_rate = median_rate(summary_step, b, max(2, args.steps // 2), args.repeats)
        extra = 1 / summary_rate - 1 / results["custom_images_per_second"]  # seconds per image, one step
        results["summary_every_100_overhead_percent"] = 100 * extra / 100 * results["custom_images_per_second"]

        # Keras fit on the same model, loss and batches.
        fit_model = model_lib.build_model(config, precision=args.precision)
        combined = losses.CombinedLoss("bce:1,dice:1")
        fit_model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss=lambda yt, yp: tf.reduce_mean(combined(yt, yp)[0]))
        dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
        fit_model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)
        results["keras_fit_images_per_second"] = median_rate(
            lambda: fit_model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0), b * args.steps, 1,
            args.repeats)

        # Input pipeline alone.
        train_images, train_masks = tf.constant(images[val:]), tf.constant(masks[val:])

        # One whole epoch of the real, augmented pipeline both ways, as a user runs them: the project's
        # epoch loop (step + host round-trips + progress lines) and `fit` over the same tf.data batches.
        # Once each (an epoch is long); the 8-step `fit` figure above carries fit's per-call cost 8 steps.
        augmentation = pipeline.Augmentation(True, 10)
        # The loop without a run directory: no checkpoints, no summaries, the same epoch as a run's.
        trainer = loop.Trainer(step, loop.LoopConfig(epochs=1, batch_size=b, eval_batch_size=args.eval_batch_size,
                                                     augmentation=augmentation),
                               (images[val:], masks[val:]), validation)
        start = time.perf_counter()
        results["custom_epoch_images_per_second"] = trainer.train_epoch(0)["train_images_per_second"]
        results["custom_epoch_seconds"] = time.perf_counter() - start
        fit_data = pipeline.train_dataset(train_images, train_masks, batch_size=b, seed=0, epoch=0,
                                          augmentation=augmentation)
        start = time.perf_counter()
        fit_model.fit(fit_data, epochs=1, verbose=0)
        results["keras_fit_epoch_seconds"] = time.perf_counter() - start
        steps = pipeline.steps_per_epoch(len(images) - val, b)
        results["keras_fit_epoch_images_per_second"] = steps * b / results["keras_fit_epoch_seconds"]

        def one_epoch():
            for _ in pipeline.train_dataset(train_images, train_masks, batch_size=b, seed=0, epoch=1,
                                            augmentation=pipeline.Augmentation(True, 10)):
                pass

        steps = pipeline.steps_per_epoch(len(images) - val, b)
        results["pipeline_images_per_second"] = median_rate(one_epoch, steps * b, 1, args.repeats)

        # Full validation as the loop does it.
        def validate():
            validation.evaluate(step)

        validate()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            validate()
            times.append(time.perf_counter() - start)
        results["validation_images"] = val
        results["validation_seconds"] = statistics.median(times)
        # Where the validation time goes: the forward passes alone (what a larger eval batch could speed up).
        forward_times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            validation.predict(step)
            forward_times.append(time.perf_counter() - start)
        results["validation_forward_seconds"] = statistics.median(forward_times)

        # Prediction with flip TTA (identity + hflip views in one graph), as `salt_tf.predict` runs it.
        from salt_tf import tta

        tta_images = images[:val]
        tta.predict_probabilities(step.model, tta_images[:64], batch_size=args.eval_batch_size, tta=("none", "hflip"))
        results["predict_tta_images_per_second"] = median_rate(
            lambda: tta.predict_probabilities(step.model, tta_images, batch_size=args.eval_batch_size, tta=("none", "hflip")),
            len(tta_images), 1, args.repeats)
        results["epoch_seconds_estimate"] = (len(images) - val) / results["custom_images_per_second"]

        # Matmul ceiling: the best float32 GFLOP/s this machine's TensorFlow reaches.
        # In the step's compute dtype: a bfloat16 step is measured against a bfloat16 matmul.
        results["matmul_gflops_per_second"] = tf_matmul_gflops(
            tf, args.matmul_size, args.repeats, tf.bfloat16 if args.precision == "mixed_bfloat16" else tf.float32)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def main(argv) -> dict:
    del argv  # flags only
    args = FLAGS
    if args.child:
        print("BENCH " + json.dumps(child(args)))
        return {}
    runs = {}
    for deterministic in (1, 0):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        out = subprocess.run(child_command(__file__, "--child=1", f"--deterministic={deterministic}"),
                             capture_output=True, text=True, env=env, check=False)
        line = [l for l in out.stdout.splitlines() if l.startswith("BENCH ")]
        if out.returncode or not line:
            sys.exit(f"benchmark child failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        runs["on" if deterministic else "off"] = json.loads(line[0][len("BENCH "):])
    on, off = runs["on"], runs["off"]
    table = [
        ("custom step, deterministic on (img/s)", on["custom_images_per_second"]),
        ("custom step, deterministic off (img/s)", off["custom_images_per_second"]),
        ("determinism overhead (%)", 100 * (1 - on["custom_images_per_second"] / off["custom_images_per_second"])),
        ("Keras fit, same model (img/s)", on["keras_fit_images_per_second"]),
        ("custom / fit", on["custom_images_per_second"] / on["keras_fit_images_per_second"]),
        ("one epoch, custom loop (img/s)", on["custom_epoch_images_per_second"]),
        ("one epoch, Keras fit (img/s)", on["keras_fit_epoch_images_per_second"]),
        ("one epoch, custom / fit", on["custom_epoch_images_per_second"] / on["keras_fit_epoch_images_per_second"]),
        ("summaries every 100 steps, overhead (%)", on["summary_every_100_overhead_percent"]),
        ("train step GFLOP/s (3x forward)", on["train_gflops_per_second"]),
        (f"matmul ceiling GFLOP/s ({args.precision.replace('mixed_', '')})", on["matmul_gflops_per_second"]),
        ("train step / ceiling", on["train_gflops_per_second"] / on["matmul_gflops_per_second"]),
        ("input pipeline (img/s)", on["pipeline_images_per_second"]),
        ("pipeline / train step", on["pipeline_images_per_second"] / on["custom_images_per_second"]),
        (f"full validation, {on['validation_images']} images (s)", on["validation_seconds"]),
        ("  of which forward passes (s)", on["validation_forward_seconds"]),
        ("validation / epoch time", on["validation_seconds"] / on["epoch_seconds_estimate"]),
        ("predict with hflip TTA (img/s)", on["predict_tta_images_per_second"]),
        ("peak RSS, deterministic on (MB)", on["peak_rss_mb"]),
    ]
    width = max(len(name) for name, _ in table)
    print(f"model: base_width={args.base_width} depth={args.depth} blocks={args.blocks_per_level}, "
          f"{args.precision}, batch {args.batch_size} (eval {args.eval_batch_size}), {args.steps} steps x "
          f"{args.repeats} repeats (median)")
    for name, value in table:
        print(f"{name:<{width}}  {value:10.3f}")
    summary = {"args": tool_flag_values(), "on": on, "off": off,
               "table": {name: value for name, value in table}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return summary


def _command(argv) -> None:
    main(argv)  # app.run exits with main's return value: the results dict is not an exit status


if __name__ == "__main__":
    define_flags()
    app.run(_command)
