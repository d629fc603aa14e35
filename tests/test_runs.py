"""`python -m salt_tf.runs` (list, diff, reproduce) on real run directories of tiny trainings.

One module fixture makes the runs the way a person would: a training process, then `reproduce` processes.
Bit-identity is a property of fresh processes (thread pools and op determinism are fixed at start-up), so
the original is a process too. The list and diff tests then read those run directories in-process:

    runs/a                      original, --learning_rate=0.01, 1 epoch, on a private copy of the demo data
    runs/a-reproduce-1          `reproduce runs/a`                               -> PASS
    runs/a_edited               copy of runs/a whose flags.cfg says --learning_rate=0.02
    runs/a_edited-reproduce-1   `reproduce runs/a_edited`                        -> FAIL, weights diverge
    runs/a-reproduce-2          `reproduce runs/a` after one training image changed -> FAIL, data differs
"""

import dataclasses
import io
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from salt_tf import curve_plot, records, run_table, rundir, runs
from salt_tf.data import kaggle
from train_helpers import TINY, read_until, reference_weights_sha256, tiny_argv

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = str(TINY["learning_rate"])
EDITED_LR = str(TINY["learning_rate"] * 2)
FIXED_COLUMNS = ["name", "started", "best_val_metric", "best_epoch", "epochs_completed"]
# The train command's log line after it has read the whole data set (train.py), as `reproduce` relays it.
DATA_LOADED = "] data: "


def start(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process):
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def change_one_training_image(data_dir, run_dir):
    """Inverts a patch of the first training image of the run's split; returns its id."""
    split = pd.read_csv(os.path.join(run_dir, rundir.SPLIT_FILE), dtype={"id": str})
    image_id = split.loc[split["role"] == "train", "id"].iloc[0]
    path = os.path.join(data_dir, "train", "images", f"{image_id}.png")
    before = open(path, "rb").read()
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    image[20:40, 20:40] = 255 - image[20:40, 20:40]
    assert cv2.imwrite(path, image) and open(path, "rb").read() != before
    return image_id


@dataclasses.dataclass
class Lab:
    root: str
    data: str
    code_changed: bool      # someone edited the checkout while the fixture ran: identity is not owed
    results: dict           # reproduce case -> (exit status, output)

    def run(self, name):
        return os.path.join(self.root, name)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, demo_dir):
    base = tmp_path_factory.mktemp("lab")
    data, root = str(base / "data"), str(base / "runs")
    shutil.copytree(demo_dir, data)
    a, edited = os.path.join(root, "a"), os.path.join(root, "a_edited")
    code_before = records.code_version()
    status, output = finish(start("salt_tf.train", *tiny_argv(data, a, epochs=1)[1:]))
    assert status == 0, output[-3000:]

    shutil.copytree(a, edited)
    flags_path = os.path.join(edited, rundir.FLAGS_FILE)
    lines = open(flags_path).read().splitlines()
    assert f"--learning_rate={LR}" in lines
    rundir.write_text(flags_path, "\n".join(
        f"--learning_rate={EDITED_LR}" if line == f"--learning_rate={LR}" else line for line in lines) + "\n")

    # Both read the untouched data, so they may run side by side.
    same, changed_flag = start("salt_tf.runs", "reproduce", a), start("salt_tf.runs", "reproduce", edited)
    # Their trainings have read (and fingerprinted) every image once they log the data line: from then on the
    # data may change under them, and the third reproduction runs alongside instead of after them.
    read = {name: "".join(read_until(process, DATA_LOADED))
            for name, process in (("same", same), ("changed_flag", changed_flag))}
    change_one_training_image(data, a)
    changed_data = start("salt_tf.runs", "reproduce", a)
    results = {}
    for name, process in (("same", same), ("changed_flag", changed_flag), ("changed_data", changed_data)):
        status, output = finish(process)
        results[name] = (status, read.get(name, "") + output)
    return Lab(root=root, data=data, code_changed=records.code_version() != code_before, results=results)


def cli(capsys, *argv):
    status = runs.main(["runs"] + [str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def table(text):
    """Header names and rows (name, ..., last column) of a `list` table; the date holds one space."""
    lines = text.strip().splitlines()
    return lines[0].split(), [line.split() for line in lines[1:]]


# ------------------------------------------------------------------------------------------------ reproduce


def test_reproduce_of_an_untouched_run_is_bit_identical(lab):
    status, output = lab.results["same"]
    if lab.code_changed and status != 0:
        pytest.skip("the checkout was edited while the runs were made; identity was not expected")
    assert status == 0, output[-3000:]
    assert "PASS: bit-identical" in output and "FAIL" not in output
    copy = lab.run("a-reproduce-1")
    fa, fb = records.read_fingerprints(lab.run("a")), records.read_fingerprints(copy)
    assert sorted(fa) == sorted(fb) == [1] and fa == fb
    # The copy ran from the same flags: only where it lives differs.
    flags_a = rundir.parse_flagfile(open(os.path.join(lab.run("a"), rundir.FLAGS_FILE)).read())
    flags_b = rundir.parse_flagfile(open(os.path.join(copy, rundir.FLAGS_FILE)).read())
    assert {k for k in flags_a if flags_a[k] != flags_b.get(k)} == {"model_dir"}


REPRODUCE_SCHEDULES = [
    # (the run's flags.cfg, epochs completed, the schedule flags its reproduction must run with)
    (dict(lr_schedule="plateau", epochs="50"), 7, {"epochs": 7}),
    (dict(lr_schedule="plateau", epochs="50", swa_epochs="6"), 3, {"epochs": 3, "swa_epochs": 3}),
    (dict(lr_schedule="cosine", epochs="120", snapshot_cycles="3"), 88, {"epochs": 120, "snapshot_cycles": 3}),
    (dict(lr_schedule="cosine", epochs="120", snapshot_cycles="3"), 40, {"epochs": 40, "snapshot_cycles": 1}),
    (dict(lr_schedule="cosine", epochs="120", snapshot_cycles="3", swa_epochs="6"), 41,
     {"epochs": 80, "snapshot_cycles": 2}),
    (dict(lr_schedule="cosine", epochs="12", snapshot_cycles="3", swa_epochs="6"), 2,
     {"epochs": 4, "snapshot_cycles": 1, "swa_epochs": 4}),
]


@pytest.mark.parametrize("run_flags, completed, expected", REPRODUCE_SCHEDULES)
def test_reproduce_trains_whole_cosine_cycles_of_the_runs_length(run_flags, completed, expected):
    """A cosine schedule's --epochs sets its cycle length, so an unfinished cosine run is reproduced by its
    first whole cycles (the same schedule, bit for bit: test_reliability's growth test), not by --epochs=the
    epochs completed, which would anneal on another cycle length and diverge at epoch 1."""
    assert runs.reproduce_schedule(run_flags, completed) == expected


def test_reproduce_reports_an_edited_flag(lab):
    status, output = lab.results["changed_flag"]
    assert status == 1, output[-3000:]
    # Before training: flags.cfg contradicts the learning rate epoch 1 was trained at.
    assert f"--learning_rate={EDITED_LR}, but metrics.csv" in output
    # After: the consequence, found from the weights.
    assert "FAIL: weights diverge at epoch 1" in output and "PASS" not in output
    fa = records.read_fingerprints(lab.run("a"))
    fb = records.read_fingerprints(lab.run("a_edited-reproduce-1"))
    assert fa[1] != fb[1]


def test_reproduce_reports_changed_data(lab):
    status, output = lab.results["changed_data"]
    assert status == 1, output[-3000:]
    recorded = rundir.read_json(os.path.join(lab.run("a"), rundir.RECORD_FILE))["data"]["fingerprint"]
    now = kaggle.fingerprint(lab.data, kaggle.train_ids(lab.data))
    assert now != recorded
    assert f"before: data fingerprint differs: recorded {recorded[:12]}, now {now[:12]}" in output
    assert "FAIL: cannot expect identity: data fingerprint differs" in output
    # It still trained and compared: a changed training image changes the first epoch's weights.
    assert "weights diverge at epoch 1" in output
    copy = rundir.read_json(os.path.join(lab.run("a-reproduce-2"), rundir.RECORD_FILE))
    assert copy["data"]["fingerprint"] == now


def test_reproduce_refuses_a_used_directory(lab, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    status, out, err = cli(capsys, "reproduce", lab.run("a"), "--into", tmp_path / "taken")
    assert status == 2 and "must start from scratch" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "taken") == ["file"]


def test_reproduce_checks_the_init_checkpoint_first(lab, tmp_path):
    """A run started from another's weights can only be reproduced from the same weights: the check before
    training says when they are gone or changed, and the command passes the recorded folder."""
    source = tmp_path / "source_export"
    shutil.copytree(os.path.join(lab.run("a"), "export"), source)
    recorded = reference_weights_sha256(str(source))
    started = tmp_path / "started"
    shutil.copytree(lab.run("a"), started)
    records.update_record(str(started), init_checkpoint={"path": str(source), "weights_sha256": recorded})

    def init_problems():
        return [p for p in runs.check_before(run_table.load_run(str(started)))["problems"] if "init checkpoint" in p]

    assert init_problems() == []
    command = runs.reproduce_command(run_table.load_run(str(started)), "elsewhere", 1, runs.check_before(
        run_table.load_run(str(started))))
    assert command[-1] == f"--init_checkpoint={source}"
    data_file = next(source.glob("weights.data*"))
    content = data_file.read_bytes()
    data_file.write_bytes(content[:-1] + bytes([content[-1] ^ 0xFF]))
    assert init_problems() == [f"init checkpoint {source} changed: weights recorded {recorded[:12]}, "
                               f"now {reference_weights_sha256(str(source))[:12]}"]
    shutil.rmtree(source)
    assert init_problems() == [f"init checkpoint {source} is gone: the reproduction cannot start from the same "
                               "weights"]


# ------------------------------------------------------------------------------------------------ list


ALL = {"a", "a-reproduce-1", "a-reproduce-2", "a_edited", "a_edited-reproduce-1"}
EDITED = {"a_edited", "a_edited-reproduce-1"}


def test_list_shows_only_the_differing_flag(lab, capsys):
    status, out, _ = cli(capsys, "list", lab.root)
    assert status == 0
    header, rows = table(out)
    assert header == FIXED_COLUMNS + ["wall", "learning_rate"]
    assert {row[0] for row in rows} == ALL
    for row in rows:
        assert row[-1] == (EDITED_LR if row[0] in EDITED else LR)
        summary = rundir.read_json(os.path.join(lab.run(row[0]), rundir.RECORD_FILE))["summary"]
        assert row[3] == f"{summary['best_val_metric']:.4f}" and row[5] == str(summary["epochs_completed"])
    loaded = [run_table.load_run(lab.run(name)) for name in sorted(ALL)]
    assert run_table.differing_flags(loaded) == ["learning_rate"]
    assert run_table.differing_flags(loaded[:2]) == []  # a and its reproduction: nothing but model_dir


def test_list_where_filters(lab, capsys):
    _, out, _ = cli(capsys, "list", lab.root, "--where", f"learning_rate={EDITED_LR}")
    header, rows = table(out)
    assert {row[0] for row in rows} == EDITED and "learning_rate" not in header  # equal among these
    _, out, _ = cli(capsys, "list", lab.root, "--where", "learning_rate=1e-2", "--where", "deterministic=1")
    assert {row[0] for row in table(out)[1]} == ALL - EDITED
    status, _, err = cli(capsys, "list", lab.root, "--where", "no_such_flag=1")
    assert status == 2 and "no_such_flag" in err


def test_list_csv_reads_with_pandas(lab, capsys):
    _, out, _ = cli(capsys, "list", lab.root, "--csv", "--sort=best_val_metric")
    frame = pd.read_csv(io.StringIO(out), dtype={"learning_rate": str})
    assert list(frame.columns) == FIXED_COLUMNS + ["train_seconds_total", "learning_rate"]
    assert set(frame["name"]) == ALL and len(frame) == len(ALL)
    for row in frame.to_dict("records"):
        record = rundir.read_json(os.path.join(lab.run(row["name"]), rundir.RECORD_FILE))
        assert row["best_val_metric"] == pytest.approx(record["summary"]["best_val_metric"], rel=1e-12)
        assert row["train_seconds_total"] == pytest.approx(record["summary"]["train_seconds_total"], rel=1e-12)
        assert row["started"] == record["started"]
        assert row["learning_rate"] == (EDITED_LR if row["name"] in EDITED else LR)
    assert frame["best_val_metric"].is_monotonic_decreasing


def test_incomplete_runs_are_listed_not_crashed_on(lab, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(lab.run("a"), root / "finished")
    # Mid-training: epochs in metrics.csv, no summary yet. Crashed early: no metrics at all.
    shutil.copytree(lab.run("a"), root / "training")
    shutil.copytree(lab.run("a"), root / "crashed")
    for name in ("training", "crashed"):
        record = rundir.read_json(str(root / name / rundir.RECORD_FILE))
        del record["summary"]
        rundir.write_json(str(root / name / rundir.RECORD_FILE), record)
    os.remove(root / "crashed" / rundir.METRICS_FILE)
    (root / "not_a_run" / "deeper").mkdir(parents=True)

    status, out, _ = cli(capsys, "list", root, "--csv", "--sort=name")
    assert status == 0
    frame = pd.read_csv(io.StringIO(out)).set_index("name")
    assert list(frame.index) == ["crashed", "finished", "training"]
    assert frame.loc["crashed", ["best_val_metric", "best_epoch", "train_seconds_total"]].isna().all()
    summary = rundir.read_json(os.path.join(lab.run("a"), rundir.RECORD_FILE))["summary"]
    assert frame.loc["training", "best_val_metric"] == pytest.approx(summary["best_val_metric"])
    assert frame.loc["training", "epochs_completed"] == summary["epochs_completed"]
    status, out, _ = cli(capsys, "list", root)
    assert status == 0 and len(out.strip().splitlines()) == 4


# ------------------------------------------------------------------------------------------------ diff


def test_diff_reports_the_flag_the_curves_and_the_divergence(lab, tmp_path, capsys):
    a, b = lab.run("a"), lab.run("a_edited-reproduce-1")
    d = run_table.diff_runs(run_table.load_run(a), run_table.load_run(b))
    assert d["flags"] == {"learning_rate": (LR, EDITED_LR)}
    assert d["data"] == {} and d["weights"]["first_divergence"] == 1
    ma, mb = records.read_metrics(a), records.read_metrics(b)
    assert [r["epoch"] for r in d["curves"]] == list(ma["epoch"]) == list(mb["epoch"])
    for key in run_table.CURVE_KEYS:
        assert [r[f"{key}_a"] for r in d["curves"]] == list(ma[key])
        assert [r[f"{key}_b"] for r in d["curves"]] == list(mb[key])

    plot = tmp_path / "ab.png"
    status, out, _ = cli(capsys, "diff", a, b, f"--plot={plot}")
    assert status == 0
    assert f"  learning_rate: {LR} -> {EDITED_LR}" in out.splitlines()
    assert "weights: diverge at epoch 1" in out and "data: same" in out
    curve_line = next(line for line in out.splitlines() if line.split()[:1] == ["1"])
    assert curve_line.split() == ["1"] + [f"{m[k].iloc[0]:.4f}" for k in ("val_metric", "train_loss")
                                          for m in (ma, mb)]
    image = cv2.imread(str(plot))
    assert image is not None and image.shape[0] > 200 and image.shape[1] > 400
    for colour in curve_plot.CV2_COLOURS:  # both runs are drawn (in either renderer: same colours)
        assert (image == np.array(colour, np.uint8)).all(axis=-1).sum() > 10, colour


def test_diff_shows_a_changed_data_fingerprint(lab, capsys):
    a, b = lab.run("a"), lab.run("a-reproduce-2")
    fa, fb = (rundir.read_json(os.path.join(r, rundir.RECORD_FILE))["data"]["fingerprint"] for r in (a, b))
    assert fa != fb
    d = run_table.diff_runs(run_table.load_run(a), run_table.load_run(b))
    assert d["data"] == {"fingerprint": (fa, fb)} and d["flags"] == {}
    _, out, _ = cli(capsys, "diff", a, b)
    assert f"  fingerprint: {fa[:12]} -> {fb[:12]}" in out.splitlines()


def test_opencv_plot_draws_both_curves(tmp_path):
    curves = [{"epoch": e, "val_metric_a": 0.3 + 0.1 * e, "val_metric_b": 0.5, "train_loss_a": 1.0 / e,
               "train_loss_b": None if e == 3 else 0.9} for e in (1, 2, 3)]
    path = str(tmp_path / "plot.png")
    curve_plot.plot_curves_cv2(curves, ("runs/a", "runs/b"), path)
    image = cv2.imread(path)
    for colour in curve_plot.CV2_COLOURS:
        assert (image == np.array(colour, np.uint8)).all(axis=-1).sum() > 100
    # The two panels sit side by side: A's colour appears in both halves.
    left, right = image[:, : image.shape[1] // 2], image[:, image.shape[1] // 2:]
    for half in (left, right):
        assert (half == np.array(curve_plot.CV2_COLOURS[0], np.uint8)).all(axis=-1).any()


# ------------------------------------------------------------------------------------------------ edges


def test_reproduce_passes_data_dir_only_when_the_flagfile_names_another_folder(tmp_path, monkeypatch):
    """runs reproduce reads the folder of rundir's one rule, and passes --data_dir exactly when flags.cfg's own
    value, read from here, names another folder (or none)."""
    monkeypatch.chdir(tmp_path)
    started = str(tmp_path / "data")

    def run(flag, recorded):
        return run_table.Run(path="r", name="r", flags={"data_dir": flag} if flag else {},
                        record={"data": {"dir": recorded}} if recorded else {}, metrics=pd.DataFrame())

    assert runs.data_dir_for(run("data", started)) == (started, False)         # relative, started here
    assert runs.data_dir_for(run("data", "/else/data")) == ("/else/data", True)  # relative, started elsewhere
    assert runs.data_dir_for(run("/abs/data", "/moved")) == ("/abs/data", False)
    assert runs.data_dir_for(run("data", None)) == (started, False)            # no record: from here
    assert runs.data_dir_for(run(None, "/else/data")) == ("/else/data", True)
    with pytest.raises(run_table.RunError, match=r"^r: no data folder recorded .*--data_dir="):
        runs.data_dir_for(run(None, None))


@pytest.mark.parametrize("argv, message", [
    (["list", "{tmp}/missing"], "{tmp}/missing: no such directory"),
    (["diff", "{tmp}", "{tmp}"], "{tmp}: not a salt_tf run directory (no flags.cfg)"),
    (["reproduce", "{tmp}/x"], "{tmp}/x: no such directory"),
])
def test_bad_paths_stop_with_one_line(tmp_path, capsys, argv, message):
    status, out, err = cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert status == 2 and out == ""
    assert err.strip() == "error: " + message.format(tmp=tmp_path)


def test_subcommands_have_their_own_help_and_one_line_errors(tmp_path, capsys):
    status, out, _ = cli(capsys, "--help")
    assert status == 0
    assert [line.split()[0] for line in out.split("commands:\n")[1].split("\n\n")[0].splitlines()] == \
        ["list", "diff", "reproduce", "release"]
    for command, own in [("list", {"sort", "where", "csv"}), ("diff", {"plot"}), ("reproduce", {"into"}),
                         ("release", {"into", "model", "max_mb", "replace", "float16", "data_dir"})]:
        status, out, _ = cli(capsys, command, "--help")
        assert status == 0 and out.startswith(f"usage: python -m salt_tf.runs {command} ")
        assert set(re.findall(r"^  --(?:\[no\])?(\w+):", out, flags=re.M)) == own | {"flagfile", "undefok"}
    for argv, expected in [([], "a command is needed; the commands are list, diff, reproduce, release"),
                           (["lst", tmp_path], "unknown command 'lst'"),
                           (["--csv", "list", tmp_path], "the command comes before the flags (--csv)"),
                           (["list"], "python -m salt_tf.runs list needs LOG_ROOT"),
                           (["diff", tmp_path], "python -m salt_tf.runs diff needs RUN_B"),
                           (["reproduce", tmp_path, "extra"], "unexpected arguments: extra"),
                           (["release"], "python -m salt_tf.runs release needs RUN"),
                           (["list", tmp_path, "--sort=size"], "--sort"),
                           (["list", tmp_path / "none"], "none: no such directory"),
                           (["diff", tmp_path, tmp_path, "--plots=x.png"], "Unknown command line flag 'plots'")]:
        status, out, err = cli(capsys, *argv)
        assert status == 2 and out == "", argv
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, (argv, err)

