"""tf.distribute: the same loop on several devices and several processes, checked against the single-device
run with the same global batch (the reference), NumPy, and a single-process evaluation.

Mirrored runs split this machine's CPU into 2 logical devices (tests/logical_cpus_train.py: it must happen
before TensorFlow initializes, so each run is a process of its own). The multi-worker run is two worker
processes on localhost with free ports picked at run time. The comparisons use SGD, whose step is
proportional to the gradient, so a wrong loss scale (per-replica instead of global batch) would show; Adam
would hide it. --sync_batch_norm makes two replicas compute exactly what one device computes with the
whole batch, up to float rounding.

Measured tolerance scale (tiny model, 2 epochs = 32 steps): per-step losses of mirrored and single-device
runs differ by at most 3e-6 (relative), final weights by at most 4e-5 (absolute); merely permuting the
images inside one batch on one device moves the first step's gradient by 1e-3 (relative norm) — float
rounding, amplified by batch norm on an untrained model.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from salt_tf import distribute, metrics, pipeline, records, rundir, train
from salt_tf import flags as salt_flags
from train_helpers import REPO_ROOT, assert_bit_identical, read_until, tiny_argv, wait_ok

FLAGS = flags.FLAGS

# val_images=33: the validation set divides neither the 2 replicas nor the evaluation batch.
REFERENCE = dict(optimizer="sgd", summary_every_steps=1, sync_batch_norm=True, val_images=33)
STEPS_PER_EPOCH = (160 - 33) // 8


def start(data_dir, model_dir, devices=None, env=None, **overrides):
    """A tiny training process; with `devices`, on that many logical CPU devices."""
    argv = tiny_argv(data_dir, model_dir, **overrides)[1:]
    command = ([sys.executable, os.path.join(REPO_ROOT, "tests", "logical_cpus_train.py"), str(devices)]
               if devices else [sys.executable, "-m", "salt_tf.train"])
    return subprocess.Popen(command + argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})))


def step_losses(model_dir):
    """{global step: loss} from the per-step summaries."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.join(model_dir, "events", "train"), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors("loss")}


def float_state(model_dir):
    """Every float tensor of the latest checkpoint: weights, batch-norm statistics, optimizer slots."""
    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    values = {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)}
    return {name: v for name, v in values.items() if getattr(v, "dtype", None) == np.float32}


def assert_close_to_reference(reference_dir, model_dir, loss_rtol=1e-4, weight_atol=5e-4):
    reference, state = float_state(reference_dir), float_state(model_dir)
    assert set(reference) == set(state) and len(reference) > 100
    for name in reference:
        np.testing.assert_allclose(state[name], reference[name], rtol=1e-3, atol=weight_atol, err_msg=name)
    # ...and the run did move away from its start by far more than the tolerance.
    assert max(np.max(np.abs(v)) for v in reference.values()) > 100 * weight_atol


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def kill_all(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


# ------------------------------------------------------------------------------------------ mirrored


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory, demo_dir):
    """single: one device (the reference); mirrored: 2 replicas, same global batch; interrupted: like
    mirrored, stopped by SIGTERM inside epoch 1 and resumed (without per-step summaries: they cannot change
    the weights, tests/test_determinism.py, and cost a third of a tiny run)."""
    root = tmp_path_factory.mktemp("mirrored")
    paths = {name: str(root / name) for name in ("single", "mirrored", "interrupted")}
    processes = []
    try:
        # The three runs are independent: started together, they share the 2 cores (most of a tiny run is
        # single-threaded start-up and tracing) instead of waiting in turn; the resume starts as soon as the
        # interrupted run has stopped.
        quiet = dict(REFERENCE, summary_every_steps=0)
        processes = [start(demo_dir, paths["single"], devices=2, **REFERENCE),
                     start(demo_dir, paths["mirrored"], devices=2, strategy="mirrored", **REFERENCE),
                     start(demo_dir, paths["interrupted"], devices=2, strategy="mirrored", progress_every=1,
                           **quiet)]
        process = processes[2]
        read_until(process, "epoch 1 step 5/", limit=3000)
        process.send_signal(signal.SIGTERM)
        stopped, _ = process.communicate(timeout=300)
        assert process.returncode == 128 + signal.SIGTERM, stopped[-3000:]
        processes.append(start(demo_dir, paths["interrupted"], devices=2, strategy="mirrored", **quiet))
        outputs = [wait_ok(p) for p in processes[:2]] + [wait_ok(processes[3])]
    finally:
        kill_all(processes)
    return dict(paths, outputs=outputs, stopped=stopped)


@pytest.mark.slow
def test_mirrored_equals_one_device_with_the_same_global_batch(mirrored):
    assert "2 replicas" in mirrored["outputs"][1] and "per-replica batch 4 of global 8" in mirrored["outputs"][1]
    single, two = step_losses(mirrored["single"]), step_losses(mirrored["mirrored"])
    assert sorted(single) == sorted(two) == list(range(2 * STEPS_PER_EPOCH))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [single[s] for s in sorted(single)], rtol=1e-4)
    assert_close_to_reference(mirrored["single"], mirrored["mirrored"])
    record = rundir.read_json(os.path.join(mirrored["mirrored"], "record.json"))["distribution"]
    assert (record["replicas"], record["per_replica_batch"], record["global_batch"]) == (2, 4, 8)


@pytest.mark.slow
def test_mirrored_resume_after_sigterm_is_bit_identical_to_uninterrupted(mirrored):
    assert "stopped by SIGTERM at epoch 1 step" in mirrored["stopped"]
    assert "resumed from" in mirrored["outputs"][2]
    # Bit-exact: the same weights as the uninterrupted mirrored run in another process, after each epoch.
    assert_bit_identical(mirrored["mirrored"], mirrored["interrupted"])


# ------------------------------------------------------------------------------------------ multi-worker


@pytest.mark.slow
def test_two_workers_train_write_one_series_and_validate_every_image_once(tmp_path, demo_dir, mirrored):
    """Two worker processes; SIGTERM to the non-chief inside epoch 1 stops both at the same step (one waiting
    alone in a collective would hang); the same two commands resume and finish 2 epochs."""
    model_dir = str(tmp_path / "run")
    temp = tmp_path / "tmp"
    temp.mkdir()
    processes = []

    def start_workers():
        ports = [free_port(), free_port()]
        cluster = {"worker": [f"localhost:{port}" for port in ports]}
        started = []
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            started.append(start(demo_dir, model_dir, strategy="multi_worker", progress_every=1,
                                 env={"TF_CONFIG": tf_config, "TMPDIR": str(temp)},
                                 **dict(REFERENCE, summary_every_steps=0)))
        processes.extend(started)
        return started

    try:
        first = start_workers()
        read_until(first[1], "epoch 1 step 5/", limit=3000)
        first[1].send_signal(signal.SIGTERM)
        stopped = [p.communicate(timeout=300)[0] for p in first]
        assert [p.returncode for p in first] == [128 + signal.SIGTERM] * 2, stopped[0][-2000:] + stopped[1][-2000:]
        steps = {line.split("stopped by SIGTERM at ")[1].split(";")[0] for output in stopped
                 for line in output.splitlines() if line.startswith("stopped: stopped by SIGTERM at ")}
        assert len(steps) == 1, steps  # both workers stopped after the same step
        outputs = [wait_ok(p) for p in start_workers()]
    finally:
        kill_all(processes)
    assert all("resumed from" in output and "done: best val_metric" in output for output in outputs)
    assert "(worker:0)" in outputs[0] and "(worker:1)" in outputs[1]
    # One checkpoint series, written by the chief; the other worker's temporary directory is gone.
    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == \
        [f"step-{STEPS_PER_EPOCH}", f"step-{2 * STEPS_PER_EPOCH}"]
    assert sorted(os.listdir(model_dir)) == [".lock", "checkpoints", "events", "export", "fingerprints.json",
                                             "flags.cfg", "metrics.csv", "record.json", "split.csv"]
    assert not [name for name in os.listdir(temp) if name.startswith("salt_tf-")]

    # The validation metric equals a single-process evaluation of the final weights, over all 33 images.
    from salt_tf import model as model_lib
    from salt_tf.data import kaggle

    split = pd.read_csv(os.path.join(model_dir, "split.csv"), dtype={"id": str})
    val_ids = list(split.loc[split["role"] == "val", "id"])
    assert len(val_ids) == 33
    images, masks = pipeline.to_arrays(kaggle.load_labelled(demo_dir).subset(val_ids), use_depth=False)
    model = model_lib.build_model(model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=1, se_ratio=2))
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    tf.train.Checkpoint(model=model).read(latest).expect_partial()
    probabilities = np.concatenate([tf.sigmoid(model(images[i:i + 5], training=False)).numpy()
                                    for i in range(0, 33, 5)])[..., 0]
    truth = masks[..., 0] > 0.5
    last = records.read_metrics(model_dir).iloc[-1]
    assert last["val_metric"] == pytest.approx(metrics.image_scores(truth, probabilities > 0.5).mean(), abs=1e-12)
    assert last["val_pixel_iou"] == pytest.approx(metrics.pixel_iou(truth, probabilities > 0.5), abs=1e-9)
    # Two workers with synchronized batch norm train what one device trains with the same global batch.
    np.testing.assert_allclose(records.read_metrics(model_dir)["train_loss"],
                               records.read_metrics(mirrored["single"])["train_loss"], rtol=1e-4)
    assert_close_to_reference(mirrored["single"], model_dir)


# ------------------------------------------------------------------------------------------ input sharding


def test_shards_of_every_global_batch_are_the_single_device_batch():
    """2 workers x 2 replicas, global batch 8: replica r of pipeline p gets images [4p + 2r, 4p + 2r + 2) of
    each global batch; compared with NumPy's gather of the epoch order (no augmentation)."""
    rng = np.random.default_rng(0)
    images = rng.random((37, 101, 101, 1), dtype=np.float32)
    masks = (images > 0.5).astype(np.float32)
    common = dict(batch_size=8, seed=3, epoch=2, augmentation=pipeline.Augmentation(hflip=False), start_step=1)
    shards = [list(pipeline.train_dataset(
        tf.constant(images), tf.constant(masks), **common,
        input_context=tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=p, num_replicas_in_sync=4)))
        for p in range(2)]
    order = pipeline.epoch_order(37, seed=3, epoch=2)
    steps = 37 // 8
    assert [len(s) for s in shards] == [2 * (steps - 1)] * 2  # two replica batches per step, from step 1
    for step in range(1, steps):
        replicas = [shards[p][2 * (step - 1) + r][0].numpy() for p in range(2) for r in range(2)]
        np.testing.assert_array_equal(np.concatenate(replicas), images[order[step * 8:(step + 1) * 8]])


def test_shards_carry_the_same_augmentation_as_one_device():
    rng = np.random.default_rng(1)
    images = tf.constant(rng.random((24, 101, 101, 1), dtype=np.float32))
    masks = tf.constant((rng.random((24, 101, 101, 1)) > 0.5).astype(np.float32))
    common = dict(batch_size=8, seed=0, epoch=1, augmentation=pipeline.Augmentation(hflip=True, translate=5))
    whole = [b[0].numpy() for b in pipeline.train_dataset(images, masks, **common)]
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=2)
    halves = [b[0].numpy() for b in pipeline.train_dataset(images, masks, **common, input_context=context)]
    np.testing.assert_array_equal(np.concatenate(halves), np.concatenate(whole))


# ------------------------------------------------------------------------------------------ user errors


def test_tf_config_is_checked_with_one_line():
    good = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    assert distribute.read_tf_config({"TF_CONFIG": json.dumps(good)}) == good
    assert distribute.worker_role(good) == distribute.WorkerRole(is_chief=False, task="worker:1")
    assert distribute.worker_role(dict(good, task={"type": "worker", "index": 0})).is_chief
    with_chief = {"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}
    assert not distribute.worker_role(with_chief).is_chief
    for text, expected in [("", "needs the TF_CONFIG"), ("{oops", "not valid JSON"),
                           ('{"cluster": {}}', "no cluster.worker"),
                           ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
                            "'ps' job"),
                           ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
                           ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "index 1"),
                           ('{"cluster": {"worker": ["a:1"]}}', "task must name")]:
        with pytest.raises(distribute.StrategyError, match=expected) as error:
            distribute.read_tf_config({"TF_CONFIG": text})
        assert "\n" not in str(error.value)


def test_global_batch_must_split_over_replicas():
    class ThreeReplicas:
        num_replicas_in_sync = 3

    assert distribute.check_global_batch(ThreeReplicas(), 12) == 4
    with pytest.raises(distribute.StrategyError, match=r"--batch_size=8 .* 3 replicas.* e\.g\. 6 or 9"):
        distribute.check_global_batch(ThreeReplicas(), 8)


def run_main(argv):
    salt_flags.define_flags()
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        FLAGS.unparse_flags()
        train.main(train.parse_flags(argv))
    return exit_info.value.code


@pytest.mark.parametrize("extra, env, expected", [
    (["--strategy=mirrored", "--devices=GPU:7"], {}, "no device GPU:7"),
    (["--strategy=mirrored", "--devices=banana"], {}, "'banana' is not a device"),
    (["--strategy=multi_worker"], {"TF_CONFIG": "{oops"}, "TF_CONFIG is not valid JSON"),
    (["--strategy=multi_worker"], {"TF_CONFIG": ""}, "needs the TF_CONFIG"),
    (["--devices=CPU:0"], {}, "--devices=CPU:0 is for --strategy=mirrored"),
])
def test_bad_distribution_settings_stop_before_any_work(tmp_path, demo_dir, capsys, monkeypatch, extra, env,
                                                        expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model_dir = str(tmp_path / "run")
    assert run_main(tiny_argv(demo_dir, model_dir) + extra) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not os.path.exists(model_dir)


def test_indivisible_global_batch_is_one_line_in_a_real_process(tmp_path, demo_dir):
    model_dir = tmp_path / "run"
    process = start(demo_dir, str(model_dir), devices=2, strategy="mirrored", batch_size=7)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--batch_size=7" in errors[0] and "2 replicas" in errors[0], errors
    assert not model_dir.exists()


# ------------------------------------------------------------------------------------------ per-replica BN

PER_REPLICA_CHECK = r"""
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from salt_tf import determinism
determinism.configure(0, True)
import keras
from salt_tf import loop, losses, model as model_lib, pipeline, step as step_lib

rng = np.random.default_rng(0)
images = rng.random((24, 101, 101, 1), dtype=np.float32)
masks = (rng.random((24, 101, 101, 1)) > 0.7).astype(np.float32)

def train_step(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = model_lib.build_model(model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=1, se_ratio=2))
        optimizer = keras.optimizers.SGD(0.01)
    return step_lib.TrainStep(model, optimizer, losses.CombinedLoss("bce:1,dice:1"), batch_size=8,
                              strategy=strategy)

mirrored = train_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
single = train_step(tf.distribute.get_strategy())
batch = (tf.constant(images[8:16]), tf.constant(masks[8:16]))
stem = single.model.encoder.stem
half_means = [np.mean(stem(batch[0][h:h + 4]).numpy(), axis=(0, 1, 2)) for h in (0, 4)]  # before the step
distributed = mirrored.strategy.experimental_distribute_values_from_function(
    lambda context: tuple(t[4 * context.replica_id_in_sync_group:][:4] for t in batch))
outputs, gradients = mirrored.train_step(*distributed)
# The reference: one device, each half of the batch alone (its own batch-norm statistics), losses / 8, summed.
step = tf.function(single.replica_gradients)
halves = [step(batch[0][h:h + 4], batch[1][h:h + 4]) for h in (0, 4)]
reference = [a + b for a, b in zip(halves[0][1], halves[1][1])]
norm = float(tf.linalg.global_norm(reference))
first_bn = mirrored.model.encoder.level0.block0.bn1.moving_mean
copies = [c.numpy() for c in mirrored.strategy.experimental_local_results(first_bn.value)]
print(json.dumps({
    "loss": [float(outputs["loss"]), float(halves[0][0]["loss"] + halves[1][0]["loss"])],
    "gradient_difference": float(tf.linalg.global_norm([g - r for g, r in zip(gradients, reference)])) / norm,
    "copies_equal": all(np.array_equal(c, copies[0]) for c in copies),
    "moving_mean_error": float(np.max(np.abs(copies[0] - 0.1 * (half_means[0] + half_means[1]) / 2))),
}))
"""


def test_per_replica_batch_norm_against_halves_on_one_device(tmp_path):
    """Default --nosync_batch_norm on 2 replicas: the step's loss and gradient equal one device's on each
    half of the batch alone, summed; every replica holds the same moving statistics, the mean of the
    halves' (momentum 0.9, from zero: 0.1 x the mean of the two halves' batch means, computed in NumPy)."""
    result = subprocess.run([sys.executable, "-c", PER_REPLICA_CHECK, str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    checks = json.loads(result.stdout.strip().splitlines()[-1])
    assert checks["loss"][0] == pytest.approx(checks["loss"][1], rel=1e-6)
    assert checks["gradient_difference"] < 1e-5
    assert checks["copies_equal"]
    assert checks["moving_mean_error"] < 1e-6
