"""Where the train step's time goes: op types by total time, from TensorFlow's profiler.

    python tools/profile_step.py --data_dir=../shared/data/tgs_salt
    python tools/profile_step.py --precision=mixed_bfloat16 --top=15

Profiles --steps calls of the project's step (`step.TrainStep.train_step`, BCE + Dice, Adam) after a warm-up
and prints op types (``_Mkl*`` are oneDNN kernels) by their summed duration over all threads, with shares of
the total op time. For a timeline, use --profile_steps of the train command and TensorBoard's profile tab.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

from absl import app, flags

import bench  # the sibling tool: shared flags and data loading

FLAGS = flags.FLAGS


def define_flags() -> None:
    bench.define_common_flags()
    flags.adopt_module_key_flags(bench)  # so --help lists the shared flags
    flags.DEFINE_integer("top", 25, "Op types listed.", lower_bound=1)
    FLAGS.set_default("steps", 4)


def main(argv) -> dict:
    del argv  # flags only
    args = FLAGS
    from salt_tf import determinism

    determinism.configure(0, True)
    import keras
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from salt_tf import configs, losses, model as model_lib, step as step_lib

    images, masks = bench.load_arrays(args.data_dir, synthetic_images=2 * args.batch_size)
    b = args.batch_size
    step = step_lib.TrainStep(model_lib.build_model(configs.model_config(), precision=args.precision),
                              keras.optimizers.Adam(1e-3), losses.CombinedLoss("bce:1,dice:1"), batch_size=b)
    x, y = tf.constant(images[:b]), tf.constant(masks[:b])
    for _ in range(2):  # warm-up: tracing and oneDNN primitive caches
        step.train_step(x, y)[0]["loss"].numpy()
    log_dir = tempfile.mkdtemp()  # the profiler's trace, read back below
    tf.profiler.experimental.start(log_dir)
    for _ in range(args.steps):
        step.train_step(x, y)[0]["loss"].numpy()
    tf.profiler.experimental.stop()

    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    seconds, counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name:  # kernel events are "<op name>:<op type>"; the rest are host traces
                    continue
                op_type = name.rsplit(":", 1)[1]
                seconds[op_type] += event.duration_ps / 1e12
                counts[op_type] += 1
    # The function call ("Run") spans the whole step; its executor's "Process" events and the function's own
    # event enclose the kernels, so they are the denominator, not rows.
    step_seconds = seconds.pop("Run", 0.0)
    for wrapper in [k for k in seconds if k == "Process" or k.startswith("__inference")]:
        seconds.pop(wrapper)
    kernels = sum(seconds.values())
    print(f"{args.steps} steps, batch {b}, {args.precision}: {step_seconds:.3f} s in the step function, "
          f"{kernels:.3f} s in kernels (summed over threads; shares are of the step time)")
    for op_type, value in seconds.most_common(args.top):
        print(f"{op_type:<40} {value:8.3f} s {100 * value / step_seconds:5.1f}%  x{counts[op_type]}")
    return {"step_seconds": step_seconds, "seconds": dict(seconds), "counts": dict(counts)}


def _command(argv) -> None:
    main(argv)  # app.run exits with main's return value: the results dict is not an exit status


if __name__ == "__main__":
    define_flags()
    app.run(_command)
