"""salt_tf.sweep on tiny demo runs: trials are train runs, pruning, SIGKILL and resume, two workers on SQLite and on
a real PostgreSQL server, the sampler seed, the report, and the one-line refusals before anything is written.

Expected values come from the run directories themselves, read here with the csv module (a trial's value is the
best of its metrics.csv column), from the train command run directly (bit-identical weights), and from the
pruner's threshold; the trial flags of one seed are compared across in-process, killed-and-resumed and
two-worker sweeps.
"""

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
from absl.testing import flagsaver

from train_helpers import REPO_ROOT, assert_bit_identical, run_tiny, tiny_argv

from salt_tf import flags as salt_flags
from salt_tf import rundir, run_table, sweep, sweep_report

SPACE = "learning_rate: {log_float: [1.0e-3, 3.0e-2]}\n"
COMPLETE, PRUNED, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                             optuna.trial.TrialState.RUNNING)


def base_args(demo_dir, **overrides):
    """The tiny train flags (train_helpers.TINY) without --model_dir: the sweep's base command line."""
    return [a for a in tiny_argv(demo_dir, "unused", **overrides)[1:] if not a.startswith("--model_dir=")]


def space_file(folder, text=SPACE):
    path = os.path.join(folder, "space.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def sweep_argv(sweep_dir, space, trials, demo_dir, *own, epochs=1):
    return ["sweep", "run", f"--sweep_dir={sweep_dir}", f"--space={space}", f"--trials={trials}",
            "--sampler=random", "--seed=0", *own, *base_args(demo_dir, epochs=epochs)]


def run_sweep_here(argv):
    """The sweep command in this process, absl's FLAGS restored afterwards; returns its exit status."""
    salt_flags.define_flags()  # outside the flagsaver, which would forget flags defined inside it (run_tiny too)
    with flagsaver.flagsaver():
        return sweep.main(argv)


def sweep_process(argv):
    """The sweep command as its own process, output on stdout."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "salt_tf.sweep", *argv[1:]], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def study_of(sweep_dir, storage=None):
    return optuna.load_study(study_name=sweep_report.default_study_name(sweep_dir),
                             storage=sweep_report.storage_url(storage, sweep_dir))


def metrics_rows(run_dir):
    with open(os.path.join(run_dir, rundir.METRICS_FILE)) as f:
        return list(csv.DictReader(f))


def trial_flags(run_dir):
    return rundir.read_flagfile(run_dir)


@pytest.fixture(scope="module")
def four_trials(demo_dir, tmp_path_factory):
    """A finished 4-trial sweep over the learning rate (random sampler, seed 0, 1 epoch each), in this process."""
    root = tmp_path_factory.mktemp("sweep4")
    sweep_dir = str(root / "lr")
    argv = sweep_argv(sweep_dir, space_file(str(root)), 4, demo_dir, "--objective=val_metric_at_best_threshold")
    assert run_sweep_here(argv) == 0
    return sweep_dir


def lr_by_trial(sweep_dir, storage=None):
    return {t.number: t.params["learning_rate"] for t in study_of(sweep_dir, storage).get_trials()
            if sweep_report.counted(t)}


def test_four_trials_are_four_train_runs_and_a_study(four_trials, demo_dir, tmp_path):
    study = study_of(four_trials)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state == COMPLETE for t in trials)
    assert sorted(os.listdir(four_trials)) == [".claims", "study.db", "trial-0", "trial-1", "trial-2", "trial-3"]
    for t in trials:
        run_dir = os.path.join(four_trials, f"trial-{t.number}")
        rows = metrics_rows(run_dir)
        assert [r["epoch"] for r in rows] == ["1"]
        assert t.value == max(float(r["val_metric_at_best_threshold"]) for r in rows)
        assert t.intermediate_values == {1: float(rows[0]["val_metric_at_best_threshold"])}
        flags = trial_flags(run_dir)
        assert float(flags["learning_rate"]) == t.params["learning_rate"] and 1e-3 <= t.params["learning_rate"] <= 3e-2
        assert flags["model_dir"] == run_dir and flags["epochs"] == "1" and flags["base_width"] == "4"
        record = rundir.read_json(os.path.join(run_dir, rundir.RECORD_FILE))
        assert {k: record["sweep"][k] for k in ("study", "trial", "state")} == {
            "study": "lr", "trial": t.number, "state": "complete"}
        assert len(t.user_attrs[sweep_report.SESSIONS_ATTR]) == 1
    assert len({t.params["learning_rate"] for t in trials}) == 4
    # A trial is the train command with the same flags: the same weights, bit for bit.
    again = str(tmp_path / "again")
    run_tiny(demo_dir, again, epochs=1, learning_rate=trial_flags(os.path.join(four_trials, "trial-2"))["learning_rate"])
    assert_bit_identical(os.path.join(four_trials, "trial-2"), again, epochs=(1,))
    assert len(run_table.find_runs(four_trials)) == 4


def test_report_table_best_flagfile_importances_plot(four_trials, tmp_path, capsys):
    png = str(tmp_path / "history.png")
    try:  # matplotlib is the optional extra `plots`; without it --plot is one line and exit 2
        import matplotlib  # noqa: F401
        plotting = True
    except ImportError:
        plotting = False
        assert sweep.main(["sweep", "report", f"--sweep_dir={four_trials}", f"--plot={png}"]) == 2
        assert "--plot needs matplotlib" in capsys.readouterr().err
    assert sweep.main(["sweep", "report", f"--sweep_dir={four_trials}"] + ([f"--plot={png}"] if plotting else [])) == 0
    out = capsys.readouterr().out
    values = {n: max(float(r["val_metric_at_best_threshold"]) for r in metrics_rows(
        os.path.join(four_trials, f"trial-{n}"))) for n in range(4)}
    table = [line.split() for line in out.splitlines()[1:5]]
    assert [(int(c[0]), c[1], c[2], c[3]) for c in table] == [
        (n, "complete", f"{values[n]:.4f}", f"trial-{n}") for n in range(4)]
    assert "learning_rate" in out.splitlines()[0]
    best = max(values, key=lambda n: (values[n], -n))
    best_flags = rundir.parse_flagfile(open(os.path.join(four_trials, sweep_report.BEST_FLAGFILE)).read())
    assert "model_dir" not in best_flags
    assert best_flags["learning_rate"] == trial_flags(os.path.join(four_trials, f"trial-{best}"))["learning_rate"]
    assert f"best: trial {best}, value {values[best]:.4f}" in out
    assert "importances: learning_rate 1.000" in out  # the one parameter explains everything
    if plotting:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_hopeless_trial_is_pruned_after_its_first_epoch(demo_dir, tmp_path):
    sweep_dir = str(tmp_path / "prune")
    space = space_file(str(tmp_path), "learning_rate: {log_float: [1.0e-5, 1.0e-2]}\n")
    # Threshold 0.9 after epoch 1: a learning rate of 1e-5 cannot reach it (nor can any tiny run in one epoch).
    argv = sweep_argv(sweep_dir, space, 1, demo_dir, "--enqueue=learning_rate=1e-5", "--pruner=threshold",
                      "--prune_below=0.9", "--prune_from_epoch=1", epochs=3)
    assert run_sweep_here(argv) == 0
    (trial,) = study_of(sweep_dir).get_trials()
    run_dir = os.path.join(sweep_dir, "trial-0")
    rows = metrics_rows(run_dir)
    assert trial.state == PRUNED and trial.params == {"learning_rate": 1e-5}
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["val_metric"]) < 0.9
    assert trial.user_attrs[sweep_report.PRUNED_ATTR] == 1
    assert trial.intermediate_values == {1: float(rows[0]["val_metric"])}
    record = rundir.read_json(os.path.join(run_dir, rundir.RECORD_FILE))
    assert record["sweep"]["state"] == "pruned" and record["sweep"]["pruned_epoch"] == 1
    assert "finished" not in record
    # Stopped cleanly: epoch 1 (16 steps) is committed by its checkpoint.
    assert "step-16" in open(os.path.join(run_dir, rundir.CHECKPOINTS_DIR, rundir.CHECKPOINT_STATE)).read()


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_resumes_that_trial(four_trials, demo_dir, tmp_path):
    sweep_dir = str(tmp_path / "killed")
    argv = sweep_argv(sweep_dir, space_file(str(tmp_path)), 2, demo_dir, epochs=2)
    process = sweep_process(argv)
    state = os.path.join(sweep_dir, "trial-0", rundir.CHECKPOINTS_DIR, rundir.CHECKPOINT_STATE)
    deadline = time.time() + 600
    while not (os.path.isfile(state) and "step-16" in open(state).read()):  # epoch 1 of 2 committed
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert study_of(sweep_dir).get_trials()[0].state == RUNNING
    epoch_1 = metrics_rows(os.path.join(sweep_dir, "trial-0"))[0]

    assert run_sweep_here(argv) == 0
    trials = study_of(sweep_dir).get_trials()
    assert [(t.number, t.state) for t in trials] == [(0, COMPLETE), (1, COMPLETE)]  # the budget, none twice
    sessions = trials[0].user_attrs[sweep_report.SESSIONS_ATTR]
    assert [s["resumed"] for s in sessions] == [False, True]
    rows = metrics_rows(os.path.join(sweep_dir, "trial-0"))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == epoch_1  # epoch 1 kept, not trained again
    assert trials[0].value == max(float(r["val_metric"]) for r in rows)
    # The same seed gives the same trial flags, whichever process asked.
    assert lr_by_trial(sweep_dir) == {n: v for n, v in lr_by_trial(four_trials).items() if n < 2}


# ---------------------------------------------------------------------------------------------------------
# Two workers on one study.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin(name):
    found = shutil.which(name)
    if found:
        return found
    path = f"/usr/lib/postgresql/15/bin/{name}"
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own (initdb in a temporary folder, a free localhost port), stopped at the end."""
    if not all(postgres_bin(n) for n in ("postgres", "initdb", "pg_ctl")):
        pytest.skip("no PostgreSQL server binaries (postgres, initdb, pg_ctl) on this machine")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    folder = tempfile.mkdtemp(prefix="salt_tf_pg")
    if as_postgres:
        shutil.chown(folder, "postgres")
    data, port = os.path.join(folder, "data"), free_port()
    ctl = [*as_postgres, postgres_bin("pg_ctl"), "-D", data]

    def run(command):
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    try:
        run([*as_postgres, postgres_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres"])
        run([*ctl, "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "-l",
             os.path.join(folder, "log"), "-w", "start"])
        try:
            run([*as_postgres, postgres_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U",
                 "postgres", "sweeps"])
            yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
        finally:
            run([*ctl, "-m", "fast", "-w", "stop"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_workers_share_the_budget_and_never_run_a_trial_twice(database, four_trials, demo_dir, tmp_path,
                                                                  request):
    storage = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    sweep_dir = str(tmp_path / "lr")
    argv = sweep_argv(sweep_dir, space_file(str(tmp_path)), 3, demo_dir,
                      *([f"--storage={storage}"] if storage else []))
    workers = [sweep_process(argv) for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    started = [[line.split()[2] for line in out.splitlines() if line.startswith("sweep: trial ") and
                ": started in " in line] for out in outputs]
    assert sorted(started[0] + started[1]) == ["0", "1", "2"], outputs  # each trial run once, by one worker
    assert all(started), f"one worker ran every trial: {started}"
    counted = [t for t in study_of(sweep_dir, storage).get_trials() if sweep_report.counted(t)]
    assert [(t.number, t.state) for t in counted] == [(0, COMPLETE), (1, COMPLETE), (2, COMPLETE)]
    assert all(len(t.user_attrs[sweep_report.SESSIONS_ATTR]) == 1 for t in counted)
    for t in counted:
        assert [r["epoch"] for r in metrics_rows(os.path.join(sweep_dir, f"trial-{t.number}"))] == ["1"]
    assert lr_by_trial(sweep_dir, storage) == {n: v for n, v in lr_by_trial(four_trials).items() if n < 3}


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written.


def test_trial_flags_depend_on_seed_and_trial_number_not_on_the_process(tmp_path):
    space = sweep.load_space(space_file(str(tmp_path)))

    def flags_of(seed, fresh_sampler_per_trial=False):
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(storage=storage, study_name="s", direction="maximize")
        sampler = sweep.make_sampler("random", seed)
        values = []
        for _ in range(3):  # a fresh sampler per trial: each trial asked by another process (a rerun, a worker)
            study = optuna.load_study(study_name="s", storage=storage, sampler=sweep.make_sampler("random", seed)
                                      if fresh_sampler_per_trial else sampler)
            values.append(study.ask(fixed_distributions=space).params["learning_rate"])
        return values

    assert flags_of(0) == flags_of(0, fresh_sampler_per_trial=True) and len(set(flags_of(0))) == 3
    assert set(flags_of(0)).isdisjoint(flags_of(1))


@pytest.mark.parametrize("space, own, says", [
    ("learning_rat: {log_float: [1.0e-3, 3.0e-2]}\n", [], "learning_rat is not a train flag"),
    ("learning_rate: {float: [-0.1, 0.1]}\n", [], "learning_rate=-0.1: the train command refuses it"),
    ("learning_rate: {log_float: [3.0e-2]}\n", [], "learning_rate: log_float needs [LOW, HIGH]"),
    (SPACE, ["--storage=postgresql://nobody@127.0.0.1:{port}/none"], "cannot open the study storage"),
])
def test_bad_input_is_one_line_before_anything_is_written(space, own, says, demo_dir, tmp_path, capsys):
    sweep_dir = str(tmp_path / "never")
    own = [o.format(port=free_port()) for o in own]
    assert run_sweep_here(sweep_argv(sweep_dir, space_file(str(tmp_path), space), 2, demo_dir, *own)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error: ")]) == 1 and says in err[-1], err
    assert not os.path.exists(sweep_dir)


def test_a_study_name_reused_with_another_space_is_refused(four_trials, demo_dir, tmp_path, capsys):
    before = sorted(os.listdir(four_trials))
    space = space_file(str(tmp_path), "learning_rate: {log_float: [1.0e-4, 1.0e-2]}\n")
    argv = sweep_argv(four_trials, space, 6, demo_dir, "--objective=val_metric_at_best_threshold")
    assert run_sweep_here(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --study=lr already exists with another search space"), err
    assert sorted(os.listdir(four_trials)) == before and len(study_of(four_trials).get_trials()) == 4


def test_report_of_a_folder_without_a_study_is_one_line(tmp_path, capsys):
    assert sweep.main(["sweep", "report", f"--sweep_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: --sweep_dir={tmp_path}: no study.db in it; give the sweep's --storage=URL if its study "
                   "lives elsewhere"]
    assert os.listdir(tmp_path) == []  # no empty study.db made by opening it


# ---------------------------------------------------------------------------------------------------------
# Unit level (issue 38's mutants of the sweep): no training, each value checked against a hand computation.


def test_space_entries_become_the_distributions_they_name_and_log_ranges_sample_on_a_log_scale(tmp_path):
    import optuna.distributions as d

    space = sweep.load_space(space_file(str(tmp_path), "learning_rate: {log_float: [1.0e-4, 1.0e-2]}\n"
                                        "dropout: {float: [0.0, 0.5], step: 0.1}\n"
                                        "base_width: {log_int: [4, 64]}\n"
                                        "depth: {int: [2, 5]}\n"
                                        "se_type: {categorical: [channel, scse]}\n"))
    assert list(space) == ["learning_rate", "dropout", "base_width", "depth", "se_type"]  # file order
    assert space["learning_rate"] == d.FloatDistribution(1e-4, 1e-2, log=True)
    assert space["dropout"] == d.FloatDistribution(0.0, 0.5, step=0.1)
    assert space["base_width"] == d.IntDistribution(4, 64, log=True)
    assert space["depth"] == d.IntDistribution(2, 5)
    assert space["se_type"] == d.CategoricalDistribution(["channel", "scse"])
    # Sampled: a log range puts half its draws under the geometric mean 1e-3; a linear one would put
    # (1e-3 - 1e-4) / (1e-2 - 1e-4) = 9 % there. A log int range draws log-uniformly on [low - 0.5, high + 0.5]
    # and rounds: 4..7 take ln(7.5 / 3.5) / ln(64.5 / 3.5) = 26 % of the draws (linearly: 4 of 61 values, 7 %).
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    draws = [study.ask(fixed_distributions=space).params for _ in range(400)]
    below = sum(p["learning_rate"] < 1e-3 for p in draws) / len(draws)
    assert 0.4 < below < 0.6, below
    assert 0.18 < sum(p["base_width"] < 8 for p in draws) / len(draws) < 0.34
    assert all(1e-4 <= p["learning_rate"] <= 1e-2 and 4 <= p["base_width"] <= 64 for p in draws)
    assert {round(p["dropout"], 10) for p in draws} == {0.0, 0.1, 0.2, 0.3, 0.4, 0.5}
    assert {p["depth"] for p in draws} == {2, 3, 4, 5}


@pytest.mark.parametrize("space, says", [
    # Only the high end is outside momentum's validator ([0, 0.999]): both ends must be checked.
    ("momentum: {float: [0.5, 1.5]}\n", "--space={space}: momentum=1.5: the train command refuses it"),
    ("zoom: {categorical: [1.0, 1.2, 2.5]}\n", "--space={space}: zoom=2.5: the train command refuses it"),
    ("model_dir: {categorical: [a, b]}\n", "--space={space}: model_dir cannot be swept"),
])
def test_every_edge_of_the_space_is_checked_against_the_train_flags(space, says, demo_dir, tmp_path, capsys):
    sweep_dir = str(tmp_path / "never")
    path = space_file(str(tmp_path), space)
    assert run_sweep_here(sweep_argv(sweep_dir, path, 2, demo_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error: ")]) == 1 and says.format(space=path) in err[-1], err
    assert not os.path.exists(sweep_dir)


def test_a_trials_value_is_its_best_epoch_not_its_last(tmp_path):
    with open(tmp_path / rundir.METRICS_FILE, "w") as f:
        f.write("epoch,val_metric,val_metric_at_best_threshold\n1,0.50,0.55\n2,0.71,0.69\n3,0.64,0.73\n")
    assert sweep.trial_value(str(tmp_path), "val_metric") == 0.71
    assert sweep.trial_value(str(tmp_path), "val_metric_at_best_threshold") == 0.73
    assert sweep.trial_value(str(tmp_path / "none"), "val_metric") is None  # no epoch finished


def _space():
    return {"learning_rate": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)}


def test_an_orphan_is_adopted_as_itself_and_the_budget_counts_neither_it_twice_nor_a_surplus(tmp_path):
    study = optuna.create_study(direction="maximize", sampler=sweep.make_sampler("random", 0))
    here, elsewhere = str(tmp_path / "here"), str(tmp_path / "elsewhere")
    first, held = sweep.new_trial(study, here, 2, _space())
    assert first.number == 0 and sweep.adopt_orphan(study, here) is None  # its worker (this one) holds the claim
    other, other_held = sweep.new_trial(study, elsewhere, 2, _space())
    other_held.release()
    held.release()  # trial 0's worker died: the next worker on `here` adopts trial 0, not another folder's trial 1
    adopted, held = sweep.adopt_orphan(study, here)
    assert (adopted.number, adopted.params) == (0, first.params)
    study.tell(adopted, 0.5)
    held.release()
    assert sweep.adopt_orphan(study, here) is None  # complete: nothing left to adopt here
    assert sweep.budget_left(study, 3) and not sweep.budget_left(study, 2)  # trials 0 and 1 count, once each
    # The budget of 2 is full: the next trial asked for is marked surplus, never run, never counted.
    assert sweep.new_trial(study, here, 2, _space()) is None
    surplus = study.get_trials()[-1]
    assert surplus.number == 2 and surplus.state == optuna.trial.TrialState.FAIL
    assert surplus.user_attrs[sweep_report.NOT_RUN_ATTR] == "surplus"
    assert [t.number for t in study.get_trials() if sweep_report.counted(t)] == [0, 1]
    assert sweep.budget_left(study, 3)


def test_the_pruned_epoch_is_the_epoch_after_which_the_pruner_stopped(tmp_path):
    from types import SimpleNamespace

    from salt_tf import loop

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.6))
    trial = study.ask()
    run_dir = str(tmp_path / "trial-0")
    os.makedirs(run_dir)
    report = sweep.ReportEpoch(trial, run_dir, "val_metric", {"trial": 0})
    report(SimpleNamespace(epoch=1, row={"val_metric": 0.7}))
    report(SimpleNamespace(epoch=1, row={"val_metric": 0.2}))  # epoch 1 redone after a crash: reported already
    with pytest.raises(loop.StopAfterEpoch, match="pruned after epoch 2"):
        report(SimpleNamespace(epoch=2, row={"val_metric": 0.5}))
    assert report.pruned_epoch == 2
    assert study.get_trials()[0].intermediate_values == {1: 0.7, 2: 0.5}
    assert rundir.read_json(os.path.join(run_dir, rundir.RECORD_FILE))["sweep"] == {"trial": 0}


def test_the_best_flagfile_is_the_highest_value_trials_flags_without_model_dir(tmp_path):
    study = sweep.open_study(optuna.storages.InMemoryStorage(), "s", {}, [], sweep.make_sampler("random", 0),
                             optuna.pruners.NopPruner())
    for number, (value, rate) in enumerate([(0.61, "0.003"), (0.74, "0.01"), (0.52, "0.02")]):
        run_dir = tmp_path / f"trial-{number}"
        run_dir.mkdir()
        (run_dir / rundir.FLAGS_FILE).write_text(f"--model_dir={run_dir}\n--learning_rate={rate}\n--epochs=3\n")
        trial = study.ask()
        trial.set_user_attr(sweep_report.RUN_DIR_ATTR, str(run_dir))
        study.tell(trial, value)
    best, text = sweep_report.best_flagfile_text(study)
    assert best.number == 1
    assert text == (f"# The best trial of study s: trial 1, value 0.7400, run {tmp_path / 'trial-1'}.\n"
                    "# python -m salt_tf.train --flagfile=<this file> --model_dir=<a new run directory>\n"
                    "--epochs=3\n--learning_rate=0.01\n")
