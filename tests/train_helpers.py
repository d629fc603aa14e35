"""Running salt_tf.train in-process on tiny configurations, for the end-to-end tests."""

import os

from absl import flags
from absl.testing import flagsaver

from salt_tf import flags as salt_flags
from salt_tf import train

FLAGS = flags.FLAGS

TINY = dict(base_width=4, depth=2, blocks_per_level=1, se_ratio=2, batch_size=8, eval_batch_size=16,
            val_images=32, learning_rate=0.01, epochs=2, progress_every=0, translate=4)


def tiny_argv(data_dir, model_dir, **overrides):
    values = dict(TINY, dataset="kaggle", data_dir=data_dir, model_dir=model_dir)
    values.update(overrides)
    argv = ["train"]
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no{name}")
        else:
            argv.append(f"--{name}={value}")
    return argv


def run_tiny(data_dir, model_dir, **overrides):
    """Trains a tiny model in this process with FLAGS restored afterwards; returns the final summary."""
    salt_flags.define_flags()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(tiny_argv(data_dir, model_dir, **overrides))
        return train.run()


def events_files(model_dir):
    found = []
    for root, _, files in os.walk(os.path.join(model_dir, "events")):
        found += [os.path.join(root, f) for f in files if "tfevents" in f]
    return found
