"""Fold ensembles in predict (issue 21 item 3): a CV parent as --model_dir of `predict submit` (every fold's models,
each fold weighing the same) and of `predict evaluate` (the choice made on the parent's oof.npz, no image
predicted), and the one-line errors of an unfinished parent.

The parents here are made by hand from one tiny trained run (copies as fold-k, record.json naming the fold), so
no cross-validation is trained; tests/test_cv.py runs the real `cv train` and collect.
"""

import contextlib
import io
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from salt_tf import checkpoints, cv, ensemble, exports, metrics, oof, pipeline, predict, rundir, serving
from salt_tf import tta as tta_lib
from salt_tf.data import kaggle
from train_helpers import run_tiny

VIEWS = ("none", "hflip")


@pytest.fixture(scope="module")
def tiny_run(demo_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("fold_ensemble") / "run")
    run_tiny(demo_dir, run_dir, epochs=1)
    return run_dir


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
