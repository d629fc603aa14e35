"""Where the train step's (or prediction's) time goes: op types by total time, from TensorFlow's profiler.

    python tools/profile_step.py --data_dir=../shared/data/tgs_salt
    python tools/profile_step.py --precision=mixed_bfloat16 --top=15
    python tools/profile_step.py --train_flagfile=flags/recipe.cfg --data_dir=../shared/data/tgs_salt --by_name=15
    python tools/profile_step.py --model_dir=models/salt-recipe --data_dir=../shared/data/tgs_salt --by_name=15

Profiles --steps calls after 2 warm-up calls and prints op types (``_Mkl*`` are oneDNN kernels) by their summed
duration over all threads, with shares of the time in the called function ("Run") and the number of kernel
events; --by_name=N also lists the N op names (e.g. ``unet_1/head_1/bn_1/FusedBatchNormV3``) with the most time.
What is called, by mode:

  default            the project's step (``step.TrainStep.train_step``, BCE + Dice, Adam 1e-3) of the model flags,
                     deterministic, seed 0
  --train_flagfile   the train step of a train flagfile (e.g. flags/recipe.cfg) as the train command builds it:
                     tools/torch_twin.py's ``flagfile_step`` (configs.model_config, schedules.build_optimizer,
                     losses.build_losses stage 0, the flagfile's batch size, clip norm, --seed and
                     --deterministic); --base_width, --depth, --blocks_per_level and --batch_size, when given,
                     override the flagfile's. It runs in a child process of this command (the train flags and
                     this tool's are both absl flags of one global FLAGS); importing torch_twin loads PyTorch
                     there, no PyTorch op runs.
  --model_dir        prediction: the first model of an export folder, run directory or release
                     (``exports.load_models``), ``tta.tta_function`` with the --tta views on --batch_size images
                     (default 64, as ``predict submit``), its mask and head copied to the host: one batch of
                     ``predict submit``

The batch is the first images of --data_dir (default: a synthetic demo set). --json writes the figures and the
mode. For a timeline, use --profile_steps of the train command and TensorBoard's profile tab.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import subprocess
import sys
import tempfile

from absl import flags

import bench  # the sibling tool: shared flags and data loading

FLAGS = flags.FLAGS

TRAIN_CHILD = "--child=train"  # argv[1] of the --train_flagfile child; argv[2] its spec (JSON file)
OVERRIDES = ("base_width", "depth", "blocks_per_level", "batch_size")  # torch_twin.SHAPE_FLAGS
WRAPPERS = ("Run", "Process")  # + "__inference*": the function call and its executor, not kernels
HOST_TRACES = ("ThreadpoolListener::",)  # the inter-op pool's bookkeeping (Record, StartRegion, ...), not ops
WARMUP = 2
PREDICT_BATCH = 64  # predict's --batch_size default


def define_flags() -> None:
    bench.define_common_flags()
    flags.adopt_module_key_flags(bench)  # so --help lists the shared flags
    flags.DEFINE_integer("top", 25, "Op types listed.", lower_bound=1)
    flags.DEFINE_integer("by_name", 0, "Also list the N op names with the most time (0: off).", lower_bound=0)
    flags.DEFINE_string("train_flagfile", None, "Profile the train step of this train flagfile (e.g. "
                        "flags/recipe.cfg) as the train command builds it, instead of the default step.")
    flags.DEFINE_string("model_dir", None, "Profile prediction instead: the first model of this export folder, run "
                        "directory or release, its TTA function on --batch_size images (default 64).")
    flags.DEFINE_string("tta", "hflip", "With --model_dir: the test-time augmentation views, as predict's --tta.")
    FLAGS.set_default("steps", 4)
    # Validators run in this order: the conflict first, whatever the paths are.
    flags.register_multi_flags_validator(
        ["train_flagfile", "model_dir"], lambda v: v["train_flagfile"] is None or v["model_dir"] is None,
        "profile one thing: the train step of --train_flagfile or prediction of --model_dir, not both")
    flags.register_validator("train_flagfile", lambda path: path is None or os.path.isfile(path),
                             "no such file; give a train flagfile such as flags/recipe.cfg")
    flags.register_validator("model_dir", _model_dir_ok)
    flags.register_validator("tta", _tta_ok)


def _model_dir_ok(path) -> bool:
    if path is None:
        return True
    from salt_tf import exports

    try:
        exports.find_exports(path)  # model.json files only: no TensorFlow work
    except exports.ExportError as e:
        raise flags.ValidationError(str(e)) from None
    return True


def _tta_ok(text) -> bool:
    from salt_tf import tta

    try:
        tta.parse_tta(text)
    except flags.Error as e:
        raise flags.ValidationError(str(e)) from None
    return True


def _parse(argv):
    """absl's parse with a user's mistake as ONE line (app.run's own adds a help line): `error: ...`, exit 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def load_inputs(data_dir, images: int, use_depth: bool = False):
    """(images, masks) of --data_dir (a synthetic demo set of `images` images if None), model inputs with the depth
    channel for a `use_depth` model."""
    if not use_depth:
        return bench.load_arrays(data_dir, synthetic_images=images)
    from salt_tf import pipeline
    from salt_tf.data import kaggle, synthetic

    if data_dir is None:
        data_dir = os.path.join(tempfile.mkdtemp(), "demo")
        synthetic.generate(data_dir, num_images=images, seed=0)
    return pipeline.to_arrays(kaggle.load_labelled(data_dir), use_depth=True)


def profile(call, steps: int) -> dict:
    """Runs call() WARMUP times (tracing, oneDNN primitive caches), then `steps` times under TensorFlow's profiler.

    Returns:
        {"step_seconds": time of the "Run" events (the function calls), "seconds"/"counts": summed kernel time and
        kernel events by op type, "name_seconds"/"name_counts": the same by op name ("<op name>:<op type>")}.
    """
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    for _ in range(WARMUP):
        call()
    log_dir = tempfile.mkdtemp()  # the profiler's trace, read back below
    tf.profiler.experimental.start(log_dir)
    for _ in range(steps):
        call()
    tf.profiler.experimental.stop()

    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    seconds, counts = collections.Counter(), collections.Counter()
    name_seconds, name_counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or name.startswith(HOST_TRACES):  # kernel events are "<op name>:<op type>"
                    continue
                op_type = name.rsplit(":", 1)[1].strip()  # " __inference_..." of "EagerLocalExecute: ..."
                seconds[op_type] += event.duration_ps / 1e12
                counts[op_type] += 1
                if op_type not in WRAPPERS and not op_type.startswith("__inference"):
                    name_seconds[name] += event.duration_ps / 1e12
                    name_counts[name] += 1
    # The function call ("KernelAndDeviceFunc::Run") spans the whole step; its executor's "Process" events and the
    # function's own event ("EagerLocalExecute: __inference_...") enclose the kernels, so they are the denominator,
    # not rows.
    step_seconds = seconds.pop("Run", 0.0)
    counts.pop("Run", None)
    for wrapper in [k for k in seconds if k in WRAPPERS or k.startswith("__inference")]:
        seconds.pop(wrapper)
        counts.pop(wrapper)
    return {"step_seconds": step_seconds, "seconds": dict(seconds), "counts": dict(counts),
            "name_seconds": dict(name_seconds), "name_counts": dict(name_counts)}


def report(result: dict, title: str, top: int, by_name: int) -> None:
    """Prints the profile: a title line, op types by time, then (by_name > 0) op names by time."""
    step_seconds = result["step_seconds"]
    seconds = collections.Counter(result["seconds"])
    print(f"{title}: {step_seconds:.3f} s in the called function, {sum(seconds.values()):.3f} s in kernels "
          f"(summed over threads; shares are of the function's time)")
    share = lambda value: 100 * value / step_seconds if step_seconds else float("nan")  # noqa: E731
    for op_type, value in seconds.most_common(top):
        print(f"{op_type:<40} {value:8.3f} s {share(value):5.1f}%  x{result['counts'][op_type]}")
    if by_name:
        print(f"op names by time (top {by_name}):")
        for name, value in collections.Counter(result["name_seconds"]).most_common(by_name):
            print(f"  {name}  {value:.3f} s {share(value):5.1f}%  x{result['name_counts'][name]}")


def default_profile(args) -> tuple[dict, str]:
    """The default step: the model flags' ModelConfig, BCE + Dice, Adam 1e-3, deterministic with seed 0."""
    from salt_tf import determinism

    determinism.configure(0, True)
    import keras
    import tensorflow as tf

    from salt_tf import configs, losses, model as model_lib, step as step_lib

    images, masks = bench.load_arrays(args.data_dir, synthetic_images=2 * args.batch_size)
    b = args.batch_size
    step = step_lib.TrainStep(model_lib.build_model(configs.model_config(), precision=args.precision),
                              keras.optimizers.Adam(1e-3), losses.CombinedLoss("bce:1,dice:1"), batch_size=b)
    x, y = tf.constant(images[:b]), tf.constant(masks[:b])
    result = profile(lambda: step.train_step(x, y)[0]["loss"].numpy(), args.steps)
    result["batch_size"] = b
    return result, f"{args.steps} steps, batch {b}, {args.precision}"


def flagfile_profile(args) -> tuple[dict, str]:
    """--train_flagfile: the profile of the flagfile's train step, measured by a child process of this command
    (train_child) that parses the train flags into absl's FLAGS, where this process has its own."""
    work = tempfile.mkdtemp()
    spec = {"flagfile": os.path.abspath(args.train_flagfile), "data_dir": args.data_dir, "steps": args.steps,
            "overrides": {name: FLAGS[name].value for name in OVERRIDES if FLAGS[name].present},
            "output": os.path.join(work, "profile.json")}
    spec_file = os.path.join(work, "spec.json")
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    status = subprocess.run([sys.executable, os.path.abspath(__file__), TRAIN_CHILD, spec_file]).returncode
    if status:  # the child printed its error
        sys.exit(status)
    with open(spec["output"]) as f:
        result = json.load(f)
    m = result["model"]
    title = (f"{args.steps} steps of --train_flagfile={args.train_flagfile} (base_width={m['base_width']} depth="
             f"{m['depth']} blocks={m['blocks_per_level']} se_type={m['se_type'] if m['se'] else 'none'} "
             f"hypercolumn={m['hypercolumn']} deep_supervision={m['deep_supervision']}, {result['precision']}, "
             f"loss {result['loss']}), batch {result['batch_size']}")
    return result, title


def train_child(spec_file: str) -> int:
    """The --train_flagfile measurement (a child process of the command): the step of torch_twin.flagfile_step,
    profiled on the first images of the data; writes profile()'s dict and the step's description to the spec's
    output file. A flagfile the train flags reject is one `error:` line, exit status 2."""
    with open(spec_file) as f:
        spec = json.load(f)
    try:
        import torch_twin  # tools/torch_twin.py (this script's folder is on sys.path)
    except ImportError as e:
        print(f"error: --train_flagfile builds its step with tools/torch_twin.py, which needs PyTorch ({e}); "
              "pip install -e '.[torch]'", file=sys.stderr)
        return 2
    args = argparse.Namespace(flagfile=spec["flagfile"], **{name: spec["overrides"].get(name) for name in OVERRIDES})
    try:
        step, config, applied = torch_twin.flagfile_step(args)
    except flags.Error as e:
        print(f"error: --train_flagfile={spec['flagfile']}: {e}", file=sys.stderr)
        return 2
    import tensorflow as tf

    b = step.batch_size
    images, masks = load_inputs(spec["data_dir"], 2 * b, config.input_channels == 2)
    x, y = tf.constant(images[:b]), tf.constant(masks[:b])
    result = profile(lambda: step.train_step(x, y)[0]["loss"].numpy(), spec["steps"])
    result.update(batch_size=b, model=dataclasses.asdict(config), loss=step.loss_stages[0].spec,
                  precision=flags.FLAGS.precision, clip_norm=step.clip_norm, applied=applied)
    with open(spec["output"], "w") as f:
        json.dump(result, f)
    return 0


def predict_profile(args) -> tuple[dict, str]:
    """--model_dir: one batch of `predict submit` (the TTA function of the first model, outputs to the host)."""
    import numpy as np

    from salt_tf import exports, tta

    entry = exports.load_models(args.model_dir)[0]
    views = tta.parse_tta(args.tta)
    b = args.batch_size if FLAGS["batch_size"].present else PREDICT_BATCH
    channels = 2 if entry.use_depth else 1
    images = np.asarray(load_inputs(args.data_dir, 2 * b, entry.use_depth)[0][:b], np.float32)
    run = tta.tta_function(entry.model, views, channels)

    def call():  # tta._predict's loop body: the batch, its mean probability and head to the host
        mean, _, has_salt = run(images)
        mean.numpy(), has_salt.numpy()

    result = profile(call, args.steps)
    result.update(batch_size=len(images), views=list(views), model_name=entry.name, model=entry.config["model"])
    return result, (f"{args.steps} calls of the TTA function of {args.model_dir} ({entry.name}), tta "
                    f"{'+'.join(views)}, batch {len(images)} ({len(images) * len(views)} images a model call)")


def main(argv) -> dict:
    del argv  # flags only
    args = FLAGS
    if args.train_flagfile:
        mode, (result, title) = "train_flagfile", flagfile_profile(args)
    elif args.model_dir:
        mode, (result, title) = "model_dir", predict_profile(args)
    else:
        mode, (result, title) = "default", default_profile(args)
    report(result, title, args.top, args.by_name)
    result = dict(result, mode=mode, steps=args.steps, flags=bench.tool_flag_values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _command(argv) -> None:
    main(argv)  # app.run exits with main's return value: the results dict is not an exit status


if __name__ == "__main__":
    if sys.argv[1:2] == [TRAIN_CHILD]:  # before this tool's flags are defined: the child parses the train flags
        sys.exit(train_child(sys.argv[2]))
    from absl import app

    define_flags()
    app.run(_command, flags_parser=_parse)
