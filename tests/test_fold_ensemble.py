"""Fold ensembles in predict (issue 21 item 3): a CV parent as --model_dir of `predict submit` (every fold's models,
each fold weighing the same) and of `predict evaluate` (the choice made on the parent's oof.npz, no image
predicted: member positions, their mean, the stacked meta-model, post-processing with the image-head gate),
what `cv collect` stores for it (each fold model's out-of-fold prediction, the image head), and the one-line
errors of an unfinished parent.

The parents here are made by hand from tiny trained runs (copies as fold-k, record.json naming the fold;
snapshots made by shifting the export's output biases), so no cross-validation is trained; tests/test_cv.py
runs the real `cv train` and collect.
"""

import contextlib
import dataclasses
import io
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from salt_tf import checkpoints, cv, ensemble, exports, metrics, oof, pipeline, postprocess, predict, rundir, serving
from salt_tf import tta as tta_lib
from salt_tf.data import kaggle
from train_helpers import run_tiny

VIEWS = ("none", "hflip")


@pytest.fixture(scope="module")
def tiny_run(tiny_run_1_epoch):
    """The session's 1-epoch tiny run (conftest); the tests here copy it before writing."""
    return tiny_run_1_epoch


def _parent(root, runs) -> str:
    """A CV parent of copies of finished runs: <root>/parent/fold-k is runs[k], its record.json naming fold k."""
    parent = os.path.join(str(root), "parent")
    for k, run in enumerate(runs):
        fold = rundir.fold_dir(parent, k)
        shutil.copytree(run, fold)
        path = os.path.join(fold, rundir.RECORD_FILE)
        rundir.write_json(path, dict(rundir.read_json(path), split={"folds": len(runs), "fold": k, "seed": 0}))
    return parent


def _write_oof_summary(parent, threshold, models=()):
    """An oof.json as cv collect writes it, its threshold set by hand (the scores are of no interest here)."""
    truth = np.zeros((4, 8, 8), bool)
    truth[:2, 2:6, 2:6] = True
    p = np.where(truth, 0.8, 0.1).astype(np.float32)
    summary = oof.summary(truth, oof.score(truth, p, folds_of=np.array([0, 1, 0, 1])), np.array([0, 1, 0, 1]),
                          VIEWS, models)
    rundir.write_json(os.path.join(parent, rundir.OOF_SUMMARY), dict(summary, threshold=threshold))


def _test_images(demo_dir):
    folder = os.path.join(demo_dir, "test", "images")
    ids, images, _ = kaggle.read_image_folder(folder)
    return folder, ids, images


def _probabilities(export_dir, ids, images):
    """One export's TTA probabilities of the images, loaded and predicted independently of any parent."""
    [entry] = exports.load_models(export_dir)
    inputs = pipeline.model_inputs(ids, images, np.full(len(ids), np.nan, np.float32), False)
    return tta_lib.predict_probabilities(entry.model, inputs, tta=VIEWS).astype(np.float64)


def _submit(capsys, *argv):
    status = predict.main(["predict", "submit", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _masks_of(csv_path):
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    return list(frame["id"]), np.stack([kaggle.rle_decode(r) for r in frame["rle_mask"]]).astype(bool)


# ---------------------------------------------------------------------------------------------------- submit


def test_a_fold_ensemble_of_identical_models_equals_the_one_model(tiny_run, demo_dir, tmp_path, capsys):
    parent = _parent(tmp_path, [tiny_run, tiny_run])
    folder, ids, images = _test_images(demo_dir)
    entries = exports.load_models(parent)
    assert [(e.name, e.fold) for e in entries] == [(os.path.join("fold-0", "export"), 0),
                                                   (os.path.join("fold-1", "export"), 1)]
    single = _probabilities(os.path.join(tiny_run, "export"), ids, images)
    assert exports.members(entries) == [[0, 1]]  # one member position: the export of every fold
    members, _ = exports.predict_members(entries, ids, images, np.full(len(ids), np.nan, np.float32), VIEWS, 8)
    assert len(members) == 1
    for p in members + [np.mean(members, axis=0)]:
        np.testing.assert_allclose(p, single, rtol=0, atol=1e-6)

    # The submission: the threshold is oof.json's (chosen on the OOF predictions), far enough from 0.5 to matter.
    threshold = round(float(np.quantile(single, 0.7)), 3)
    assert ((single > threshold) != (single > 0.5)).sum() > 50
    _write_oof_summary(parent, threshold)
    status, out, err = _submit(capsys, f"--model_dir={parent}", f"--images={folder}",
                               f"--output={tmp_path / 'folds.csv'}")
    assert status == 0, err
    assert "mean ensemble of 2 folds (2 models) from oof.json" in out and f"threshold {threshold:.2f}" in out
    status, _, err = _submit(capsys, f"--model_dir={tiny_run}", f"--images={folder}",
                             f"--output={tmp_path / 'one.csv'}", f"--threshold={threshold}")
    assert status == 0, err
    folds_ids, folds_masks = _masks_of(tmp_path / "folds.csv")
    one_ids, one_masks = _masks_of(tmp_path / "one.csv")
    assert folds_ids == one_ids == ids
    np.testing.assert_array_equal(folds_masks, one_masks)


def test_every_fold_weighs_the_same_whatever_its_number_of_snapshots(tiny_run, demo_dir, tmp_path, capsys):
    # fold-0: model A (export/ only); fold-1: two snapshots B1, B2 (A's weights, the head's bias -2 and -1).
    snapshot_run = str(tmp_path / "snapshot_run")
    shutil.copytree(tiny_run, snapshot_run)
    shutil.rmtree(os.path.join(snapshot_run, rundir.SNAPSHOTS_DIR), ignore_errors=True)
    [entry] = exports.load_models(os.path.join(snapshot_run, "export"))
    bias = entry.model.head.conv.bias.numpy()
    for k, shift in ((1, -2.0), (2, -1.0)):
        entry.model.head.conv.bias.assign(bias + shift)
        checkpoints.export_snapshot(snapshot_run, k, entry.model, dict(entry.config, epoch=k))
    parent = _parent(tmp_path, [tiny_run, snapshot_run])
    folder, ids, images = _test_images(demo_dir)

    p_a = _probabilities(os.path.join(tiny_run, "export"), ids, images)
    p_b1, p_b2 = (_probabilities(rundir.snapshot_dir(snapshot_run, k), ids, images) for k in (1, 2))
    expected = (p_a + (p_b1 + p_b2) / 2) / 2            # each fold 1/2: A 1/2, each snapshot 1/4
    per_model = (p_a + p_b1 + p_b2) / 3                 # what weighing every model the same would give
    assert np.abs(expected - per_model).max() > 0.01

    entries = exports.load_models(parent)
    assert exports.members(entries) == [[0], [1, 2]]
    members, _ = exports.predict_members(entries, ids, images, np.full(len(ids), np.nan, np.float32), VIEWS, 8)
    np.testing.assert_allclose(np.mean(members, axis=0), expected, rtol=0, atol=1e-6)

    # predict submit combines the same way: its masks are the hand-computed mean's at the given threshold.
    threshold = round(float(np.quantile(expected, 0.6)), 3)
    _write_oof_summary(parent, 0.5)
    output = tmp_path / "submission.csv"
    status, out, err = _submit(capsys, f"--model_dir={parent}", f"--images={folder}", f"--output={output}",
                               f"--threshold={threshold}")
    assert status == 0, err
    submitted_ids, masks = _masks_of(output)
    assert submitted_ids == ids
    differ = masks != (expected > threshold)
    assert np.all(np.abs(expected[differ] - threshold) < 1e-5)  # only float32 rounding at the threshold
    assert (masks != (per_model > threshold)).sum() > 10


# -------------------------------------------------------------------------------------------------- evaluate


def _best_threshold(truth, p):
    """Brute force over the sweep's candidates: the best competition metric, ties to the threshold nearest 0.5."""
    scores = [metrics.competition_metric(truth, p > t) for t in metrics.DEFAULT_SWEEP]
    best = [t for t, s in zip(metrics.DEFAULT_SWEEP, scores) if s == max(scores)]
    return float(min(best, key=lambda t: abs(t - 0.5)))


def test_evaluate_on_a_parent_chooses_on_its_oof_predictions_never_on_the_scored_image(tiny_run, tmp_path,
                                                                                       capsys):
    parent = _parent(tmp_path, [tiny_run, tiny_run])
    # Hand-made out-of-fold predictions of 60 made-up images (not the demo set's): nothing here was predicted.
    rng = np.random.default_rng(3)
    n = 60
    truth = rng.random((n, 12, 12)) < rng.random((n, 1, 1)) * (rng.random((n, 1, 1)) < 0.7)
    p = np.clip(truth * rng.uniform(0.2, 0.9, (n, 1, 1)) + rng.normal(0.15, 0.15, truth.shape), 0, 1)
    stored = p.astype(np.float16)
    oof.save(os.path.join(parent, rundir.OOF_FILE),
             {"ids": np.array([f"x{i:02d}" for i in range(n)]), "probabilities": stored,
              "masks": truth.astype(np.uint8), "fold": np.arange(n) % 2, "scores_at_half": np.zeros(n),
              "scores_cv": np.zeros(n)})
    _write_oof_summary(parent, 0.5)
    status = predict.main(["predict", "evaluate", f"--model_dir={parent}", "--folds=4"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "out-of-fold predictions" in out and "60 images" in out and "stacked of" not in out
    # An oof.npz of before the per-model predictions: the fold mean only, and the line says why and the fix.
    assert (f"the fold mean only: {rundir.OOF_FILE} holds no per-model out-of-fold predictions" in out
            and f"python -m salt_tf.cv collect --parent={parent}" in out), out
    assert "no image-head gate (the models have no image head)" in out
    chosen = ensemble.Ensemble.load(os.path.join(parent, rundir.ENSEMBLE_FILE))
    assert chosen.combine == "mean" and chosen.tta == list(VIEWS)
    assert [m["name"] for m in chosen.models] == [os.path.join(f"fold-{k}", "export") for k in (0, 1)]

    # The final threshold: the best on all the OOF images (as stored, float16).
    p32 = stored.astype(np.float32)
    assert chosen.postprocessing.threshold == pytest.approx(_best_threshold(truth, p32))
    # Its cv score: each image at the threshold chosen on the other image folds only (the folds are the
    # contract's coverage-stratified ones), brute force here.
    folds_of = ensemble.image_folds(truth, 4, seed=0)
    held_out = np.zeros(n)
    for f in np.unique(folds_of):
        others, scored = folds_of != f, folds_of == f
        held_out[scored] = metrics.image_scores(truth[scored], p32[scored] > _best_threshold(truth[others],
                                                                                              p32[others]))
    assert chosen.scores["cv_mean"] == pytest.approx(held_out.mean(), abs=1e-12)
    leaky = metrics.competition_metric(truth, p32 > chosen.postprocessing.threshold)
    assert abs(leaky - held_out.mean()) > 1e-3  # a threshold that saw the scored images would score otherwise


# ---------------------------------------------------------------------------------------------------- errors


def _error(capsys, *argv):
    """(status, the one error line) of predict's command line, which must print nothing else."""
    status = predict.main(["predict", *argv])
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), (out, err)
    return status, err.strip()


def test_an_unfinished_or_uncollected_parent_is_one_line_naming_cv_collect(tiny_run, demo_dir, tmp_path, capsys):
    parent = _parent(tmp_path, [tiny_run, tiny_run])
    folder = os.path.join(demo_dir, "test", "images")
    output = tmp_path / "submission.csv"
    collect = f"python -m salt_tf.cv collect --parent={parent}"
    submit = ["submit", f"--model_dir={parent}", f"--images={folder}", f"--output={output}"]

    # Not collected: no oof.json / oof.npz.
    for argv, missing in ((submit, rundir.OOF_SUMMARY), (["evaluate", f"--model_dir={parent}"], rundir.OOF_SUMMARY)):
        status, line = _error(capsys, *argv)
        assert status == 2 and missing in line and collect in line, line
    _write_oof_summary(parent, 0.4)
    status, line = _error(capsys, "evaluate", f"--model_dir={parent}")
    assert status == 2 and rundir.OOF_FILE in line and collect in line, line
    # Collected from other fold models than those there now (a fold retrained since).
    _write_oof_summary(parent, 0.4, models=[{"name": os.path.join("fold-0", "export"), "epoch": 7}])
    status, line = _error(capsys, *submit)
    assert status == 2 and "fitted on models" in line and f"rerun {collect}" in line, line

    # A fold whose training has not finished (it started again after its last finish).
    record_path = os.path.join(parent, "fold-1", rundir.RECORD_FILE)
    rundir.write_json(record_path, dict(rundir.read_json(record_path), started="9999-01-01T00:00:00"))
    for argv in (submit, ["evaluate", f"--model_dir={parent}"]):
        status, line = _error(capsys, *argv)
        assert status == 2 and "fold-1: its training has not finished" in line and collect in line, line

    # Flags an OOF evaluation cannot use, and the SavedModel, which holds no fold ensemble.
    status, line = _error(capsys, "evaluate", f"--model_dir={parent}", f"--data_dir={demo_dir}")
    assert status == 2 and line.startswith("error: --data_dir: a CV parent"), line
    with pytest.raises(serving.ServingError, match="a cross-validation parent"):
        serving.export_savedmodel(parent, str(tmp_path / "serving"))
    assert not output.exists() and not os.path.exists(os.path.join(parent, rundir.ENSEMBLE_FILE))
    assert not (tmp_path / "serving").exists()


# ------------------------------------------------------------- member positions, stacking and the image head
#
# A parent of 2 folds with 2 snapshots each, of a tiny model with the image head (--deep_supervision): every
# snapshot is the same trained weights with the mask head's and the image head's biases shifted by SHIFTS, so
# all four models differ; fold k validates on the labelled ids k, k+2, k+4, ... (in sorted order).

SHIFTS = (((-1.5, 1.0), (0.5, -1.0)),   # fold 0: (mask bias, image-head bias) of snapshot 1, snapshot 2
          ((1.0, -0.5), (-0.5, 1.5)))   # fold 1


@pytest.fixture(scope="module")
def head_run(demo_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("head_run") / "run")
    run_tiny(demo_dir, run_dir, epochs=1, deep_supervision=True)
    return run_dir


def _snapshot_run(run, run_dir, shifts):
    """A copy of `run` whose snapshots are its export with the output biases shifted by `shifts`, in order."""
    shutil.copytree(run, run_dir)
    shutil.rmtree(os.path.join(run_dir, rundir.SNAPSHOTS_DIR), ignore_errors=True)
    [entry] = exports.load_models(os.path.join(run, "export"))
    mask_bias, head_bias = entry.model.head.conv.bias.numpy(), entry.model.image_head.dense.bias.numpy()
    for k, (mask_shift, head_shift) in enumerate(shifts, start=1):
        entry.model.head.conv.bias.assign(mask_bias + mask_shift)
        entry.model.image_head.dense.bias.assign(head_bias + head_shift)
        checkpoints.export_snapshot(run_dir, k, entry.model, dict(entry.config, epoch=k))
    return run_dir


def _snapshot_parent(root, run, demo_dir):
    """The parent of SHIFTS under root/parent, each fold's split.csv validating on its share of the ids."""
    runs = [_snapshot_run(run, os.path.join(str(root), "runs", str(k)), shifts) for k, shifts in enumerate(SHIFTS)]
    parent = _parent(root, runs)
    ids = sorted(kaggle.train_ids(demo_dir))
    for k in range(len(SHIFTS)):
        roles = ["val" if i % len(SHIFTS) == k else "train" for i in range(len(ids))]
        rundir.write_csv(os.path.join(parent, f"fold-{k}", rundir.SPLIT_FILE), pd.DataFrame({"id": ids, "role": roles}))
    return parent


def _cv(*argv):
    """cv.main in this process: (status, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cv.main(["cv", *argv])
    return status, out.getvalue()


@pytest.fixture(scope="module")
def collected(head_run, demo_dir, tmp_path_factory):
    """The SHIFTS parent after `cv collect`: (its path, collect's output). Tests that write into it copy it."""
    parent = _snapshot_parent(tmp_path_factory.mktemp("collected"), head_run, demo_dir)
    status, output = _cv("collect", f"--parent={parent}")
    assert status == 0, output
    return parent, output


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _tta_by_hand(export_dir, images):
    """(probabilities [N,101,101], image-head salt probabilities [N]) of one export on uint8 images, by hand: the
    Keras model called on the images and on their NumPy left-right mirror, un-mirrored and averaged in NumPy."""
    [entry] = exports.load_models(export_dir)
    x = images.astype(np.float32)[..., None] / 255.0
    mirror = np.ascontiguousarray(x[:, :, ::-1])
    plain, mirrored = (entry.model(v, training=False, all_outputs=True) for v in (x, mirror))
    p = (_sigmoid(plain["mask"].numpy()[..., 0]) + _sigmoid(mirrored["mask"].numpy()[..., 0])[:, :, ::-1]) / 2
    return p, (_sigmoid(plain["has_salt"].numpy()) + _sigmoid(mirrored["has_salt"].numpy())) / 2


def test_collect_stores_each_fold_models_out_of_fold_prediction_and_image_head(collected, demo_dir):
    parent, output = collected
    assert "(the fold mean, each of the 2 model(s) of the fold, the image head)" in output, output
    saved = oof.load(os.path.join(parent, rundir.OOF_FILE))
    assert saved["member_probabilities"].shape == (2, 160, 101, 101)
    assert saved["member_probabilities"].dtype == np.float16 and saved["has_salt"].dtype == np.float32
    ids = sorted(kaggle.train_ids(demo_dir))
    data = kaggle.load_labelled(demo_dir, saved["ids"].tolist())
    by_hand = {(k, s): _tta_by_hand(rundir.snapshot_dir(os.path.join(parent, f"fold-{k}"), s), data.images)
               for k in (0, 1) for s in (1, 2)}
    for k in (0, 1):
        rows = saved["fold"] == k
        assert sorted(saved["ids"][rows]) == ids[k::2]
        for s in (1, 2):  # member s-1 of an image: snapshot s of the fold that validated on it
            p = by_hand[(k, s)][0][rows]
            np.testing.assert_allclose(saved["member_probabilities"][s - 1][rows].astype(np.float32), p, atol=1e-3)
            assert np.abs(by_hand[(1 - k, s)][0][rows] - p).max() > 0.05  # the other fold's would differ
            assert np.abs(by_hand[(k, 3 - s)][0][rows] - p).max() > 0.05  # so would the fold's other snapshot
        mean = (by_hand[(k, 1)][0][rows] + by_hand[(k, 2)][0][rows]) / 2
        np.testing.assert_allclose(saved["probabilities"][rows].astype(np.float32), mean, atol=1e-3)
        head = (by_hand[(k, 1)][1][rows] + by_hand[(k, 2)][1][rows]) / 2
        np.testing.assert_allclose(saved["has_salt"][rows], head, rtol=0, atol=1e-5)
        assert np.abs((by_hand[(1 - k, 1)][1][rows] + by_hand[(1 - k, 2)][1][rows]) / 2 - head).min() > 0.01


def test_folds_of_different_sizes_store_the_fold_mean_and_head_and_evaluate_says_why(collected, tmp_path, capsys):
    parent = str(tmp_path / "parent")
    shutil.copytree(collected[0], parent)
    shutil.rmtree(rundir.snapshot_dir(os.path.join(parent, "fold-1"), 2))  # fold-1: one model, fold-0: two
    collect = f"python -m salt_tf.cv collect --parent={parent}"
    # oof.npz of two models per fold and an oof.json of before it named the models: the model count tells.
    _write_oof_summary(parent, 0.5)
    status, line = _error(capsys, "evaluate", f"--model_dir={parent}")
    assert status == 2 and "out-of-fold predictions of 2 models per fold" in line and collect in line, line

    status, output = _cv("collect", f"--parent={parent}")
    assert status == 0, output
    lines = [line for line in output.splitlines() if "different numbers of models" in line]
    assert lines == ["no per-model out-of-fold predictions stored: the folds have different numbers of models "
                     "(fold-0 2, fold-1 1); predict evaluate will evaluate their mean only"], output
    saved = oof.load(os.path.join(parent, rundir.OOF_FILE))
    assert "member_probabilities" not in saved and saved["has_salt"].shape == (160,)
    assert predict.main(["predict", "evaluate", f"--model_dir={parent}"]) == 0
    out = capsys.readouterr().out
    assert "the fold mean only: the folds have different numbers of models (3 in 2 folds)" in out, out
    assert "the post-processing may gate on the image head" in out and "stacked of" not in out
    assert "image head (the mean of the models of each image's fold): accuracy" in out


def _evaluate_hand_made(capsys, parent, truth, members, has_salt=None):
    """`predict evaluate` of `parent` on a hand-made oof.npz (member_probabilities `members`, stored float16 as
    collect stores them; the fold mean their mean) and an oof.json naming the parent's models: (the choice
    written to ensemble.json, the printed output)."""
    members = np.asarray(members, np.float16)
    n = len(truth)
    arrays = {"ids": np.array([f"x{i:03d}" for i in range(n)]), "masks": truth.astype(np.uint8),
              "probabilities": members.astype(np.float32).mean(axis=0).astype(np.float16),
              "member_probabilities": members, "fold": np.arange(n) % 2, "scores_at_half": np.zeros(n),
              "scores_cv": np.zeros(n)}
    if has_salt is not None:
        arrays["has_salt"] = np.asarray(has_salt, np.float32)
    oof.save(os.path.join(parent, rundir.OOF_FILE), arrays)
    _write_oof_summary(parent, 0.5, models=[e.info() for e in exports.find_exports(parent)])
    status = predict.main(["predict", "evaluate", f"--model_dir={parent}"])
    out, err = capsys.readouterr()
    assert status == 0, err
    return ensemble.Ensemble.load(os.path.join(parent, rundir.ENSEMBLE_FILE)), out


def test_evaluate_stacks_the_member_positions_of_the_oof_predictions(collected, tmp_path, capsys):
    parent = str(tmp_path / "parent")
    shutil.copytree(collected[0], parent)
    # 60 made-up images: member position 1 is close to the truth, position 0 is noise.
    rng = np.random.default_rng(5)
    n = 60
    truth = rng.random((n, 16, 16)) < rng.random((n, 1, 1)) * (rng.random((n, 1, 1)) < 0.7)
    truth_like = np.clip(truth * 0.7 + rng.normal(0.15, 0.1, truth.shape), 0, 1)
    chosen, out = _evaluate_hand_made(capsys, parent, truth, [rng.random(truth.shape), truth_like])
    names = [os.path.join("fold-*", "snapshots", f"snapshot-{s}") for s in (1, 2)]
    assert "2 member position(s)" in out and f"{names[0]} (tta hflip)" in out and "stacked of 2" in out, out
    assert chosen.combine == "stacked" and chosen.stacker.models == names
    assert [m["name"] for m in chosen.models] == [e.name for e in exports.find_exports(parent)]  # all 4 models
    w_noise, w_truth = chosen.stacker.weights
    assert w_truth > 1.0 and abs(w_noise) < 0.1 * w_truth, chosen.stacker.weights
    # The weights minimize the meta-model's objective on ALL the stored OOF images, in position order: the
    # gradient of the mean log-loss + l2/2 |w|^2, computed here in NumPy, vanishes there.
    stored = oof.load(os.path.join(parent, rundir.OOF_FILE))["member_probabilities"].astype(np.float64)
    clip = chosen.stacker.clip
    x = np.log(np.clip(stored, clip, 1 - clip)) - np.log1p(-np.clip(stored, clip, 1 - clip))
    x = x.reshape(2, -1).T
    residual = _sigmoid(x @ chosen.stacker.weights + chosen.stacker.bias) - truth.reshape(-1)
    gradient = np.r_[x.T @ residual / len(residual) + chosen.stacker.l2 * chosen.stacker.weights, residual.mean()]
    assert np.abs(gradient).max() < 1e-6, gradient
    scores = chosen.scores
    assert scores["cv_stacked"] >= scores["cv_mean"] and \
        scores["cv_stacked_postprocessed"] > scores["cv_mean_postprocessed"], scores


def _image_score(truth, predicted):
    """The competition score of one image by brute force: empty truth -> 1 iff nothing predicted; else the share
    of the IoU thresholds 0.5, 0.55, ..., 0.95 that the IoU exceeds."""
    t, p = truth.astype(bool).ravel().tolist(), predicted.astype(bool).ravel().tolist()
    union = sum(a or b for a, b in zip(t, p))
    if not any(t):
        return 1.0 if not any(p) else 0.0
    iou = sum(a and b for a, b in zip(t, p)) / union
    return sum(iou > 0.5 + 0.05 * i for i in range(10)) / 10


def test_evaluate_gates_on_the_oof_image_head_when_it_separates_empty_images(collected, tmp_path, capsys):
    parent = str(tmp_path / "parent")
    shutil.copytree(collected[0], parent)
    # 40 made-up 40x40 images: 30 with a true 20x20 square of salt, predicted shifted by 0..3 pixels; 10 empty,
    # predicted with an as confident 20x20 square. No threshold, component or empty rule tells them apart (every
    # blob has 400 pixels); the image head (0.9 on salt, 0.1 on empty images) does.
    rng = np.random.default_rng(7)
    n = 40
    empty = np.arange(n) % 4 == 0
    truth = np.zeros((n, 40, 40), bool)
    p = rng.uniform(0.0, 0.05, truth.shape)
    for i in range(n):
        top, left = rng.integers(2, 16, size=2)
        dy, dx = rng.integers(0, 4, size=2)
        p[i, top + dy:top + dy + 20, left + dx:left + dx + 20] = 0.8
        truth[i, top:top + 20, left:left + 20] = not empty[i]
    has_salt = np.where(empty, 0.1, 0.9)
    predicted = p > 0.5
    gated = predicted & (has_salt >= 0.2)[:, None, None]
    with_gate = np.mean([_image_score(t, m) for t, m in zip(truth, gated)])
    without = np.mean([_image_score(t, m) for t, m in zip(truth, predicted)])
    assert 0.5 < with_gate < 1.0 and without == pytest.approx(with_gate - 0.25)

    chosen, out = _evaluate_hand_made(capsys, parent, truth, [p, p], has_salt)
    assert "the post-processing may gate on the image head" in out and "image head (the mean of" in out, out
    assert chosen.postprocessing.min_has_salt == 0.2  # the smallest gate of the grid that separates them
    assert chosen.scores[f"cv_{chosen.combine}_postprocessed"] == pytest.approx(with_gate, abs=1e-12)
    # The same OOF predictions without the head: no gate, and each image scored as without it.
    chosen, out = _evaluate_hand_made(capsys, parent, truth, [p, p])
    assert "no image-head gate: oof.npz holds no image-head probabilities" in out, out
    assert chosen.postprocessing.min_has_salt == 0.0
    assert chosen.scores["cv_mean_postprocessed"] == pytest.approx(without, abs=1e-12)


def test_submit_applies_a_stacked_gated_choice_to_the_fold_positions(collected, demo_dir, tmp_path, capsys):
    parent = str(tmp_path / "parent")
    shutil.copytree(collected[0], parent)
    folder, ids, images = _test_images(demo_dir)
    by_hand = {(k, s): _tta_by_hand(rundir.snapshot_dir(os.path.join(parent, f"fold-{k}"), s), images)
               for k in (0, 1) for s in (1, 2)}
    # Position s: the mean over the folds of each fold's snapshot s; the head: the mean over the folds of each
    # fold's mean head.
    positions = [(by_hand[(0, s)][0] + by_hand[(1, s)][0]) / 2 for s in (1, 2)]
    head = np.mean([(by_hand[(k, 1)][1] + by_hand[(k, 2)][1]) / 2 for k in (0, 1)], axis=0)
    weights, bias = np.array([1.8, -0.6]), 0.2
    clipped = [np.clip(q, ensemble.CLIP, 1 - ensemble.CLIP) for q in positions]
    stacked = _sigmoid(sum(w * (np.log(q) - np.log1p(-q)) for w, q in zip(weights, clipped)) + bias)
    threshold = round(float(np.quantile(stacked, 0.6)), 3)
    order = np.sort(head)
    gate = round(float(order[len(order) // 2 - 1] + order[len(order) // 2]) / 2, 4)  # empties half the images
    assert np.abs(head - gate).min() > 1e-5  # no image so close to the gate that float32 could decide it
    expected = (stacked > threshold) & (head >= gate)[:, None, None]
    assert ((stacked > threshold) != ((positions[0] + positions[1]) / 2 > threshold)).sum() > 50  # stacking matters
    assert ((stacked > threshold).any(axis=(1, 2)) & (head < gate)).any()                         # the gate matters

    entries = exports.find_exports(parent)
    names = exports.member_names(entries)
    choice = ensemble.Ensemble(models=[e.info() for e in entries], tta=list(VIEWS), combine="stacked",
                               stacker=ensemble.Stacker(weights, bias, names),
                               postprocessing=postprocess.PostProcessing(threshold=threshold, min_has_salt=gate))
    choice.save(os.path.join(parent, rundir.ENSEMBLE_FILE))
    output = tmp_path / "submission.csv"
    submit = ["submit", f"--model_dir={parent}", f"--images={folder}", f"--output={output}"]
    status, out, err = _submit(capsys, *submit[1:])
    assert status == 0, err
    assert "stacked ensemble of 2 folds (4 models) from ensemble.json" in out and "image head <" in out, out
    submitted_ids, masks = _masks_of(output)
    assert submitted_ids == ids
    differ = masks != expected
    assert np.all(np.abs(stacked[differ] - threshold) < 1e-5)  # only float32 rounding at the threshold

    # A choice fitted on other models, or a meta-model over another number of members: one line each.
    os.remove(output)
    for models, stacker, message in (
            ([{"name": "export", "epoch": 1}], choice.stacker, "fitted on models export (epoch 1) but"),
            (choice.models, ensemble.Stacker(np.ones(3), 0.0, ["a", "b", "c"]), "its meta-model combines 3 members")):
        dataclasses.replace(choice, models=models, stacker=stacker).save(os.path.join(parent, rundir.ENSEMBLE_FILE))
        status, line = _error(capsys, *submit)
        assert status == 2 and message in line and "predict evaluate" in line, line
    assert not output.exists()
