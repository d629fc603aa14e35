"""Cross-validation: the fold split, fold flags, `cv train` (fold subprocesses), `cv collect` (OOF), the
threshold cross-validation, and `cv compare`.

One module fixture runs `python -m salt_tf.cv train` in this process on the demo set (2 folds, 1-epoch tiny
models, --parallel=2): the only test here that starts subprocesses (the fold trainings). The other tests read
its parent folder or use NumPy only.
"""

import contextlib
import io
import os
import random

import numpy as np
import pandas as pd
import pytest
from absl import flags
from absl.testing import flagsaver

from salt_tf import cv, ensemble, flags as salt_flags, metrics, oof, rundir, train
from salt_tf.data import kaggle, splits
from train_helpers import run_tiny

FLAGS = flags.FLAGS

TINY_CV = ["--dataset=kaggle", "--base_width=4", "--depth=2", "--blocks_per_level=1", "--se_ratio=2",
           "--batch_size=8", "--eval_batch_size=32", "--epochs=1", "--progress_every=0", "--summary_images=0",
           "--summary_worst_images=0", "--summary_every_steps=0", "--folds=2"]


def _cv(argv):
    """cv.main in this process: (status, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cv.main(["cv", *argv])
    return status, out.getvalue()


@pytest.fixture(scope="module")
def parent(demo_dir, tmp_path_factory):
    """A CV parent trained and collected by `cv train` (2 folds in parallel); (path, train args, output)."""
    path = str(tmp_path_factory.mktemp("cv") / "parent")
    args = TINY_CV + [f"--data_dir={demo_dir}"]
    status, output = _cv(["train", f"--parent={path}", "--parallel=2", *args])
    assert status == 0, output[-3000:]
    return path, args, output


# ------------------------------------------------------------------------------------------------ folds


def test_fold_split_partitions_and_stratifies_by_hand():
    # 4 empty images (class 0), 3 of class 1 (coverage 5%), 3 of class 5 (45%), 2 folds. kfold deals each class
    # round-robin, continuing the count across classes: class 0 -> folds 0,1,0,1; class 1 (from 4) -> 0,1,0;
    # class 5 (from 7) -> 1,0,1. So fold 0 validates on 2 + 2 + 1 images, fold 1 on 2 + 1 + 2.
    ids = [f"id{k}" for k in range(10)]
    coverage = np.array([0, 0, 0, 0, 0.05, 0.05, 0.05, 0.45, 0.45, 0.45])
    expected = {0: {0: 2, 1: 2, 5: 1}, 1: {0: 2, 1: 1, 5: 2}}
    val_sets = []
    for fold in (0, 1):
        frame = splits.fold_split(ids, coverage, 2, fold, seed=3)
        assert list(frame.columns) == ["id", "role", "fold", "coverage_class"]
        val = frame[frame["role"] == "val"]
        assert (val["fold"] == fold).all() and (frame.loc[frame["role"] == "train", "fold"] != fold).all()
        assert val["coverage_class"].value_counts().to_dict() == expected[fold]
        val_sets.append(set(val["id"]))
    assert val_sets[0].isdisjoint(val_sets[1]) and val_sets[0] | val_sets[1] == set(ids)
    with pytest.raises(kaggle.DataError, match="--fold=2"):
        splits.fold_split(ids, coverage, 2, 2, seed=3)


@pytest.mark.parametrize("argv, names", [
    (["--folds=1"], "--folds=1"),
    (["--folds=3", "--fold=3"], "--fold=3"),
    (["--fold=2"], "--fold=2 needs --folds"),
    (["--folds=3", "--val_images=10"], "--val_images=10 has no effect with --folds=3"),
])
def test_bad_fold_flags_stop_with_one_line(tmp_path, capsys, argv, names):
    salt_flags.define_flags()
    model_dir = str(tmp_path / "run")
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        FLAGS.unparse_flags()
        train.parse_flags(["train", "--dataset=demo", f"--data_dir={tmp_path}/d", f"--model_dir={model_dir}"] + argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and names in message, message
    assert not os.path.exists(model_dir)


def test_flagfile_val_images_with_folds_and_repeated_extra_data_dir_parse(tmp_path):
    # A flagfile's --val_images (every shipped one has it) is no conflict: only the command line's is.
    salt_flags.define_flags()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        train.parse_train_argv(["train", "--flagfile=flags/demo.cfg", f"--model_dir={tmp_path}/r", "--folds=5",
                                "--fold=4", "--extra_data_dir=a", "--extra_data_dir=b,c"])
        assert (FLAGS.folds, FLAGS.fold, FLAGS.val_images) == (5, 4, 160)
        assert FLAGS.extra_data_dir == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------ cv train / collect


def test_cv_train_gives_every_image_one_prediction_from_the_model_that_validated_on_it(parent, demo_dir):
    from salt_tf import exports, pipeline, tta

    path, _, output = parent
    assert "[fold-0]" in output and "[fold-1]" in output and "out-of-fold: 160 images" in output
    # Each fold is an ordinary run; its split.csv names the fold, and the folds' validation sets partition the ids.
    val = {}
    for k in (0, 1):
        split = pd.read_csv(os.path.join(path, f"fold-{k}", rundir.SPLIT_FILE), dtype={"id": str})
        assert set(split.loc[split["role"] == "val", "fold"]) == {k}
        val[k] = set(split.loc[split["role"] == "val", "id"])
        record = rundir.read_json(os.path.join(path, f"fold-{k}", rundir.RECORD_FILE))
        assert record["split"] == {"folds": 2, "fold": k, "seed": 0}
        assert record["data"]["val_images"] == len(val[k]) and record["data"]["train_images"] == 160 - len(val[k])
    ids = set(kaggle.train_ids(demo_dir))
    assert val[0].isdisjoint(val[1]) and val[0] | val[1] == ids
    saved = oof.load(os.path.join(path, rundir.OOF_FILE))
    assert sorted(saved["ids"].tolist()) == sorted(ids) and len(saved["ids"]) == 160
    assert saved["probabilities"].dtype == np.float16
    # Each image's probabilities are its validating fold's model's, with hflip TTA, recomputed here.
    data = kaggle.load_labelled(demo_dir, saved["ids"].tolist())
    np.testing.assert_array_equal(saved["masks"], data.masks)
    models = {k: exports.load_models(os.path.join(path, f"fold-{k}"))[0].model for k in (0, 1)}
    inputs = pipeline.model_inputs(list(data.ids), data.images, np.full(len(data.ids), np.nan), False)
    for k in (0, 1):
        rows = np.array([i in val[k] for i in saved["ids"]])
        assert (saved["fold"][rows] == k).all()
        own = tta.predict_probabilities(models[k], inputs[rows], tta=("none", "hflip"))
        other = tta.predict_probabilities(models[1 - k], inputs[rows], tta=("none", "hflip"))
        np.testing.assert_allclose(saved["probabilities"][rows].astype(np.float32), own, atol=1e-3)
        assert np.abs(other - own).max() > 0.01  # the other fold's model would give other numbers
    # One model per fold: the one member position is each fold's model (the fold mean itself); no image head.
    assert saved["member_probabilities"].shape == (1, 160, 101, 101) and "has_salt" not in saved
    np.testing.assert_array_equal(saved["member_probabilities"][0], saved["probabilities"])
    # The scores are those of the stored values; oof.json says the same.
    p = saved["probabilities"].astype(np.float32)
    np.testing.assert_array_equal(saved["scores_at_half"], metrics.image_scores(data.masks, p > 0.5))
    summary = rundir.read_json(os.path.join(path, rundir.OOF_SUMMARY))
    assert summary["cv"]["all"] == pytest.approx(saved["scores_cv"].mean())
    assert summary["at_half"]["all"] == pytest.approx(metrics.competition_metric(data.masks, p > 0.5))
    assert summary["images"] == 160 and summary["folds"] == 2
    assert [m["name"] for m in summary["models"]] == [os.path.join(f"fold-{k}", "export") for k in (0, 1)]


def test_predict_takes_the_parent_as_a_fold_ensemble(parent, demo_dir, tmp_path, capsys):
    import shutil

    from salt_tf import predict

    path = str(tmp_path / "cv")
    shutil.copytree(parent[0], path)  # evaluate writes ensemble.json into it; the module's parent stays as it was
    summary = rundir.read_json(os.path.join(path, rundir.OOF_SUMMARY))
    submit = ["predict", "submit", f"--model_dir={path}", f"--images={os.path.join(demo_dir, 'test', 'images')}",
              f"--output={tmp_path / 'submission.csv'}"]
    assert predict.main(submit) == 0
    out = capsys.readouterr().out
    assert "mean ensemble of 2 folds (2 models) from oof.json" in out and f"threshold {summary['threshold']:.2f}" in out
    assert predict.main(["predict", "evaluate", f"--model_dir={path}"]) == 0
    out = capsys.readouterr().out
    assert "evaluate: the out-of-fold predictions of" in out and "160 images" in out
    chosen = ensemble.Ensemble.load(os.path.join(path, rundir.ENSEMBLE_FILE))
    assert [m["name"] for m in chosen.models] == [m["name"] for m in summary["models"]]
    assert predict.main(submit) == 0
    out = capsys.readouterr().out
    assert "from ensemble.json" in out and chosen.postprocessing.describe() in out
    assert len(pd.read_csv(tmp_path / "submission.csv")) == 8


def test_rerun_skips_finished_folds_and_resumes_others(parent, tmp_path):
    path, args, _ = parent
    status, output = _cv(["train", f"--parent={path}", *args])
    assert status == 0 and "fold-0 finished, fold-1 finished" in output and "[fold-" not in output, output
    record_path = os.path.join(path, "fold-1", rundir.RECORD_FILE)
    record = rundir.read_json(record_path)
    try:  # an interrupted fold (started again after its last finish) and more --epochs are resumed
        rundir.write_json(record_path, dict(record, started="9999-01-01T00:00:00"))
        assert cv.plan_folds(path, args) == (2, {0: "finished", 1: "resume"})
        assert cv.plan_folds(path, args + ["--epochs=2"]) == (2, {0: "resume", 1: "resume"})
    finally:
        rundir.write_json(record_path, record)
    # --val_images has no effect with --folds: a fold's flags.cfg leaves it out, a resume ignores it (every
    # shipped flagfile sets it), and runs reproduce finds flags.cfg in agreement with record.json.
    from salt_tf import runs

    assert "--val_images" not in open(os.path.join(path, "fold-0", rundir.FLAGS_FILE)).read()
    flagfile = str(tmp_path / "val_images.cfg")
    with open(flagfile, "w") as f:
        f.write("--val_images=77\n")
    assert cv.plan_folds(path, [f"--flagfile={flagfile}", *args]) == (2, {0: "finished", 1: "finished"})
    assert runs.flags_vs_record(runs.load_run(os.path.join(path, "fold-0"))) == []
    # Other training flags on existing folds, or flags cv sets itself: one line, nothing started.
    for extra, names in ((["--learning_rate=0.5"], "learning_rate"), (["--fold=1"], "--fold"),
                         (["--folds=1"], "--folds=1")):
        status, output = _cv(["train", f"--parent={path}", *args, *extra])
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert status == 2 and len(errors) == 1 and names in errors[0], output


def test_changing_fold_on_resume_is_refused(parent, demo_dir):
    from salt_tf import checkpoints

    path, _, _ = parent
    before = open(os.path.join(path, "fold-0", rundir.SPLIT_FILE)).read()
    with pytest.raises(checkpoints.ResumeError, match=r"fold: 0 -> 1.*its own --model_dir"):
        run_tiny(demo_dir, os.path.join(path, "fold-0"), folds=2, fold=1, epochs=1, batch_size=8,
                 eval_batch_size=32, summary_images=0, summary_worst_images=0, summary_every_steps=0)
    assert open(os.path.join(path, "fold-0", rundir.SPLIT_FILE)).read() == before


def test_collect_needs_every_fold(parent, tmp_path):
    import shutil

    path, _, _ = parent
    partial = str(tmp_path / "partial")
    shutil.copytree(os.path.join(path, "fold-0"), os.path.join(partial, "fold-0"))
    status, output = _cv(["collect", f"--parent={partial}"])
    assert status == 2 and "missing fold-1" in output and not os.path.exists(os.path.join(partial, "oof.npz"))


def test_fold_of_images_wants_exactly_one_prediction_per_image():
    np.testing.assert_array_equal(oof.fold_of_images(["a", "b", "c"], {0: ["c"], 1: ["a", "b"]}), [1, 1, 0])
    with pytest.raises(oof.OOFError, match="image b is a validation image of fold-0 and of fold-1"):
        oof.fold_of_images(["a", "b", "c"], {0: ["b", "c"], 1: ["a", "b"]})
    with pytest.raises(oof.OOFError, match="1 of the 3 labelled images have no out-of-fold prediction .e.g. c"):
        oof.fold_of_images(["a", "b", "c"], {0: ["a"], 1: ["b"]})
    with pytest.raises(oof.OOFError, match="fold-1 validates on z"):
        oof.fold_of_images(["a", "b"], {0: ["a"], 1: ["b", "z"]})


# ------------------------------------------------------------------------------------ OOF threshold and compare


def test_oof_threshold_never_sees_the_image_it_scores():
    # Fold 0: salt at 0.7 on 0.3 (perfect for any threshold in [0.3, 0.7)); fold 1: salt at 0.2 on 0.1 (perfect
    # only in [0.1, 0.2)). Each fold gets the other's threshold and scores 0 everywhere; a threshold chosen with
    # the scored image among the data would score 1 on at least the images it was chosen on.
    truth = np.zeros((4, 10, 10), bool)
    truth[:, :4, :4] = True
    p = np.where(truth, 0.7, 0.3).astype(np.float32)
    p[2:] = np.where(truth[2:], 0.2, 0.1)
    scored = oof.score(truth, p, folds_of=np.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(scored["scores_cv"], [0, 0, 0, 0])
    np.testing.assert_array_equal(scored["scores_at_half"], [1, 1, 0, 0])
    # Random maps: each image's score equals the brute force, the threshold chosen on the other folds only.
    rng = np.random.default_rng(0)
    truth = rng.random((30, 8, 8)) < rng.random((30, 1, 1))
    p = np.clip(truth * rng.uniform(0.3, 0.9, (30, 1, 1)) + rng.normal(0, 0.2, truth.shape), 0, 1).astype(np.float32)
    folds_of = ensemble.image_folds(truth, 5, seed=0)
    scored = oof.score(truth, p)
    for i in range(30):
        others = folds_of != folds_of[i]
        threshold, _ = metrics.best_threshold(truth[others], p[others])
        assert scored["scores_cv"][i] == metrics.image_scores(truth[i:i + 1], p[i:i + 1] > threshold)[0]


def _oof_arrays(ids, scores_cv, scores_at_half, truth):
    n = len(ids)
    return {"ids": np.asarray(ids, dtype=str), "probabilities": np.zeros((n, 2, 2), np.float16),
            "masks": truth.astype(np.uint8), "fold": np.zeros(n, np.int64), "scores_at_half": scores_at_half,
            "scores_cv": scores_cv}


def test_compare_interval_matches_a_brute_force_bootstrap(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    truth = np.zeros((n, 2, 2), bool)
    truth[::2, 0, 0] = True
    a = rng.choice([0.0, 0.5, 1.0], n)
    b = np.clip(a + rng.choice([-0.1, 0.0, 0.1, 0.2], n), 0, 1)
    ids = [f"i{k:03d}" for k in range(n)]
    parents = [str(tmp_path / name) for name in "ab"]
    for folder, scores in zip(parents, (a, b)):
        os.makedirs(folder)
        oof.save(os.path.join(folder, rundir.OOF_FILE), _oof_arrays(ids, scores, scores, truth))
    result = oof.compare(*(oof.load(os.path.join(p, rundir.OOF_FILE)) for p in parents))
    assert result.difference["cv"] == pytest.approx(np.mean(b) - np.mean(a))
    # Brute force: resample the images with replacement, one resample at a time, another generator.
    draw = random.Random(7)
    d = list(b - a)
    means = sorted(sum(d[draw.randrange(n)] for _ in range(n)) / n for _ in range(4000))
    low, high = means[int(0.025 * 4000)], means[int(0.975 * 4000) - 1]
    assert result.ci95["cv"][0] == pytest.approx(low, abs=0.004)
    assert result.ci95["cv"][1] == pytest.approx(high, abs=0.004)
    # By coverage group: the empty images are the odd ones.
    assert result.groups["cv"]["empty"] == pytest.approx(np.mean((b - a)[1::2]))
    status, output = _cv(["compare", *parents])
    assert status == 0 and f"{np.mean(b) - np.mean(a):+.4f}" in output
    # Other images: one line.
    oof.save(os.path.join(parents[1], rundir.OOF_FILE), _oof_arrays(ids[:-1] + ["zzz"], b, b, truth))
    status, output = _cv(["compare", *parents])
    assert status == 2 and output.count("\n") == 1 and "i299 only in A, zzz only in B" in output


# ------------------------------------------------------------------------------------------------- cv pseudo


def test_pseudo_from_a_cv_parent_averages_the_fold_models(parent, demo_dir, tmp_path):
    from salt_tf import exports, pipeline, pseudo, tta

    path, _, _ = parent
    images = os.path.join(demo_dir, "test", "images")
    ids, raw, _ = kaggle.read_image_folder(images)
    inputs = pipeline.model_inputs(ids, raw, np.full(len(ids), np.nan), False)
    p = np.mean([tta.predict_probabilities(exports.load_models(os.path.join(path, f"fold-{k}"))[0].model, inputs,
                                           tta=("none", "hflip")) for k in (0, 1)], axis=0)
    # The margin rule, by hand (the 1-epoch models are too unsure for the band rule to tell images apart).
    confidence = np.mean(np.abs(2 * p - 1), axis=(1, 2))
    levels = np.unique(confidence)
    assert len(levels) >= 2, confidence  # else no cut can keep some images and not others
    cut = float(levels[-2] + levels[-1]) / 2  # keeps the most confident images only
    output = str(tmp_path / "pseudo")
    status, text = _cv(["pseudo", f"--model_dir={path}", f"--images={images}", f"--output={output}",
                        "--confidence=margin", f"--min_confidence={cut}"])
    assert status == 0, text
    table = pd.read_csv(os.path.join(output, pseudo.CONFIDENCE_FILE), dtype={"id": str})
    assert table["id"].tolist() == ids
    np.testing.assert_allclose(table["confidence"], confidence, atol=1e-5)
    kept = confidence >= cut
    assert table["kept"].tolist() == kept.tolist() and 0 < kept.sum() < len(ids)
    # The folder is a labelled set in the Kaggle layout: the kept images, their masks p > 0.5, their depths.
    labelled = kaggle.load_labelled(output)
    assert labelled.ids.tolist() == [i for i, k in zip(ids, kept) if k]
    np.testing.assert_array_equal(labelled.masks, p[kept] > 0.5)
    np.testing.assert_array_equal(labelled.images, raw[kept])
    depths = kaggle.read_depths(os.path.join(demo_dir, kaggle.DEPTHS_FILE))
    np.testing.assert_array_equal(labelled.depths, [depths[i] for i in labelled.ids])
    # A folder that exists is not overwritten.
    status, text = _cv(["pseudo", f"--model_dir={path}", f"--images={images}", f"--output={output}"])
    assert status == 2 and "exists" in text and text.count("\n") == 1


def test_sigint_stops_the_folds_even_when_inherited_ignored():
    """A script's background job starts with SIGINT ignored; cv's fold runner still stops on it: one SIGTERM to
    each running command (which a training turns into a checkpoint), then KeyboardInterrupt."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        started = time.time()
        with pytest.raises(KeyboardInterrupt):
            cv.run_processes({"sleeper": [sys.executable, "-c", "import time; time.sleep(60)"]}, 1, out=io.StringIO())
        assert time.time() - started < 30  # the child got its SIGTERM, not a 60 s wait
    finally:
        signal.signal(signal.SIGINT, previous)
