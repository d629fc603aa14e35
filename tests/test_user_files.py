"""Nothing of the user's is overwritten or silently changed (issue 38): each way a careless or unlucky command
could lose or silently change a user's file or run stops with one `error:` line, exit 2, every file byte-identical
and nothing written, before TensorFlow trains anything."""

import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from absl import flags
from absl.testing import flagsaver

from salt_tf import cv, ensemble, exports, postprocess, predict, rundir, train
from salt_tf import flags as salt_flags
from salt_tf.data import kaggle, splits, synthetic
from test_reliability import directory_contents as tree_bytes, edit_flagfile  # {path: bytes} but the lock
from train_helpers import REPO_ROOT, run_tiny, tiny_argv

FLAGS = flags.FLAGS


def run_train(argv, capsys):
    """The train entry point as a user runs it, in this process: (exit status, the `error:` lines)."""
    salt_flags.define_flags()
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        FLAGS.unparse_flags()
        train.main(train.parse_flags(argv))
    err = capsys.readouterr().err
    return exit_info.value.code, [line for line in err.splitlines() if line.startswith("error:")]


def run_in_process(argv):
    """Parses a train command line as the command does and runs it here (FLAGS restored); the final summary."""
    salt_flags.define_flags()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        train.parse_train_argv(argv)
        return train.run()


def copy_run(source, target):
    shutil.copytree(source, target)
    return str(target)


# ------------------------------------------------------------------------------------------ 1. predict's outputs


@pytest.fixture()
def test_folder(demo_dir, tmp_path):
    """A copy of the demo set's test folder in the Kaggle layout (<root>/test/images, <root>/depths.csv)."""
    root = tmp_path / "tgs"
    shutil.copytree(demo_dir, root)
    return str(root)


def refused_submit(capsys, *argv):
    status = predict.main(["predict", "submit", *argv])
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.startswith("error:")]


def test_predict_never_writes_over_its_inputs(tiny_run_1_epoch, test_folder, tmp_path, capsys):
    images = os.path.join(test_folder, "test", "images")
    first_png = os.path.join(images, sorted(os.listdir(images))[0])
    os.symlink(images, tmp_path / "link")
    before = tree_bytes(test_folder)
    model = f"--model_dir={tiny_run_1_epoch}"
    cases = {
        "masks into the images": ([f"--images={images}", f"--output={tmp_path / 's.csv'}", f"--masks_dir={images}"],
                                  "--masks_dir=", "is the --images folder"),
        "masks into the images by a symlink": ([f"--images={images}", f"--output={tmp_path / 's.csv'}",
                                               f"--masks_dir={tmp_path / 'link'}"], "--masks_dir=", "--images folder"),
        "output an input PNG": ([f"--images={images}", f"--output={first_png}"], "--output=", "is a file of --images"),
        "output the depths CSV": ([f"--images={images}", f"--output={os.path.join(test_folder, 'depths.csv')}"],
                                  "--output=", "is the depths CSV"),
    }
    for case, (argv, flag, text) in cases.items():
        status, lines = refused_submit(capsys, model, *argv)
        assert status == 2 and len(lines) == 1 and flag in lines[0] and text in lines[0], (case, lines)
        assert tree_bytes(test_folder) == before, case
        assert not (tmp_path / "s.csv").exists(), case
    # The other side of the rule: a new file in the images folder is no input (it is written).
    new_output = os.path.join(images, "..", "submission.csv")
    status, lines = refused_submit(capsys, model, f"--images={images}", f"--output={new_output}", "--batch_size=4")
    assert status == 0 and not lines and os.path.isfile(new_output)


# ------------------------------------------------------------------------------------------ 2. the demo set


def test_demo_dataset_never_writes_over_another_folder(demo_dir, tmp_path, capsys):
    real = str(tmp_path / "real")
    shutil.copytree(demo_dir, real)
    os.remove(os.path.join(real, synthetic.MARKER_FILE))  # a Kaggle-layout folder the demo did not write
    before = tree_bytes(real)
    model_dir = str(tmp_path / "run")
    status, lines = run_train(tiny_argv(real, model_dir, dataset="demo", demo_images=64), capsys)
    assert status == 2 and len(lines) == 1, lines
    assert f"--dataset=demo --data_dir={real}: that folder holds files that are not the demo set" in lines[0]
    assert "--dataset=kaggle" in lines[0]
    assert tree_bytes(real) == before and not os.path.exists(model_dir)
    # Any stray file counts, not only a data set; an empty folder is the demo's to fill.
    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "todo.txt").write_text("mine")
    assert synthetic.foreign_files(str(stray), 0) == ["todo.txt"]
    (stray / "todo.txt").unlink()
    assert synthetic.foreign_files(str(stray), 0) == []


def test_demo_sets_with_or_without_the_marker_are_the_demos(tmp_path):
    marked = str(tmp_path / "marked")
    synthetic.generate(marked, num_images=4, seed=0, num_test=1)
    assert os.path.isfile(os.path.join(marked, synthetic.MARKER_FILE)) and synthetic.foreign_files(marked, 0) == []
    # A demo set written before the marker existed: known by train.csv's first id, the seed's first draw.
    os.remove(os.path.join(marked, synthetic.MARKER_FILE))
    assert pd.read_csv(os.path.join(marked, "train.csv"), dtype=str)["id"][0] == synthetic.first_id(0)
    assert synthetic.foreign_files(marked, 0) == []
    assert synthetic.foreign_files(marked, 1) == sorted(os.listdir(marked))  # another seed's first id


def test_demo_data_process_prints_its_error_once(demo_dir, tmp_path):
    """The real process: the one `error:` line, and its text nowhere else (no absl E-line repeating it)."""
    real = str(tmp_path / "real")
    shutil.copytree(demo_dir, real)
    os.remove(os.path.join(real, synthetic.MARKER_FILE))
    argv = tiny_argv(real, str(tmp_path / "run"), dataset="demo", demo_images=64)[1:]
    done = subprocess.run([sys.executable, "-m", "salt_tf.train", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    assert output.count("that folder holds files that are not the demo set") == 1, output[-2000:]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ 3-9. run directories


def set_run_model_dir(run_dir):
    """Makes a copied run's flags.cfg and record.json name run_dir, as if it had been trained there."""
    edit_flagfile(run_dir, model_dir=run_dir)  # record.json's "flags" too


def test_split_that_lost_rows_is_not_resumed(tiny_run_1_epoch, demo_dir, tmp_path, capsys):
    run_dir = copy_run(tiny_run_1_epoch, tmp_path / "run")
    split_path = os.path.join(run_dir, rundir.SPLIT_FILE)
    split = pd.read_csv(split_path, dtype=str)
    split.drop(index=[0, 1, 2]).to_csv(split_path, index=False)
    dropped = split.iloc[:3]["role"].value_counts()
    train_now, val_now = 128 - dropped.get("train", 0), 32 - dropped.get("val", 0)
    before = tree_bytes(run_dir)
    status, lines = run_train(tiny_argv(demo_dir, run_dir, epochs=2), capsys)
    assert status == 2 and len(lines) == 1, lines
    assert (f"{split_path} has {train_now} training and {val_now} validation images, but the run trained on 128 and "
            "validated on 32") in lines[0], lines
    assert tree_bytes(run_dir) == before
    # A missing split.csv is recomputed from the flags: the same split, so the run resumes (exact recovery).
    os.remove(split_path)
    written = open(os.path.join(tiny_run_1_epoch, rundir.SPLIT_FILE), "rb").read()
    run_tiny(demo_dir, run_dir, epochs=1)  # finished: nothing to train
    assert open(split_path, "rb").read() == written


def test_copied_run_is_resumed_only_where_it_is(tiny_run_1_epoch, demo_dir, tmp_path, capsys):
    original = copy_run(tiny_run_1_epoch, tmp_path / "A")
    set_run_model_dir(original)
    copied = copy_run(original, tmp_path / "B")  # cp -a A B
    before_a, before_b = tree_bytes(original), tree_bytes(copied)
    flagfile = os.path.join(copied, rundir.FLAGS_FILE)
    status, lines = run_train(["train", f"--flagfile={flagfile}"], capsys)
    assert status == 2 and len(lines) == 1, lines
    assert f"--flagfile={flagfile} belongs to the run in {copied} but names --model_dir={original}" in lines[0]
    assert f"add --model_dir={copied}" in lines[0]
    assert tree_bytes(original) == before_a and tree_bytes(copied) == before_b
    # The refusal of other flags on B advises the command that resumes B, not A.
    status, lines = run_train(["train", f"--flagfile={flagfile}", f"--model_dir={copied}", "--learning_rate=0.5"],
                              capsys)
    assert status == 2 and f"--flagfile={flagfile} --model_dir={copied};" in lines[0], lines
    # Following the advice resumes B (finished: nothing to train) and leaves A alone.
    assert run_in_process(["train", f"--flagfile={flagfile}", f"--model_dir={copied}"])["epochs_completed"] == 1
    assert tree_bytes(original) == before_a
    assert rundir.read_flagfile(copied)["model_dir"] == copied


def test_hand_edited_flags_cfg_is_not_ignored(tiny_run_1_epoch, demo_dir, tmp_path, capsys):
    run_dir = copy_run(tiny_run_1_epoch, tmp_path / "run")
    set_run_model_dir(run_dir)
    path = os.path.join(run_dir, rundir.FLAGS_FILE)
    text = open(path).read()
    assert "--learning_rate=0.01\n" in text
    open(path, "w").write(text.replace("--learning_rate=0.01\n", "--learning_rate=0.001\n"))
    before = tree_bytes(run_dir)
    status, lines = run_train(["train", f"--flagfile={path}", "--epochs=2"], capsys)
    assert status == 2 and len(lines) == 1, lines
    assert f"{path} was edited after the run wrote it (learning_rate: 0.01 -> 0.001)" in lines[0], lines
    assert tree_bytes(run_dir) == before
    from salt_tf import run_table, runs  # runs reproduce names the edit before it trains anything

    assert runs.flags_vs_record(run_table.load_run(run_dir)) == [
        "--learning_rate=0.001, but metrics.csv (epoch 1 trained at it) says 0.01"]
    assert "--base_width=4\n" in text  # a flag only record.json's "flags" witnesses
    open(path, "w").write(text.replace("--base_width=4\n", "--base_width=8\n"))
    assert runs.flags_vs_record(run_table.load_run(run_dir)) == ["--base_width=8, but record.json says 4"]
    # What a resume may change anyway (where the data lives) is no edit to refuse.
    open(path, "w").write(text.replace(f"--data_dir={demo_dir}", f"--data_dir={os.path.join(demo_dir, '.')}"))
    assert train.check_flags_cfg_edits(run_dir, rundir.read_flagfile(run_dir),
                                       rundir.read_json(os.path.join(run_dir, rundir.RECORD_FILE))["flags"]) is None


@pytest.mark.parametrize("name", [rundir.RECORD_FILE, rundir.FINGERPRINTS_FILE])
def test_truncated_record_files_stop_the_resume_before_any_write(name, tiny_run_1_epoch, demo_dir, tmp_path, capsys):
    run_dir = copy_run(tiny_run_1_epoch, tmp_path / "run")
    path = os.path.join(run_dir, name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    before = tree_bytes(run_dir)
    status, lines = run_train(tiny_argv(demo_dir, run_dir, epochs=2), capsys)
    assert status == 2 and len(lines) == 1, lines
    assert f"{path} is damaged (not readable JSON" in lines[0] and "restore it from a copy of the run" in lines[0]
    assert tree_bytes(run_dir) == before  # flags.cfg and record.json untouched


def test_damaged_init_checkpoint_stops_before_the_run_directory_exists(tiny_run_1_epoch, demo_dir, tmp_path,
                                                                        capsys):
    source = copy_run(tiny_run_1_epoch, tmp_path / "source")
    export = os.path.join(source, rundir.EXPORT_DIR)
    data_file = [n for n in os.listdir(export) if n.startswith(rundir.EXPORT_WEIGHTS + ".data")][0]
    content = open(os.path.join(export, data_file), "rb").read()
    open(os.path.join(export, data_file), "wb").write(content[: len(content) // 2])
    model_dir = str(tmp_path / "new")
    status, lines = run_train(tiny_argv(demo_dir, model_dir, init_checkpoint=source, epochs=1), capsys)
    assert status == 2 and len(lines) == 1, lines
    assert f"--init_checkpoint={source}: the weights in {export} are damaged" in lines[0], lines
    assert not os.path.exists(model_dir)


def test_another_runs_ensemble_json_is_refused(tiny_run_1_epoch, demo_dir, tmp_path, capsys):
    """Same model name and epoch, other weights (another seed's run): the hash of the weights tells them apart."""
    mine = copy_run(tiny_run_1_epoch, tmp_path / "mine")
    other = copy_run(tiny_run_1_epoch, tmp_path / "other")
    other_export = os.path.join(other, rundir.EXPORT_DIR)
    # Other weights under the same model.json (name, epoch): one weight byte changed stands for another seed's
    # run (the check reads no tensor, so the bytes need not be a model's).
    data_file = os.path.join(other_export, [n for n in os.listdir(other_export) if ".data-" in n][0])
    content = bytearray(open(data_file, "rb").read())
    content[len(content) // 2] ^= 0xFF
    open(data_file, "wb").write(bytes(content))
    entries = exports.find_exports(other)
    assert [e.weights_sha256() for e in entries] != [e.weights_sha256() for e in exports.find_exports(mine)]
    choice = ensemble.Ensemble(models=[e.info() for e in entries], tta=["none"], combine="mean",
                               postprocessing=postprocess.PostProcessing(threshold=0.99))
    choice.save(os.path.join(other, rundir.ENSEMBLE_FILE))
    shutil.copy(os.path.join(other, rundir.ENSEMBLE_FILE), mine)
    output = tmp_path / "s.csv"
    images = os.path.join(demo_dir, "test", "images")
    status, lines = refused_submit(capsys, f"--model_dir={mine}", f"--images={images}", f"--output={output}")
    assert status == 2 and len(lines) == 1, lines
    assert "fitted on other weights than those of export" in lines[0] and "--nouse_ensemble" in lines[0], lines
    assert not output.exists()
    # Its own run accepts it: the check is the hash, not the file's presence.
    assert exports.load_ensemble(other, entries).postprocessing.threshold == 0.99


# ------------------------------------------------------------------------------------------ 7. folds


def test_check_folds_agrees_with_the_folds_kfold_makes():
    """check_folds (a formula) against the folds themselves (splits.kfold), brute force over small cases,
    both sides of each boundary included."""
    rng = np.random.default_rng(0)
    for images, folds, batch in itertools.product(range(2, 26), range(2, 30), (1, 4, 8)):
        coverage = rng.random(images) * (rng.random(images) < 0.6)
        frame = splits.kfold([f"{i:04d}" for i in range(images)], coverage, folds, seed=3)
        sizes = np.bincount(frame["fold"], minlength=folds)
        ok = sizes.min() >= 1 and images - sizes.max() >= batch
        try:
            splits.check_folds(images, folds, batch)
            refused = False
        except kaggle.DataError:
            refused = True
        assert refused == (not ok), (images, folds, batch, sizes)


def test_too_many_folds_stop_train_and_cv_before_anything_is_written(demo_dir, tmp_path, capsys):
    model_dir = str(tmp_path / "fold")
    argv = [a for a in tiny_argv(demo_dir, model_dir, folds=200, fold=0) if not a.startswith("--val_images")]
    status, lines = run_train(argv, capsys)
    assert status == 2 and len(lines) == 1, lines
    assert "--folds=200 with 160 labelled images leaves 40 folds without a validation image" in lines[0], lines
    assert not os.path.exists(model_dir)
    # cv train: checked for the whole K-fold before fold 0 starts (fold 0 itself would have images).
    parent = str(tmp_path / "cv")
    argv = [a for a in tiny_argv(demo_dir, "x")[1:] if not a.startswith(("--model_dir", "--val_images"))]
    with pytest.raises(cv.CVError, match="--folds=161 with 160 labelled images leaves 1 folds without"):
        cv.plan_folds(parent, argv + ["--folds=161"])
    assert cv.plan_folds(parent, argv + ["--folds=160"])[0] == 160  # one validation image per fold
    assert not os.path.exists(parent)


# ------------------------------------------------------------------------------------------ 10. what a message says


def test_model_dir_that_is_an_export_or_a_data_folder_is_refused(tiny_run_1_epoch, demo_dir, tmp_path, capsys):
    source = copy_run(tiny_run_1_epoch, tmp_path / "source")
    data = str(tmp_path / "data")
    shutil.copytree(demo_dir, data)
    cases = {os.path.join(source, rundir.EXPORT_DIR): "is an exported model",
             data: "is a data folder (in --data_dir)",
             os.path.join(data, "train", "images"): "is a data folder (in --data_dir)"}
    for model_dir, text in cases.items():
        before = tree_bytes(model_dir)
        status, lines = run_train(tiny_argv(data, model_dir, epochs=1), capsys)
        assert status == 2 and len(lines) == 1 and f"--model_dir={model_dir} {text}" in lines[0], lines
        assert tree_bytes(model_dir) == before
    # A Kaggle download given as --model_dir with the data elsewhere: known by its train.csv.
    status, lines = run_train(tiny_argv(demo_dir, data, epochs=1), capsys)
    assert status == 2 and "is a data folder (it holds train.csv)" in lines[0], lines


def test_extra_data_dir_errors_name_that_flag(demo_dir, tmp_path, capsys):
    extra = str(tmp_path / "extra")
    shutil.copytree(demo_dir, extra)
    os.remove(os.path.join(extra, "depths.csv"))
    status, lines = run_train(tiny_argv(demo_dir, str(tmp_path / "run"), extra_data_dir=extra), capsys)
    assert status == 2 and len(lines) == 1, lines
    assert "depths.csv: file not found; is --extra_data_dir a folder in the Kaggle layout" in lines[0], lines
    assert "--data_dir" not in lines[0]


def test_cv_train_without_folds_says_so_first(tmp_path):
    argv = ["--dataset=demo", f"--data_dir={tmp_path / 'demo'}", "--demo_images=64", "--batch_size=8"]
    with pytest.raises(cv.CVError, match=r"cv train needs --folds=K with K >= 2 \(got --folds=0\)"):
        cv.plan_folds(str(tmp_path / "cv"), argv)  # --val_images=400 > 64 images is no matter here
    assert not os.path.exists(tmp_path / "cv") and not os.path.exists(tmp_path / "demo")


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch, capsys):
    from salt_tf import cli

    def full(fd):
        raise OSError(28, "No space left on device")  # as write()/fsync() raise it: no file name

    monkeypatch.setattr(os, "fsync", full)
    target = str(tmp_path / "submission.csv")
    assert cli.run_reporting(lambda: rundir.write_text(target, "id,rle_mask\n") or 0, (), lambda: "") == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: cannot write {target}: No space left on device; check the folder's permissions and "
                   "free space"], err
    assert os.listdir(tmp_path) == []


def test_evaluate_warns_when_the_data_changed_under_the_same_ids(tiny_run_1_epoch, demo_dir, tmp_path, capsys):
    import cv2

    data = str(tmp_path / "data")
    shutil.copytree(demo_dir, data)
    run_dir = copy_run(tiny_run_1_epoch, tmp_path / "run")
    argv = ["predict", "evaluate", f"--model_dir={run_dir}", "--nowrite_ensemble", "--tta=none", "--batch_size=16"]
    assert predict.main(argv + [f"--data_dir={data}"]) == 0
    assert "warning:" not in capsys.readouterr().err  # the same images elsewhere: no warning
    image = os.path.join(data, "train", "images", f"{kaggle.train_ids(data)[-1]}.png")
    cv2.imwrite(image, 255 - cv2.imread(image, cv2.IMREAD_GRAYSCALE))
    assert predict.main(argv + [f"--data_dir={data}"]) == 0
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "holds other images or masks than the run" in warnings[0], warnings


def test_reproduce_on_moved_data_names_a_command_that_takes_the_new_folder(tiny_run_1_epoch, tmp_path):
    from salt_tf import run_table, runs

    run_dir = copy_run(tiny_run_1_epoch, tmp_path / "run")
    gone = str(tmp_path / "moved-away")
    edit_flagfile(run_dir, data_dir=gone)
    with pytest.raises(runs.RunError) as raised:
        runs.check_before(run_table.load_run(run_dir))
    message = str(raised.value)
    assert f"put the data back at {gone}" in message and "python -m salt_tf.train --flagfile=" in message
    assert "--data_dir=<new folder>" in message and "--data_dir the folder" not in message


# ------------------------------------------------------------------------------------------ while there


def test_validation_tiles_carry_each_images_id_and_score(tmp_path):
    import tensorflow as tf

    from salt_tf import summaries
    from test_summaries import accumulate

    images = np.stack([np.full((101, 101), 20 * (k + 1) / 255.0, np.float32) for k in range(6)])
    truth = np.zeros((6, 101, 101), bool)
    scores = np.array([0.4, 0.9, 0.2, 1.0, 0.8, 0.1])
    ids = [f"id{k}" for k in range(6)]
    writer = summaries.Summaries(str(tmp_path), images=0, worst_images=3)
    writer.validation_images(images, truth, np.zeros((6, 101, 101), np.float32), scores, step=1, ids=ids)
    writer.close()
    val = accumulate(os.path.join(tmp_path, "events", "val"))
    text = tf.make_ndarray(val.Tensors("worst_images_ids")[-1].tensor_proto).item().decode()
    # By hand: the three lowest scores, ascending: images 5 (0.1), 2 (0.2), 0 (0.4).
    assert text == "tile 1: id5 score 0.1000  \ntile 2: id2 score 0.2000  \ntile 3: id0 score 0.4000"
    picture = tf.io.decode_png(tf.make_ndarray(val.Tensors("worst_images")[-1].tensor_proto)[2]).numpy()
    for column, k in enumerate((5, 2, 0)):
        tile = picture[:, column * 103:column * 103 + 101]
        expected = summaries.tile_label(summaries.overlay(images[k], truth[k], truth[k]), ids[k], scores[k])
        np.testing.assert_array_equal(tile, expected)
        assert (tile[:summaries.LABEL_HEIGHT] == 255).any() and (tile[summaries.LABEL_HEIGHT:] == 20 * (k + 1)).all()
    assert "fixed_images" not in val.Tags()["tensors"]  # images=0: none


def test_validation_tiles_take_their_ids_from_split_csv(tmp_path):
    """The loop passes no ids: the run directory's split.csv names the validation images, in its order."""
    import tensorflow as tf

    from salt_tf import summaries
    from test_summaries import accumulate

    split = pd.DataFrame({"id": ["t0", "v0", "t1", "v1", "v2"], "role": ["train", "val", "train", "val", "val"]})
    splits.write_split(split, os.path.join(tmp_path, rundir.SPLIT_FILE))
    writer = summaries.Summaries(str(tmp_path), images=0, worst_images=2)
    images = np.zeros((3, 101, 101), np.float32)
    writer.validation_images(images, images > 0, images, np.array([0.5, 0.25, 0.75]), step=1)
    writer.close()
    val = accumulate(os.path.join(tmp_path, "events", "val"))
    text = tf.make_ndarray(val.Tensors("worst_images_ids")[-1].tensor_proto).item().decode()
    assert text == "tile 1: v1 score 0.2500  \ntile 2: v0 score 0.5000"
