"""salt_tf.rundir: the writers' exact bytes and failure behaviour, export discovery, the data-folder rule, and
that it never pulls in TensorFlow. No TensorFlow here either: these tests run in a second or two."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from salt_tf import rundir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# -------------------------------------------------------------------------------------------------- import


def test_importing_rundir_and_its_users_in_the_data_layer_loads_no_tensorflow():
    code = ("import sys; import salt_tf.rundir, salt_tf.records, salt_tf.runs, salt_tf.run_table, "
            "salt_tf.curve_plot, salt_tf.data.splits, salt_tf.data.synthetic, salt_tf.ensemble; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'cv2')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tensorflow" not in result.stdout and "keras" not in result.stdout, result.stdout


def test_rundir_imports_nothing_of_salt_tf():
    code = ("import sys; import salt_tf.rundir; "
            "print(sorted(m for m in sys.modules if m.startswith('salt_tf') or m in ('cv2', 'pandas', 'numpy')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "['salt_tf', 'salt_tf.rundir']", result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------- writers


def test_write_text_and_bytes_are_exact_and_replace(tmp_path):
    path = str(tmp_path / "a.txt")
    rundir.write_text(path, "first\n")
    rundir.write_text(path, "zweite Zeile: ä\r\nno translation\n")
    assert open(path, "rb").read() == "zweite Zeile: ä\r\nno translation\n".encode("utf-8")
    rundir.write_bytes(path, b"\x00\xff")
    assert open(path, "rb").read() == b"\x00\xff"
    assert listing(tmp_path) == ["a.txt"]


def test_write_json_formats(tmp_path):
    payload = {"b": [1, 2.5, None], "a": {"z": True, "y": "text"}, "n": 1e-7}
    path = str(tmp_path / "x.json")
    rundir.write_json(path, payload)
    assert open(path, "rb").read() == (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
    # An export's model.json: no final newline (as json.dump writes it).
    rundir.write_json(path, payload, final_newline=False)
    assert open(path, "rb").read() == json.dumps(payload, indent=2, sort_keys=True).encode()
    # record.json: what JSON cannot encode becomes text.
    rundir.write_json(path, {"seed": np.int64(3), "when": object}, default=str)
    assert rundir.read_json(path) == {"seed": "3", "when": str(object)}


def test_write_csv_is_what_pandas_writes_to_a_file(tmp_path):
    frame = pd.DataFrame({"epoch": [1, 2, 3], "val_metric": [0.1 + 0.2, 1 / 3, float("nan")],
                          "learning_rate": [np.float32(0.003), np.float32(1e-4), np.float32(3e-7)],
                          "id": ["0a1b", "007", "x,y"]})
    reference = str(tmp_path / "reference.csv")
    frame.to_csv(reference, index=False)
    path = str(tmp_path / "metrics.csv")
    rundir.write_csv(path, frame)
    assert open(path, "rb").read() == open(reference, "rb").read()
    assert b"0.30000000000000004" in open(path, "rb").read()  # full float precision, as pandas writes it


@pytest.mark.parametrize("array", [
    np.arange(101 * 101, dtype=np.uint16).reshape(101, 101),                       # a 16-bit mask
    (np.arange(101 * 101) % 251).astype(np.uint8).reshape(101, 101),               # 8-bit gray
    np.repeat((np.arange(101 * 101) % 7).astype(np.uint8).reshape(101, 101, 1), 3, axis=2),  # equal RGB
])
def test_write_png_is_cv2s_encoding_and_decodes_back(tmp_path, array):
    path = str(tmp_path / "image.png")
    rundir.write_png(path, array)
    data = open(path, "rb").read()
    assert data == cv2.imencode(".png", array)[1].tobytes()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_unencodable_json_raises_before_touching_the_old_file(tmp_path):
    path = str(tmp_path / "ensemble.json")
    rundir.write_json(path, {"old": 1})
    before = open(path, "rb").read()
    with pytest.raises(TypeError):
        rundir.write_json(path, {"new": object()})
    assert open(path, "rb").read() == before and listing(tmp_path) == ["ensemble.json"]


@pytest.mark.parametrize("write", [
    lambda p: rundir.write_text(p, "new\n"),
    lambda p: rundir.write_json(p, {"new": 2}),
    lambda p: rundir.write_csv(p, pd.DataFrame({"a": [1]})),
    lambda p: rundir.write_png(p, np.zeros((4, 4), np.uint8)),
])
def test_a_failing_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, write):
    path = str(tmp_path / "file")
    rundir.write_text(path, "old\n")

    def fail(src, dst):
        raise OSError(28, "No space left on device", dst)

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write(path)
    assert open(path).read() == "old\n"
    assert listing(tmp_path) == ["file"]


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.csv")
    rundir.write_text(path, "old\n")

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output"):
        rundir.write_text(path, "new\n")
    assert open(path).read() == "old\n" and listing(tmp_path) == ["metrics.csv"]


def test_staged_dir_replaces_a_folder_whole(tmp_path):
    final = str(tmp_path / "run" / "export")
    with rundir.staged_dir(final) as staging:  # parents created
        assert os.path.isdir(staging) and rundir.is_temporary(os.path.basename(staging))
        open(os.path.join(staging, "model.json"), "w").write("1")
    assert listing(final) == ["model.json"]
    with rundir.staged_dir(final) as staging:
        open(os.path.join(staging, "weights.index"), "w").write("2")
    assert listing(final) == ["weights.index"]  # the old content is gone, not merged
    assert listing(tmp_path / "run") == ["export"]  # no staging or retired folder left


def test_staged_dir_failure_keeps_the_old_folder_and_removes_the_staging(tmp_path):
    final = str(tmp_path / "export")
    with rundir.staged_dir(final) as staging:
        open(os.path.join(staging, "model.json"), "w").write("old")
    with pytest.raises(RuntimeError):
        with rundir.staged_dir(final) as staging:
            open(os.path.join(staging, "model.json"), "w").write("new")
            raise RuntimeError("the weights did not write")
    assert open(os.path.join(final, "model.json")).read() == "old"
    assert listing(tmp_path) == ["export"]


@pytest.mark.parametrize("name, temporary", [
    ("metrics.csv.tmp1234", True), ("export.old99", True), ("step-3_temp", True),
    ("checkpoint.tmp9f8e7d", True), ("metrics.csv", False), ("export", False), ("step-3.index", False),
    ("snapshot-2", False),
])
def test_is_temporary(name, temporary):
    assert rundir.is_temporary(name) is temporary


# ------------------------------------------------------------------------------------------------- exports


def make_export(folder, epoch=1):
    os.makedirs(folder, exist_ok=True)
    rundir.write_json(os.path.join(folder, rundir.EXPORT_CONFIG), {"model": {}, "epoch": epoch})
    return str(folder)


def test_export_dirs_of_a_run_prefers_snapshots_in_numeric_order(tmp_path):
    run = str(tmp_path / "run")
    make_export(os.path.join(run, "export"))
    for k in (10, 2, 0):
        make_export(rundir.snapshot_dir(run, k))
    os.makedirs(os.path.join(run, "snapshots", "snapshot-5"))          # no model.json: not an export
    os.makedirs(os.path.join(run, "snapshots", "snapshot-x"))          # not a snapshot name
    make_export(os.path.join(run, "snapshots", "snapshot-7.tmp123"))   # a staging folder: ignored
    assert rundir.export_dirs(run) == [os.path.join(run, "snapshots", f"snapshot-{k}") for k in (0, 2, 10)]


def test_run_exports_lists_export_swa_then_snapshots_in_numeric_order(tmp_path):
    run = str(tmp_path / "run")
    for k in (10, 2):
        make_export(rundir.snapshot_dir(run, k))
    make_export(os.path.join(run, "swa"))
    make_export(os.path.join(run, "snapshots", "snapshot-7.tmp123"))   # a staging folder: ignored
    os.makedirs(os.path.join(run, "export"))                           # no model.json: not an export
    assert rundir.run_exports(run) == [os.path.join(run, "swa")] + [
        os.path.join(run, "snapshots", f"snapshot-{k}") for k in (2, 10)]
    make_export(os.path.join(run, "export"))
    assert rundir.run_exports(run)[:2] == [os.path.join(run, "export"), os.path.join(run, "swa")]
    assert rundir.run_exports(str(tmp_path / "empty")) == []


def test_export_dirs_of_a_run_without_snapshots_is_its_export(tmp_path):
    run = str(tmp_path / "run")
    make_export(os.path.join(run, "export"))
    os.makedirs(os.path.join(run, "snapshots"))
    assert rundir.export_dirs(run) == [os.path.join(run, "export")]


@pytest.mark.parametrize("sub", ["export", "swa", os.path.join("snapshots", "snapshot-3")])
def test_an_export_folder_stands_for_itself_and_knows_its_run(tmp_path, sub):
    run = tmp_path / "run"
    folder = make_export(run / sub)
    make_export(run / "export")
    assert rundir.export_dirs(folder) == [folder]
    assert rundir.source_run_dir(folder) == str(run)
    assert rundir.source_run_dir(folder + os.sep) == str(run)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "not found"),
    (lambda p: (p / "file").write_text("x") and p / "file", "is a file"),
    (lambda p: p, "no exported model"),
])
def test_export_dirs_errors_are_one_line(tmp_path, make, message):
    path = str(make(tmp_path))
    with pytest.raises(rundir.RunDirError) as error:
        rundir.export_dirs(path)
    text = str(error.value)
    assert text.startswith(f"{path}: {message}") and "\n" not in text


# ----------------------------------------------------------------------------------- flags.cfg, data folder


def test_parse_flagfile():
    text = "# comment\n\n--learning_rate=0.01\n--hflip\n--nouse_depth\n--loss=bce:1,dice:1\n--seed=1\n--seed=2\n"
    assert rundir.parse_flagfile(text) == {"learning_rate": "0.01", "hflip": "true", "use_depth": "false",
                                           "loss": "bce:1,dice:1", "seed": "2"}


def make_run(folder, data_dir=None, recorded=None):
    os.makedirs(folder, exist_ok=True)
    rundir.write_text(os.path.join(folder, rundir.FLAGS_FILE),
                      "--seed=1\n" + (f"--data_dir={data_dir}\n" if data_dir else ""))
    if recorded is not None:
        rundir.write_json(os.path.join(folder, rundir.RECORD_FILE), {"data": {"dir": recorded}})
    return str(folder)


def test_a_relative_data_dir_means_the_folder_record_json_holds(tmp_path, monkeypatch):
    started_in = tmp_path / "repo"
    (started_in / "demo_data").mkdir(parents=True)
    (tmp_path / "elsewhere" / "demo_data").mkdir(parents=True)  # the same relative name, other data
    run = make_run(tmp_path / "run", "demo_data", str(started_in / "demo_data"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert rundir.data_dir(run) == str(started_in / "demo_data")


def test_an_absolute_data_dir_is_the_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    run = make_run(tmp_path / "run", str(data), str(tmp_path / "recorded_before_a_move"))
    assert rundir.data_dir(run) == str(data)


def test_without_record_a_relative_data_dir_is_read_from_here(tmp_path, monkeypatch):
    (tmp_path / "demo_data").mkdir()
    run = make_run(tmp_path / "run", "demo_data")
    monkeypatch.chdir(tmp_path)
    assert rundir.data_dir(run) == str(tmp_path / "demo_data")


def test_without_a_flag_the_record_names_the_folder(tmp_path):
    (tmp_path / "data").mkdir()
    run = make_run(tmp_path / "run", None, str(tmp_path / "data"))
    assert rundir.data_dir(run) == str(tmp_path / "data")


def test_no_data_folder_anywhere_is_a_one_line_error_naming_the_fix(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(rundir.RunDirError) as error:
        rundir.data_dir(run)
    assert str(error.value).startswith(f"{run}: no data folder recorded") and "--data_dir=" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_data_folder_that_is_gone(tmp_path):
    run = make_run(tmp_path / "run", "demo_data", str(tmp_path / "gone"))
    with pytest.raises(rundir.RunDirError) as error:
        rundir.data_dir(run)
    assert str(error.value) == (f"{run}: the run's data folder {tmp_path / 'gone'} is not found; pass "
                                "--data_dir=<labelled folder>")
    assert rundir.data_dir(run, must_exist=False) == str(tmp_path / "gone")
