"""salt_tf.sweep with fold trials (--folds=K among the train flags): each trial a CV parent of K ordinary fold runs
trained by cv's plan and arguments, valued by the mean of its folds' best objective, reported at step
fold * epochs + epoch, pruned, killed and resumed at its unfinished fold; its report and best flagfile; and the
one-line refusals of a fold sweep's bad input.

Expected values are read here from the fold runs' own metrics.csv with pandas; a fold run's weights are compared
bit for bit with the train command run directly with the same fold flags, and a killed-and-resumed fold trial
with the same trial of an uninterrupted sweep.
"""

import os
import signal
import time
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest

from test_sweep import run_sweep_here, space_file, study_of, sweep_process
from train_helpers import assert_bit_identical, run_tiny, tiny_argv

from salt_tf import cv, rundir, run_table, sweep, sweep_report

COMPLETE, PRUNED, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                             optuna.trial.TrialState.RUNNING)
FOLDS, EPOCHS = 2, 2
# 160 demo images in 2 folds: each fold trains on 80 images, 10 steps of --batch_size=8 per epoch.
STEPS_PER_EPOCH = 10


def fold_base_args(demo_dir, **overrides):
    """The tiny train flags (train_helpers.TINY) of a 2-fold sweep: --folds=2, no --model_dir, no --val_images
    (the train command refuses it on the command line together with --folds)."""
    values = dict(dict(folds=FOLDS, epochs=EPOCHS), **overrides)
    return [a for a in tiny_argv(demo_dir, "unused", **values)[1:]
            if not a.startswith(("--model_dir=", "--val_images="))]


def fold_sweep_argv(sweep_dir, space, trials, demo_dir, *own, **overrides):
    return ["sweep", "run", f"--sweep_dir={sweep_dir}", f"--space={space}", f"--trials={trials}",
            "--sampler=random", "--seed=0", *own, *fold_base_args(demo_dir, **overrides)]


def fold_metrics(sweep_dir, number, fold):
    return pd.read_csv(os.path.join(sweep_dir, f"trial-{number}", f"fold-{fold}", rundir.METRICS_FILE))


def fold_record(sweep_dir, number, fold):
    return rundir.read_json(os.path.join(sweep_dir, f"trial-{number}", f"fold-{fold}", rundir.RECORD_FILE))


@pytest.fixture(scope="module")
def two_fold_trials(demo_dir, tmp_path_factory):
    """A finished 2-trial sweep of 2-fold trials over the learning rate (2 epochs per fold), in this process."""
    root = tmp_path_factory.mktemp("sweep_folds")
    sweep_dir = str(root / "cvlr")
    assert run_sweep_here(fold_sweep_argv(sweep_dir, space_file(str(root)), 2, demo_dir)) == 0
    return sweep_dir


def test_a_fold_trials_value_is_the_mean_of_its_folds_best_and_each_fold_is_a_fold_run(two_fold_trials, demo_dir,
                                                                                        tmp_path):
    trials = study_of(two_fold_trials).get_trials()
    assert [(t.number, t.state) for t in trials] == [(0, COMPLETE), (1, COMPLETE)]
    assert sorted(os.listdir(two_fold_trials)) == [".claims", "study.db", "trial-0", "trial-1"]
    for t in trials:
        parent = os.path.join(two_fold_trials, f"trial-{t.number}")
        assert sorted(os.listdir(parent)) == ["fold-0", "fold-1"]
        frames = [fold_metrics(two_fold_trials, t.number, k) for k in range(FOLDS)]
        assert all(list(f["epoch"]) == [1, 2] for f in frames)
        bests = [float(f["val_metric"].max()) for f in frames]
        assert t.value == pytest.approx(sum(bests) / FOLDS, abs=1e-12)
        assert t.user_attrs[sweep_report.FOLD_VALUES_ATTR] == pytest.approx(bests, abs=1e-12)
        # Epoch e of fold k is step k * epochs + e: fold 1's epochs are steps 3 and 4.
        assert t.intermediate_values == pytest.approx(
            {k * EPOCHS + int(e): float(v) for k, f in enumerate(frames) for e, v in zip(f["epoch"], f["val_metric"])},
            abs=1e-12)
        for k in range(FOLDS):
            flags = rundir.read_flagfile(rundir.fold_dir(parent, k))
            assert (flags["fold"], flags["folds"], flags["model_dir"]) == (str(k), "2", rundir.fold_dir(parent, k))
            assert float(flags["learning_rate"]) == t.params["learning_rate"]
            entry = fold_record(two_fold_trials, t.number, k)["sweep"]
            assert {key: entry[key] for key in ("study", "trial", "fold", "state")} == {
                "study": "cvlr", "trial": t.number, "fold": k, "state": "complete"}
            assert entry["fold_value"] == pytest.approx(bests[k], abs=1e-12)
            assert entry["value"] == pytest.approx(t.value, abs=1e-12)
        assert sorted(rundir.fold_runs(parent)) == [0, 1]  # what cv collect and predict read: a whole K-fold
    assert len(run_table.find_runs(two_fold_trials)) == 4
    # A fold of a trial is the train command with cv's fold flags: the same weights, bit for bit.
    rate = rundir.read_flagfile(os.path.join(two_fold_trials, "trial-1", "fold-1"))["learning_rate"]
    again = str(tmp_path / "again")
    run_tiny(demo_dir, again, epochs=EPOCHS, folds=FOLDS, fold=1, learning_rate=rate)
    assert_bit_identical(os.path.join(two_fold_trials, "trial-1", "fold-1"), again, epochs=(1, 2))


def test_cv_collect_works_on_a_fold_trial_unchanged(two_fold_trials, capsys):
    parent = os.path.join(two_fold_trials, "trial-0")
    assert cv.main(["cv", "collect", f"--parent={parent}", "--tta=none"]) == 0
    assert os.path.isfile(os.path.join(parent, rundir.OOF_FILE))
    assert os.path.isfile(os.path.join(parent, rundir.OOF_SUMMARY))


def test_report_shows_fold_values_and_the_best_flagfile_trains_the_folds_again(two_fold_trials, tmp_path, capsys):
    assert sweep.main(["sweep", "report", f"--sweep_dir={two_fold_trials}"]) == 0
    out = capsys.readouterr().out.splitlines()
    values, per_fold = {}, {}
    for n in range(2):
        per_fold[n] = [float(fold_metrics(two_fold_trials, n, k)["val_metric"].max()) for k in range(FOLDS)]
        values[n] = sum(per_fold[n]) / FOLDS
    header = out[0].split()
    assert header[:7] == ["trial", "state", "value", "pruned_epoch", "pruned_fold", "fold_values", "name"]
    for n in range(2):  # the trial's line: its number, state, value, per-fold values, name (blank pruned columns)
        assert out[1 + n].split()[:5] == [str(n), "complete", f"{values[n]:.4f}",
                                          "/".join(f"{v:.4f}" for v in per_fold[n]), f"trial-{n}"]
    rows, _ = sweep_report.trial_rows(study_of(two_fold_trials), two_fold_trials)
    assert [(r["fold_values"], r["epochs_completed"], r["best_epoch"]) for r in rows] == [
        ("/".join(f"{v:.4f}" for v in per_fold[n]), FOLDS * EPOCHS, None) for n in range(2)]
    # The objective is val_metric: the folds' mean best val_metric is the trial's value.
    assert [r["best_val_metric"] for r in rows] == pytest.approx([values[0], values[1]], abs=1e-12)
    assert "fold" not in rows[0] and rows[0]["learning_rate"] is not None  # the trial's flags, not fold-0's
    best = max(values, key=lambda n: (values[n], -n))
    assert f"best: trial {best}, value {values[best]:.4f} (the mean of its 2 folds' " in out[3]
    path = os.path.join(two_fold_trials, sweep_report.BEST_FLAGFILE)
    text = open(path).read()
    assert "# python -m salt_tf.cv train --flagfile=<this file> --parent=<a new folder>" in text
    best_flags = rundir.parse_flagfile(text)
    assert "model_dir" not in best_flags and "fold" not in best_flags and best_flags["folds"] == "2"
    assert best_flags["learning_rate"] == rundir.read_flagfile(
        os.path.join(two_fold_trials, f"trial-{best}", "fold-0"))["learning_rate"]
    # Usable as it is: cv train's own plan of it is a new 2-fold (every fold's flags parsed and checked).
    assert cv.plan_folds(str(tmp_path / "again"), [f"--flagfile={path}"]) == (2, {0: "new", 1: "new"})


def test_a_hopeless_fold_trial_is_pruned_in_its_first_fold(demo_dir, tmp_path):
    sweep_dir = str(tmp_path / "prune")
    space = space_file(str(tmp_path), "learning_rate: {log_float: [1.0e-5, 1.0e-2]}\n")
    # Threshold 0.9 after epoch 1: a learning rate of 1e-5 cannot reach it (nor can any tiny run in one epoch).
    argv = fold_sweep_argv(sweep_dir, space, 1, demo_dir, "--enqueue=learning_rate=1e-5", "--pruner=threshold",
                           "--prune_below=0.9", "--prune_from_epoch=1")
    assert run_sweep_here(argv) == 0
    (trial,) = study_of(sweep_dir).get_trials()
    rows = fold_metrics(sweep_dir, 0, 0)
    assert trial.state == PRUNED and list(rows["epoch"]) == [1] and float(rows["val_metric"][0]) < 0.9
    assert trial.user_attrs[sweep_report.PRUNED_ATTR] == 1 and trial.user_attrs[sweep_report.PRUNED_FOLD_ATTR] == 0
    assert trial.intermediate_values == pytest.approx({1: float(rows["val_metric"][0])}, abs=1e-12)
    fold_values = trial.user_attrs[sweep_report.FOLD_VALUES_ATTR]
    assert fold_values[0] == pytest.approx(float(rows["val_metric"][0]), abs=1e-12) and fold_values[1] is None
    assert os.listdir(os.path.join(sweep_dir, "trial-0")) == ["fold-0"]  # fold 1 never started
    record = fold_record(sweep_dir, 0, 0)
    assert {k: record["sweep"][k] for k in ("state", "fold", "pruned_fold", "pruned_epoch", "value")} == {
        "state": "pruned", "fold": 0, "pruned_fold": 0, "pruned_epoch": 1, "value": None}
    assert "finished" not in record
    # Stopped cleanly: epoch 1 is committed by its checkpoint.
    state = os.path.join(sweep_dir, "trial-0", "fold-0", rundir.CHECKPOINTS_DIR, rundir.CHECKPOINT_STATE)
    assert f"step-{STEPS_PER_EPOCH}" in open(state).read()


@pytest.mark.slow
def test_sigkill_mid_fold_then_rerun_resumes_that_fold_and_keeps_the_finished_one(two_fold_trials, demo_dir,
                                                                                    tmp_path):
    sweep_dir = str(tmp_path / "killed")
    argv = fold_sweep_argv(sweep_dir, space_file(str(tmp_path)), 1, demo_dir)
    process = sweep_process(argv)
    state = os.path.join(sweep_dir, "trial-0", "fold-1", rundir.CHECKPOINTS_DIR, rundir.CHECKPOINT_STATE)
    deadline = time.time() + 600
    while not (os.path.isfile(state) and f"step-{STEPS_PER_EPOCH}" in open(state).read()):  # fold 1, epoch 1
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert study_of(sweep_dir).get_trials()[0].state == RUNNING
    fold_0_before = (fold_metrics(sweep_dir, 0, 0), fold_record(sweep_dir, 0, 0)["started"])
    fold_1_epoch_1 = fold_metrics(sweep_dir, 0, 1).iloc[0]

    assert run_sweep_here(argv) == 0
    (trial,) = study_of(sweep_dir).get_trials()  # the budget of 1: the killed trial, not counted twice
    assert trial.state == COMPLETE and [s["resumed"] for s in trial.user_attrs[sweep_report.SESSIONS_ATTR]] == [
        False, True]
    # Fold 0 was finished: kept, not trained again (its rows and its one session's start unchanged).
    pd.testing.assert_frame_equal(fold_metrics(sweep_dir, 0, 0), fold_0_before[0])
    assert fold_record(sweep_dir, 0, 0)["started"] == fold_0_before[1]
    rows = fold_metrics(sweep_dir, 0, 1)
    assert list(rows["epoch"]) == [1, 2]
    pd.testing.assert_series_equal(rows.iloc[0], fold_1_epoch_1)  # epoch 1 of fold 1 kept, not trained again
    bests = [float(fold_metrics(sweep_dir, 0, k)["val_metric"].max()) for k in range(FOLDS)]
    assert trial.value == pytest.approx(sum(bests) / FOLDS, abs=1e-12)
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4]
    # Trial 0 of seed 0 is trial 0 of the uninterrupted sweep: the same weights after every epoch of both folds.
    assert trial.params == study_of(two_fold_trials).get_trials()[0].params
    for k in range(FOLDS):
        assert_bit_identical(os.path.join(sweep_dir, "trial-0", f"fold-{k}"),
                             os.path.join(two_fold_trials, "trial-0", f"fold-{k}"), epochs=(1, 2))


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written.


@pytest.mark.parametrize("space, overrides, flagfile, says", [
    ("learning_rate: {log_float: [1.0e-3, 3.0e-2]}\n", dict(folds=200), None,
     "the base train flags: --folds=200 with 160 labelled images leaves 40 folds without a validation image"),
    ("learning_rate: {log_float: [1.0e-3, 3.0e-2]}\n", dict(folds=20, batch_size=160), None,
     "a fold trains on only 152 images, fewer than --batch_size=160"),
    ("folds: {int: [2, 4]}\n", {}, None, "folds cannot be swept in a fold sweep"),
])
def test_bad_fold_sweep_input_is_one_line_before_anything_is_written(space, overrides, flagfile, says, demo_dir,
                                                                      tmp_path, capsys):
    sweep_dir = str(tmp_path / "never")
    own = []
    if flagfile is not None:
        (tmp_path / "f.cfg").write_text(flagfile)
        own = [f"--flagfile={tmp_path / 'f.cfg'}"]
    argv = fold_sweep_argv(sweep_dir, space_file(str(tmp_path), space), 2, demo_dir, **overrides) + own
    assert run_sweep_here(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error: ")]) == 1 and says in err[-1], err
    assert not os.path.exists(sweep_dir)


@pytest.mark.parametrize("where", ["command line", "flagfile"])
def test_folds_with_fold_is_a_sweep_on_that_one_fold(where, demo_dir, tmp_path):
    """--folds=2 --fold=1 (on the command line or in a flagfile): every trial is one run validating on fold 1, as
    the train command's --fold=1 run is, not a cross-validation parent."""
    sweep_dir = str(tmp_path / "one_fold")
    space = space_file(str(tmp_path), "learning_rate: {log_float: [1.0e-3, 3.0e-2]}\n")
    if where == "flagfile":
        (tmp_path / "f.cfg").write_text("--fold=1\n")
        argv = fold_sweep_argv(sweep_dir, space, 1, demo_dir, f"--flagfile={tmp_path / 'f.cfg'}", epochs=1)
    else:
        argv = fold_sweep_argv(sweep_dir, space, 1, demo_dir, epochs=1, fold=1)
    assert run_sweep_here(argv) == 0
    trial_dir = os.path.join(sweep_dir, "trial-0")
    assert os.path.isfile(os.path.join(trial_dir, rundir.METRICS_FILE))
    assert not os.path.exists(os.path.join(trial_dir, "fold-0"))
    assert str(rundir.read_json(os.path.join(trial_dir, rundir.RECORD_FILE))["flags"]["fold"]) == "1"
    assert len(pd.read_csv(os.path.join(trial_dir, rundir.METRICS_FILE))) == 1


# ---------------------------------------------------------------------------------------------------------
# Unit level: no training.


def test_a_folds_epochs_are_reported_at_fold_times_stride_plus_epoch_and_pruned_from_its_own_epoch(tmp_path):
    from salt_tf import loop

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.6))
    trial = study.ask()
    run_dir = str(tmp_path / "trial-0" / "fold-1")
    os.makedirs(run_dir)
    report = sweep.ReportEpoch(trial, run_dir, "val_metric", {"trial": 0, "fold": 1}, fold=1, stride=3,
                               from_epoch=2)
    report(SimpleNamespace(epoch=1, row={"val_metric": 0.2}))  # below the threshold, but before epoch 2 of the fold
    report(SimpleNamespace(epoch=1, row={"val_metric": 0.9}))  # epoch 1 redone after a crash: reported already
    with pytest.raises(loop.StopAfterEpoch, match="pruned after epoch 2 of fold 1"):
        report(SimpleNamespace(epoch=2, row={"val_metric": 0.5}))
    assert report.pruned_epoch == 2
    assert study.get_trials()[0].intermediate_values == {4: 0.2, 5: 0.5}
    assert rundir.read_json(os.path.join(run_dir, rundir.RECORD_FILE))["sweep"] == {"trial": 0, "fold": 1}


def test_fold_mean_and_stride():
    assert sweep.fold_mean([0.5, 0.75, 0.25]) == 0.5
    assert sweep.fold_mean([0.5, None]) is None and sweep.fold_mean([]) is None
    space = {"epochs": optuna.distributions.IntDistribution(2, 7)}
    assert sweep.fold_stride({"epochs": 4}, {}) == 4
    assert sweep.fold_stride({"epochs": 4}, space) == 7  # a trial may train 7 epochs: fold 1 starts at step 8
    assert sweep.fold_step(1, 7, 2) == 9 and sweep.fold_step(0, 7, 2) == 2
