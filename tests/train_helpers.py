"""Running salt_tf.train in-process on tiny configurations, for the end-to-end tests."""

import concurrent.futures
import contextlib
import os
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver

from salt_tf import flags as salt_flags
from salt_tf import train

FLAGS = flags.FLAGS

# summary_every_steps=0: no per-variable statistics on step 0 (the default of 100 makes step 0 of every run a summary
# step, whose two extra compiled functions cost ~1 s of tracing per tiny run, ~40 times in the suite). Tests of the
# summary steps set it themselves (test_summaries, test_determinism's summaries-on run, test_distribute).
TINY = dict(base_width=4, depth=2, blocks_per_level=1, se_ratio=2, batch_size=8, eval_batch_size=16,
            val_images=32, learning_rate=0.01, epochs=2, progress_every=0, translate=4, summary_every_steps=0)


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


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_process(data_dir, model_dir, environment=None, **overrides):
    """Starts a tiny training run as its own `python -m salt_tf.train` process (output on stdout); `environment`
    adds variables to its environment."""
    argv = tiny_argv(data_dir, model_dir, **overrides)[1:]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(environment or {}))
    return subprocess.Popen([sys.executable, "-m", "salt_tf.train", *argv], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ok(process):
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def checkpoint_state(model_dir):
    """{name: value} of the latest checkpoint of a run, without save_counter (it counts saves, best
    ones too: bookkeeping, not training state)."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if name not in ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")}


def assert_bit_identical(dir_a, dir_b, epochs=(1, 2)):
    """Same weights after every epoch (fingerprints) and the same final training state, byte for byte."""
    from salt_tf import records

    fa, fb = records.read_fingerprints(dir_a), records.read_fingerprints(dir_b)
    assert sorted(fa) == sorted(fb) == list(epochs)
    for epoch in fa:
        assert fa[epoch] == fb[epoch], f"weights differ after epoch {epoch}"
    a, b = checkpoint_state(dir_a), checkpoint_state(dir_b)
    assert set(a) == set(b)
    for name in a:  # optimizer slots, counters and schedule included
        value_a, value_b = a[name], b[name]
        assert (value_a if isinstance(value_a, bytes) else value_a.tobytes()) == \
            (value_b if isinstance(value_b, bytes) else value_b.tobytes()), name


def reference_weights_sha256(export_dir):
    """SHA-256 over the names and bytes of an export's weights.* files in name order, written out here as
    the independent reference for what runs record of an --init_checkpoint."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(os.listdir(export_dir)):
        if name.startswith("weights"):
            with open(os.path.join(export_dir, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def read_until(process, needle, limit=2000):
    """Reads the process's output until a line containing needle; returns the lines read."""
    lines = []
    for _ in range(limit):
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen in output:\n{''.join(lines[-30:])}")


def selected(request, *test_names):
    """Whether this session runs any of the named tests of the requesting module (after -k, -m, node ids): a
    module fixture that starts processes for some tests early starts only those of the selected ones."""
    return any(getattr(item, "module", None) is request.module and getattr(item, "originalname", item.name) in
               test_names for item in request.session.items)


@contextlib.contextmanager
def side_by_side(calls):
    """Starts every zero-argument callable of {name: call} in its own thread at once (independent processes that
    mostly wait on single-threaded start-up share the 2 cores better side by side) and yields {name: Future}; a
    test's .result() waits for its call and raises what went wrong in it. On exit, waits for all of them."""
    pool = concurrent.futures.ThreadPoolExecutor(max(len(calls), 1))
    try:
        yield {name: pool.submit(call) for name, call in calls.items()}
    finally:
        pool.shutdown(wait=True)
