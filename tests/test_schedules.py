"""LR schedules and snapshot cycles: values at known steps, and snapshots written at the right epochs."""

import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from salt_tf import checkpoints, records, rundir, schedules
from train_helpers import run_tiny


def test_cosine_values_at_known_steps():
    lr = lambda step: schedules.cosine_learning_rate(0.1, step, 10)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)
    assert lr(5) == pytest.approx(0.05)                   # half way: cos(pi/2) = 0
    assert lr(9) == pytest.approx(0.05 * (math.cos(math.pi * 0.9) + 1))
    assert lr(10) == pytest.approx(0.1) and lr(15) == pytest.approx(0.05)  # the next cycle restarts


def outcomes(schedule, metrics, lr):
    return [schedule.end_epoch(epoch, m, lr) for epoch, m in enumerate(metrics, start=1)]


def test_plateau_multiplies_after_patience_and_respects_the_floor():
    lr = tf.Variable(1.0, dtype=tf.float32)
    schedule = schedules.Schedule("plateau", 1.0, factor=0.5, patience=2, min_learning_rate=0.3)
    seen = []
    for epoch, metric in enumerate([0.1, 0.2, 0.2, 0.1, 0.3, 0.3, 0.3, 0.3, 0.3], start=1):
        schedule.end_epoch(epoch, metric, lr)
        seen.append(round(float(lr.numpy()), 6))
    # improvements at epochs 1, 2, 5; two flat epochs after each -> halve (3->4, 6->7), floor 0.3 (8->9).
    assert seen == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.3, 0.3, 0.3]
    assert int(schedule.best_epoch.numpy()) == 5


def test_plateau_restart_ends_cycles_and_resets_the_lr():
    lr = tf.Variable(0.01, dtype=tf.float32)
    schedule = schedules.Schedule("plateau_restart", 0.01, patience=2)
    got = []
    for epoch, metric in enumerate([0.5, 0.6, 0.55, 0.58, 0.3, 0.4, 0.7, 0.65, 0.6], start=1):
        if epoch == 3:
            lr.assign(0.002)  # whatever the LR became, a restart returns it to the initial value
        outcome = schedule.end_epoch(epoch, metric, lr)
        got.append((outcome.improved, outcome.improved_cycle, outcome.finished_cycle))
    assert got == [(True, True, None), (True, True, None), (False, False, None), (False, False, 0),
                   (False, True, None), (False, True, None), (True, True, None), (False, False, None),
                   (False, False, 1)]
    assert float(lr.numpy()) == pytest.approx(0.01) and int(schedule.cycle.numpy()) == 2


def test_cosine_snapshots_and_loss_stages_in_a_run(tmp_path, demo_dir):
    model_dir = str(tmp_path / "run")
    run_tiny(demo_dir, model_dir, epochs=4, lr_schedule="cosine", snapshot_cycles=2, learning_rate=0.01,
             loss_schedule="bce:1;bce:1,dice:1")
    snapshots = rundir.export_dirs(model_dir)
    assert [os.path.basename(s) for s in snapshots] == ["snapshot-0", "snapshot-1"]
    assert [json.load(open(os.path.join(s, "model.json")))["epoch"] for s in snapshots] == [2, 4]
    rows = records.read_metrics(model_dir)
    steps = (160 - 32) // 8
    expected_lr = [schedules.cosine_learning_rate(0.01, e * steps, 2 * steps) for e in range(4)]
    np.testing.assert_allclose(rows["learning_rate"], expected_lr, rtol=1e-6)
    assert list(rows["cycle"]) == [0, 0, 1, 1] and list(rows["loss_stage"]) == [0, 0, 1, 1]
    assert rows["train_loss/dice"].isna().tolist() == [True, True, False, False]
    # The snapshot holds the weights at the end of its cycle: the fingerprint of that epoch.
    from salt_tf import determinism, model as model_lib

    config = json.load(open(os.path.join(snapshots[0], "model.json")))
    model = model_lib.build_model(model_lib.ModelConfig(**config["model"]))
    checkpoints.restore_exported_weights(snapshots[0], model)
    assert determinism.variable_fingerprints(model.variables) == records.read_fingerprints(model_dir)[2]


def test_plateau_restart_snapshot_is_the_cycle_best(tmp_path, demo_dir):
    model_dir = str(tmp_path / "run")
    run_tiny(demo_dir, model_dir, epochs=4, lr_schedule="plateau_restart", plateau_patience=1)
    rows = records.read_metrics(model_dir)
    for snapshot in rundir.export_dirs(model_dir):
        config = json.load(open(os.path.join(snapshot, "model.json")))
        cycle_rows = rows[rows["cycle"] == config["cycle"]]
        assert config["epoch"] == int(cycle_rows.loc[cycle_rows["val_metric"].idxmax(), "epoch"])
    assert len(rundir.export_dirs(model_dir)) == rows["cycle"].max() + 1
