"""End to end: the train entry point on tiny synthetic data, resume, and bad flags."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from salt_tf import flags as salt_flags
from salt_tf import checkpoints, records, rundir, train
import train_helpers
from train_helpers import checkpoint_state, events_files, run_tiny

FLAGS = flags.FLAGS


def test_two_epochs_write_the_run_directory_and_improve(tiny_run_2_epochs, demo_dir):
    model_dir = tiny_run_2_epochs  # run_tiny(demo_dir, model_dir), trained once per session (conftest)
    summary = rundir.read_json(os.path.join(model_dir, "record.json"))["summary"]  # what run_tiny returned
    assert summary["epochs_completed"] == 2
    # Checkpoints: the last epochs, the best, and the export predict loads.
    steps_per_epoch = (160 - 32) // 8
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")).endswith(f"step-{2 * steps_per_epoch}")
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints", "best")) is not None
    assert os.path.isfile(os.path.join(model_dir, "export", "model.json"))
    # The flagfile names the run's values, and parses back to them.
    text = open(os.path.join(model_dir, "flags.cfg")).read()
    assert "--base_width=4" in text and f"--data_dir={demo_dir}" in text
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["train", f"--flagfile={os.path.join(model_dir, 'flags.cfg')}"])
        assert (FLAGS.base_width, FLAGS.translate, FLAGS.model_dir) == (4, 4, model_dir)
    assert events_files(model_dir)
    split = pd.read_csv(os.path.join(model_dir, "split.csv"), dtype={"id": str})
    assert (split["role"] == "val").sum() == 32
    rows = records.read_metrics(model_dir)
    assert list(rows["epoch"]) == [1, 2]
    record = rundir.read_json(os.path.join(model_dir, "record.json"))
    assert record["summary"]["best_val_metric"] == rows["val_metric"].max()
    assert len(record["data"]["fingerprint"]) == 64


def test_validation_metric_improves_over_untrained(tmp_path, demo_dir):
    """A few epochs must beat the untrained model's validation metric, logged at step 0, clearly."""
    model_dir = str(tmp_path / "run")
    summary = run_tiny(demo_dir, model_dir, epochs=4, base_width=8, depth=3, learning_rate=0.003)
    metric = val_metric_events(model_dir)
    assert 0 in metric, "the untrained baseline is logged at step 0"
    assert summary["best_val_metric"] > metric[0] + 0.1


def val_metric_events(model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.join(model_dir, "events", "val"), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors("metric")}


def test_mixed_bfloat16_run_trains_and_records_its_precision(tmp_path, demo_dir):
    model_dir = str(tmp_path / "run")
    summary = run_tiny(demo_dir, model_dir, epochs=4, base_width=8, depth=3, learning_rate=0.003,
                       precision="mixed_bfloat16")
    rows = records.read_metrics(model_dir)
    assert np.isfinite(rows["train_loss"]).all() and rows["train_loss"].iloc[-1] < rows["train_loss"].iloc[0]
    assert summary["best_val_metric"] > val_metric_events(model_dir)[0] + 0.1  # clearly above untrained
    assert "--precision=mixed_bfloat16" in open(os.path.join(model_dir, "flags.cfg")).read()
    config = rundir.read_json(os.path.join(model_dir, "export", "model.json"))
    assert config["precision"] == "mixed_bfloat16"
    assert tf.keras.mixed_precision.global_policy().name == "float32"


def test_resume_restores_complete_state(tmp_path, demo_dir):
    straight = str(tmp_path / "straight")
    resumed = str(tmp_path / "resumed")
    run_tiny(demo_dir, straight, epochs=3, plateau_patience=1)
    run_tiny(demo_dir, resumed, epochs=1, plateau_patience=1)
    run_tiny(demo_dir, resumed, epochs=3, plateau_patience=1)
    a, b = checkpoint_state(straight), checkpoint_state(resumed)
    assert set(a) == set(b)
    # The state the loop carries: epoch counter, schedule, LR, optimizer step count and slots, weights.
    names = set(a)
    for expected in ("epoch/.ATTRIBUTES/VARIABLE_VALUE", "schedule/best/.ATTRIBUTES/VARIABLE_VALUE",
                     "schedule/wait/.ATTRIBUTES/VARIABLE_VALUE", "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE",
                     "optimizer/_learning_rate/.ATTRIBUTES/VARIABLE_VALUE"):
        assert expected in names, expected
    assert any(n.startswith("optimizer/_variables/") for n in names)
    assert a["epoch/.ATTRIBUTES/VARIABLE_VALUE"] == b["epoch/.ATTRIBUTES/VARIABLE_VALUE"] == 3
    for name in names:
        if isinstance(a[name], bytes):  # the partial-epoch marker: empty at an epoch's end
            assert a[name] == b[name] == b"", name
        else:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    rows = records.read_metrics(resumed)
    assert list(rows["epoch"]) == [1, 2, 3]


def test_rerun_of_a_finished_run_trains_nothing(tmp_path, demo_dir):
    model_dir = str(tmp_path / "run")
    run_tiny(demo_dir, model_dir, epochs=1)
    before = open(os.path.join(model_dir, rundir.METRICS_FILE)).read()
    summary = run_tiny(demo_dir, model_dir, epochs=1)
    assert summary["epochs_completed"] == 1
    assert open(os.path.join(model_dir, rundir.METRICS_FILE)).read() == before


@pytest.mark.parametrize("argv, names", [
    (["--loss=bce:1,lovaz:1"], "lovaz"),
    (["--learning_rate=-0.1"], "--learning_rate"),
    (["--dataset=kaggle", "--data_dir=/no/such/dir"], "--data_dir=/no/such/dir"),
    (["--depth=9"], "--depth"),
    (["--optimizer=rmsprop"], "--optimizer"),
    (["--epochs=ten"], "--epochs"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--flagfile=/no/such.cfg"], "/no/such.cfg"),
    (["--loss_schedule=bce:1;focal:1,dize:1"], "dize"),
    (["--lr_schedule=cosine", "--epochs=5", "--snapshot_cycles=2"], "--snapshot_cycles=2"),
    (["--loss_schedule=bce:1;dice:1", "--loss_switch_epochs=3", "--lr_schedule=cosine", "--epochs=4",
      "--snapshot_cycles=2"], "--loss_switch_epochs"),
    (["--loss_schedule=bce:1;dice:1", "--loss_switch_epochs=3,5"], "--loss_switch_epochs"),
    (["--profile_steps=5,2"], "--profile_steps"),
    (["--max_bad_steps=0"], "--max_bad_steps"),
    (["stray"], "unexpected argument stray"),  # not the whole --help
])
def test_bad_flags_stop_with_one_line(tmp_path, capsys, argv, names):
    salt_flags.define_flags()
    model_dir = str(tmp_path / "run")
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        FLAGS.unparse_flags()
        train.parse_flags(["train", "--dataset=demo", f"--data_dir={tmp_path}/d", f"--model_dir={model_dir}"]
                          + argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and names in message, message
    assert not os.path.exists(model_dir)


def test_entry_point_process_exits_nonzero_before_work(tmp_path):
    """The real command, as a user runs it: a bad value ends it with status 2 and one error line."""
    model_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "salt_tf.train", "--dataset=demo", f"--data_dir={tmp_path}/d",
         f"--model_dir={model_dir}", "--loss=hinge:1"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hinge" in errors[0]
    assert not model_dir.exists() and not (tmp_path / "d").exists()


def _val_scalars_at_step_zero(model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.join(model_dir, "events", "val"), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {tag: float(tf.make_ndarray(event.tensor_proto))
            for tag in ("loss", "metric") for event in accumulator.Tensors(tag) if event.step == 0}


def test_init_checkpoint_starts_from_the_source_runs_exported_weights(tmp_path, demo_dir, tiny_run_1_epoch):
    source = tiny_run_1_epoch  # run_tiny(demo_dir, source, epochs=1), trained once per session (conftest)
    # Before its first step, a run started from `source` must evaluate exactly as source's exported model
    # did after its epoch 1 (same weights, batch-norm statistics and validation images); a fresh run must not.
    # `source` itself is that fresh run: the same seed, data and model (the optimizer does not enter a step-0
    # evaluation), so its own step-0 values are the fresh start's, without training a run more.
    row = records.read_metrics(source).iloc[0]
    started = str(tmp_path / "started")
    run_tiny(demo_dir, started, epochs=1, init_checkpoint=source, optimizer="sgd")
    at_start = _val_scalars_at_step_zero(started)
    assert np.float32(at_start["loss"]) == np.float32(row["val_loss"])
    assert np.float32(at_start["metric"]) == np.float32(row["val_metric"])
    assert np.float32(_val_scalars_at_step_zero(source)["loss"]) != np.float32(row["val_loss"])
    recorded = rundir.read_json(os.path.join(started, rundir.RECORD_FILE))["init_checkpoint"]
    assert recorded["path"] == os.path.join(source, "export") and recorded["epoch"] == 1
    assert recorded["val_images_trained_on_by_source"] == 0  # same --split_seed: no leak
    assert recorded["weights_sha256"] == train_helpers.reference_weights_sha256(os.path.join(source, "export"))
    # Another split validates on images the source trained on: counted (from the two split.csv files).
    other = str(tmp_path / "other_split")
    run_tiny(demo_dir, other, epochs=1, init_checkpoint=source, split_seed=1)
    roles = [pd.read_csv(os.path.join(d, "split.csv"), dtype={"id": str}) for d in (source, other)]
    leaked = set(roles[0].id[roles[0].role == "train"]) & set(roles[1].id[roles[1].role == "val"])
    assert leaked
    recorded = rundir.read_json(os.path.join(other, rundir.RECORD_FILE))["init_checkpoint"]
    assert recorded["val_images_trained_on_by_source"] == len(leaked)
    # A resume needs no source (it may be gone); a rerun that names another one, or other training flags, is
    # refused before anything changes (issue 19: flags.cfg must tell what the run did).
    before = checkpoint_state(started)
    with pytest.raises(checkpoints.ResumeError, match="init_checkpoint: .* -> /no/longer/there"):
        run_tiny(demo_dir, started, epochs=1, init_checkpoint="/no/longer/there", optimizer="sgd")
    after = checkpoint_state(started)
    assert all(np.array_equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("source_flags, flag_value, names", [
    ({}, "{tmp}/nowhere", ["--init_checkpoint={tmp}/nowhere", "model.json"]),
    ({"base_width": 6}, "{source}", ["base_width=6", "base_width=4"]),
])
def test_bad_init_checkpoint_stops_with_one_line(tmp_path, demo_dir, capsys, source_flags, flag_value, names):
    source = str(tmp_path / "source")
    if source_flags:
        run_tiny(demo_dir, source, epochs=1, **source_flags)
    model_dir = str(tmp_path / "run")
    value = flag_value.format(tmp=tmp_path, source=source)
    salt_flags.define_flags()
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        FLAGS.unparse_flags()
        FLAGS(["train", *train_helpers.tiny_argv(demo_dir, model_dir, init_checkpoint=value)[1:]])
        train.main(["train"])
    assert exit_info.value.code == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and all(n.format(tmp=tmp_path) in message[0] for n in names), message
    assert not os.path.exists(model_dir)
