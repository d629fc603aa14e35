"""Prediction: TTA against NumPy references, model loading, the submission CSV, bad files, the two
subcommands end to end on a tiny trained run (with their progress display), and the command line."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from absl import flags

import salt_tf
from salt_tf import checkpoints, ensemble, exports, pipeline, predict
from salt_tf import tta as tta_lib  # the tests name their views `tta`
from salt_tf.data import kaggle
from train_helpers import REPO_ROOT, run_tiny

S = 101


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _images(n, channels=1, seed=0):
    return np.random.default_rng(seed).normal(0.0, 2.0, size=(n, S, S, channels)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# TTA.
# Eigen's vectorized sigmoid can round the same value differently (in the last bit) at different memory
# positions, so "exactly" below means to within float32 rounding of the sigmoid (atol 2e-7); the errors the
# tests guard against are of order 0.1.


def test_tta_unflips_each_view_identity_model_gives_sigmoid_of_the_image():
    identity = keras.Sequential([keras.Input((S, S, 1)), keras.layers.Identity()])
    x = _images(5)
    reference = _sigmoid(x[..., 0])
    for tta in [("none", "hflip"), ("none", "hflip", "vflip"), ("none", "vflip")]:
        np.testing.assert_allclose(tta_lib.predict_probabilities(identity, x, batch_size=2, tta=tta), reference,
                                   rtol=0, atol=2e-7, err_msg=str(tta))
    # What forgetting to un-flip would give: the symmetrized image; the test above tells them apart.
    wrong = (_sigmoid(x[..., 0]) + _sigmoid(x[:, :, ::-1, 0])) / 2
    assert np.abs(wrong - reference).max() > 0.1


def test_tta_of_a_flip_equivariant_model_equals_its_plain_prediction():
    conv = keras.layers.Conv2D(1, 1, kernel_initializer=keras.initializers.Constant(1.7),
                               bias_initializer=keras.initializers.Constant(-0.3))
    model = keras.Sequential([keras.Input((S, S, 2)), conv])
    x = _images(6, channels=2, seed=1)
    plain = tta_lib.predict_probabilities(model, x, batch_size=4, tta=("none",))
    tta = tta_lib.predict_probabilities(model, x, batch_size=4, tta=("none", "hflip", "vflip"))
    np.testing.assert_allclose(tta, plain, rtol=0, atol=3e-7)
    np.testing.assert_allclose(plain, _sigmoid(1.7 * x.sum(-1) - 0.3), rtol=0, atol=1e-6)


def test_tta_matches_a_numpy_reference_for_an_asymmetric_model_in_one_trace():
    kernel = np.random.default_rng(2).normal(size=(3, 3, 1, 1)).astype(np.float32)
    conv = keras.layers.Conv2D(1, 3, padding="same", kernel_initializer=keras.initializers.Constant(kernel))
    model = keras.Sequential([keras.Input((S, S, 1)), conv])
    x = _images(7, seed=3)
    f = lambda a: model(a, training=False).numpy()[..., 0].astype(np.float64)  # noqa: E731
    reference = (_sigmoid(f(x)) + _sigmoid(f(x[:, :, ::-1]))[:, :, ::-1]) / 2     # un-flip, then average
    got = tta_lib.predict_probabilities(model, x, batch_size=3)                 # batches of 3, 3, 1
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-6)
    assert got.dtype == np.float32 and got.shape == (7, S, S)
    assert np.abs(got - _sigmoid(f(x))).max() > 0.05                            # TTA did change something
    plain, tta, has_salt = tta_lib.predict_plain_and_tta(model, x, batch_size=5)
    assert has_salt is None  # no image head
    np.testing.assert_allclose(plain, _sigmoid(f(x)), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tta, tta_lib.predict_probabilities(model, x, batch_size=5))
    # One compiled function for the model and views, whatever the batch sizes.
    assert tta_lib.tta_function(model, tta_lib.DEFAULT_TTA, 1).experimental_get_tracing_count() == 1


def test_progress_callback_counts_the_images_done_after_each_batch():
    identity = keras.Sequential([keras.Input((S, S, 1)), keras.layers.Identity()])
    calls = []
    tta_lib.predict_probabilities(identity, _images(7), batch_size=3, progress=lambda *a: calls.append(a))
    assert calls == [(3, 7), (6, 7), (7, 7)]
    calls.clear()
    tta_lib.predict_plain_and_tta(identity, _images(4), batch_size=4, progress=lambda *a: calls.append(a))
    assert calls == [(4, 4)]


def test_parse_tta():
    assert tta_lib.parse_tta("hflip") == ("none", "hflip")
    assert tta_lib.parse_tta("none") == ("none",)
    assert tta_lib.parse_tta("vflip,hflip") == ("none", "hflip", "vflip")
    for bad in ("rot90", "", "none,hflip"):
        with pytest.raises(flags.IllegalFlagValueError, match="--tta"):
            tta_lib.parse_tta(bad)


def test_model_inputs_match_training_preprocessing_with_and_without_depth():
    images = np.random.default_rng(5).integers(0, 256, size=(3, S, S), dtype=np.uint8)
    ids = ["a", "b", "c"]
    x = pipeline.model_inputs(ids, images, kaggle.depth_array({}, ids), use_depth=False)
    np.testing.assert_array_equal(x, images[..., None].astype(np.float32) / np.float32(255.0))
    depths = kaggle.depth_array({"a": 100.0, "b": 250.0, "c": 960.0}, ids)
    x = pipeline.model_inputs(ids, images, depths, use_depth=True)
    assert x.shape == (3, S, S, 2)
    np.testing.assert_allclose(x[:, 0, 0, 1], [0.1, 0.25, 0.96], rtol=1e-6)
    assert np.all(x[..., 1] == x[:, :1, :1, 1])
    with pytest.raises(kaggle.DataError, match="no depth for id 'b'"):
        pipeline.model_inputs(ids, images, kaggle.depth_array({"a": 100.0, "c": 960.0}, ids), use_depth=True)


# ---------------------------------------------------------------------------------------------------------
# The submission file.


def test_submission_round_trips_through_rle_decode(tmp_path):
    rng = np.random.default_rng(4)
    masks = rng.random((4, S, S)) < 0.3
    masks[1] = False                                   # no salt: empty rle_mask
    masks[2] = False
    masks[2, :, 0] = True                              # one full column: a single run "1 101"
    ids = ["0a1b2c3d4e", "ffffffffff", "0000000001", "1234567890"]
    path = str(tmp_path / "submission.csv")
    predict.write_submission(path, ids, masks)
    lines = open(path).read().splitlines()
    assert lines[0] == "id,rle_mask" and lines[2] == "ffffffffff," and lines[3] == "0000000001,1 101"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(frame["id"]) == ids
    for id_, rle, mask in zip(frame["id"], frame["rle_mask"], masks):
        np.testing.assert_array_equal(kaggle.rle_decode(rle), mask.astype(np.uint8), err_msg=id_)


# ---------------------------------------------------------------------------------------------------------
# End to end on a tiny trained run.


@pytest.fixture(scope="module")
def tiny_run(tiny_run_1_epoch):
    """The session's 1-epoch tiny run (conftest); the tests here only read it."""
    assert os.path.isfile(os.path.join(tiny_run_1_epoch, "export", "model.json"))
    return tiny_run_1_epoch


def _main(argv, capsys):
    status = predict.main(["predict", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _read_pngs(folder):
    ids = sorted(os.path.splitext(n)[0] for n in os.listdir(folder) if n.endswith(".png"))
    return ids, np.stack([cv2.imread(os.path.join(folder, f"{i}.png"), cv2.IMREAD_GRAYSCALE) for i in ids])


def test_predict_writes_the_submission_of_the_model(tiny_run, demo_dir, tmp_path, capsys, monkeypatch):
    images_dir = os.path.join(demo_dir, "test", "images")
    ids, images = _read_pngs(images_dir)
    assert len(ids) == 8
    # An independent reference: the Keras model on the image and its mirror, un-flip, average (NumPy).
    config = json.load(open(os.path.join(tiny_run, "export", "model.json")))
    assert not config["use_depth"]
    [entry] = exports.load_models(os.path.join(tiny_run, "export"))
    x = images[..., None].astype(np.float32) / 255.0
    logits = entry.model(x, training=False).numpy()[..., 0]
    flipped = entry.model(x[:, :, ::-1].copy(), training=False).numpy()[..., 0][:, :, ::-1]
    reference = (_sigmoid(logits) + _sigmoid(flipped)) / 2
    threshold = float(np.quantile(reference, 0.7))  # ~30% salt pixels whatever one epoch learnt

    # Chunks of 6 images (2 batches of 3): the 8 images in two chunks; a plain progress line after the first.
    monkeypatch.setattr(predict, "CHUNK_IMAGES", 6)
    output, masks_dir = str(tmp_path / "submission.csv"), str(tmp_path / "masks")
    status, out, err = _main(["submit", f"--model_dir={tiny_run}/export", f"--images={images_dir}",
                              f"--output={output}", f"--masks_dir={masks_dir}", f"--threshold={threshold}",
                              "--batch_size=3"], capsys)
    assert status == 0, err
    assert [line.split("  ")[0] for line in out.splitlines() if line.startswith("predict image")] == \
        ["predict image 6/8"]
    assert "img/s" in out and "wrote" in out and ": 8 images (" in out and "images/s" in out
    frame = pd.read_csv(output, dtype=str, keep_default_na=False)
    assert list(frame["id"]) == ids
    decoded = np.stack([kaggle.rle_decode(r) for r in frame["rle_mask"]]).astype(bool)
    expected = reference > threshold
    # Pixels may only disagree where the reference sits on the threshold within float32 rounding.
    assert np.all(np.abs(reference[decoded != expected] - threshold) < 1e-5)
    assert decoded.any() and not decoded.all()
    _, pngs = _read_pngs(masks_dir)
    np.testing.assert_array_equal(pngs > 0, decoded)


# A child that predicts the demo images with the tiny run's export and prints the SHA-256 of the probabilities
# and whether TensorFlow's CPU allocator is the pool (only the BFC pool reports memory info for CPU:0).
_ALLOCATOR_CHILD = """
import hashlib, os, sys
import salt_tf
setting = os.environ.get(salt_tf.CPU_ALLOCATOR_VARIABLE, "unset")  # what TensorFlow will read when it starts
from salt_tf import exports, pipeline, tta
from salt_tf.data import kaggle
import numpy as np, tensorflow as tf
entry = exports.find_exports(sys.argv[1])[0]
exports.restore(entry)
ids, images, _ = kaggle.read_image_folder(sys.argv[2])
x = pipeline.model_inputs(ids, images, np.full(len(ids), np.nan, np.float32), False)
p = tta.predict_probabilities(entry.model, x, batch_size=16, tta=("none", "hflip"))
try:
    tf.config.experimental.get_memory_info("CPU:0")
    pooled = True
except ValueError:
    pooled = False
print("CHILD", hashlib.sha256(p.tobytes()).hexdigest(), pooled, float(p.std()), setting)
"""


def test_commands_use_the_pooled_cpu_allocator_and_it_changes_no_prediction_bit(tiny_run, demo_dir):
    results = {}
    for value in ("", "false"):  # "": the environment without the variable, as a user's shell has it
        env = {k: v for k, v in os.environ.items() if k != salt_tf.CPU_ALLOCATOR_VARIABLE}
        if value:
            env[salt_tf.CPU_ALLOCATOR_VARIABLE] = value
        done = subprocess.run([sys.executable, "-c", _ALLOCATOR_CHILD, os.path.join(tiny_run, "export"),
                               os.path.join(demo_dir, "train", "images")],
                              env=dict(env, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        _, digest, pooled, spread, setting = next(l for l in done.stdout.splitlines()
                                                  if l.startswith("CHILD")).split()
        results[value] = (digest, pooled, setting)
        assert float(spread) > 1e-3  # the probabilities are not a constant that any allocator would reproduce
    assert results[""][2] == "true"  # salt_tf's import set the pool for TensorFlow, which starts after it
    assert results[""][1] == "True"  # and TensorFlow runs with it (the pool keeps CPU:0's memory info)
    # The user's choice is kept. (Whether CPU:0 has memory info without the pool differs by machine: none on the
    # AVX2 Zen 3 of 2026-12-07, some on the Zen 4 of the same night, so only the setting is checked here.)
    assert results["false"][2] == "false"
    assert results[""][0] == results["false"][0]


def test_bad_png_stops_with_one_line_and_no_csv_or_is_skipped(tiny_run, demo_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(os.path.join(demo_dir, "test", "images"), folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = str(tmp_path / "submission.csv")
    argv = ["submit", f"--model_dir={tiny_run}", f"--images={folder}", f"--output={output}"]
    status, out, err = _main(argv, capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "broken.png" in err and "--skip_bad" in err
    assert not os.path.exists(output) and not [n for n in os.listdir(tmp_path) if n.startswith("submission")]

    good = sorted(os.path.splitext(n)[0] for n in os.listdir(folder) if n != "broken.png")
    # Kaggle rejects a submission with a test id missing: by default the bad image gets an empty mask, in id
    # order, and one line says so; the readable images' rows are those of a run without the bad file.
    status, out, err = _main(argv + ["--skip_bad"], capsys)
    assert status == 0, err
    frame = pd.read_csv(output, dtype=str, keep_default_na=False)
    assert list(frame["id"]) == sorted(good + ["broken"])
    assert frame.set_index("id").loc["broken", "rle_mask"] == ""
    assert "skipped" in err and "1 unreadable file(s) written as empty masks" in err.splitlines()[-1] and \
        "broken.png" in err.splitlines()[-1]
    with_bad = frame[frame["id"] != "broken"].reset_index(drop=True)
    os.remove(folder / "broken.png")
    status, _, _ = _main(argv, capsys)
    assert status == 0
    pd.testing.assert_frame_equal(with_bad, pd.read_csv(output, dtype=str, keep_default_na=False))
    # --nobad_as_empty leaves the row out, and says Kaggle rejects that.
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    status, out, err = _main(argv + ["--skip_bad", "--nobad_as_empty"], capsys)
    assert status == 0, err
    assert list(pd.read_csv(output, dtype=str, keep_default_na=False)["id"]) == good
    assert "left out of" in err.splitlines()[-1] and "Kaggle rejects" in err.splitlines()[-1]


def test_command_line_process_fails_before_loading_tensorflow(tiny_run, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "salt_tf.predict", "submit", f"--model_dir={tiny_run}",
                             f"--images={folder}", f"--output={tmp_path / 'out.csv'}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {folder / 'empty.png'}: file is empty; re-download or "
                                                  "remove it (--skip_bad predicts the others)"]
    assert not (tmp_path / "out.csv").exists()


def test_bad_model_folders_give_one_line_errors(tiny_run, demo_dir, tmp_path, capsys):
    images = os.path.join(demo_dir, "test", "images")
    broken = tmp_path / "broken_export"
    shutil.copytree(os.path.join(tiny_run, "export"), broken)
    for name in os.listdir(broken):
        if name.startswith("weights") and name.endswith(".index"):
            os.remove(broken / name)
    truncated = tmp_path / "truncated_export"  # a copy cut short by a full disk or an interrupted transfer
    shutil.copytree(os.path.join(tiny_run, "export"), truncated)
    for name in os.listdir(truncated):
        if name.startswith("weights") and ".data-" in name:
            with open(truncated / name, "r+b") as f:
                f.truncate(os.path.getsize(truncated / name) // 2)
    garbled = tmp_path / "garbled_export"
    garbled.mkdir()
    (garbled / "model.json").write_text("{oops")
    cases = [(str(tmp_path / "nowhere"), "not found"),
             (str(tmp_path), "no exported model"),
             (str(garbled), "model.json: not valid JSON"),
             (str(broken), "cannot restore the exported weights"),
             (str(truncated), "cannot restore the exported weights")]
    for path, message in cases:
        status, _, err = _main(["submit", f"--model_dir={path}", f"--images={images}",
                                f"--output={tmp_path / 'out.csv'}"], capsys)
        assert status == 2, path
        assert err.count("\n") == 1 and err.startswith(f"error: {path}") and message in err, err
    assert not (tmp_path / "out.csv").exists()
    status, _, err = _main(["submit", f"--model_dir={tiny_run}", "--tta=rot90", f"--images={images}",
                            f"--output={tmp_path / 'out.csv'}"], capsys)
    assert status == 2 and err.startswith("error: --tta=rot90")


def test_evaluate_then_predict_with_the_ensemble(tiny_run, demo_dir, tmp_path, capsys, monkeypatch):
    # One model (export/): stacking rows say n/a; ensemble.json holds the post-processing.
    single = str(tmp_path / "single")
    shutil.copytree(tiny_run, single)
    shutil.rmtree(os.path.join(single, "snapshots"), ignore_errors=True)  # whatever training made: none here
    status, out, err = _main(["evaluate", f"--model_dir={single}", "--folds=4"], capsys)
    assert status == 0, err
    assert "export (plain)" in out and "export (tta hflip)" in out and "mean of 1 (tta hflip)" in out
    stacked = [line for line in out.splitlines() if line.startswith("stacked")]
    assert len(stacked) == 2 and all(line.split()[-4:] == ["n/a"] * 4 for line in stacked)
    saved = json.load(open(os.path.join(single, "ensemble.json")))
    assert saved["combine"] == "mean" and [m["name"] for m in saved["models"]] == ["export"]

    # Two snapshots (the second one's head shifted, so they differ): the stacked rows get numbers.
    run = str(tmp_path / "snapshots_run")
    shutil.copytree(tiny_run, run)
    shutil.rmtree(os.path.join(run, "snapshots"), ignore_errors=True)
    [entry] = exports.load_models(os.path.join(run, "export"))
    checkpoints.export_snapshot(run, 1, entry.model, dict(entry.config, epoch=1))
    entry.model.head.conv.bias.assign(entry.model.head.conv.bias - 1.0)
    checkpoints.export_snapshot(run, 2, entry.model, dict(entry.config, epoch=2))
    monkeypatch.setattr(predict, "CHUNK_IMAGES", 8)  # plain progress lines every 8 images
    status, out, err = _main(["evaluate", f"--model_dir={run}", "--folds=4", "--batch_size=4"], capsys)
    assert status == 0, err
    # Images done of the 32 validation images, each model's pass counting half: the line at 16 falls between
    # the two snapshots' passes; one line per multiple of 8 below 32 (none at the end).
    assert "on 32 images" in out
    assert [line.split("  ")[0] for line in out.splitlines() if line.startswith("evaluate image")] == \
        ["evaluate image 8/32", "evaluate image 16/32", "evaluate image 24/32"]
    for name in ("snapshots/snapshot-1 (plain)", "snapshots/snapshot-2 (tta hflip)", "mean of 2 (tta hflip)",
                 "stacked of 2 (tta hflip, out-of-fold)", "mean + postprocessing", "stacked + postprocessing",
                 "chosen:"):
        assert name in out, name
    row = next(line for line in out.splitlines() if line.startswith("stacked of 2"))
    assert "n/a" not in row
    chosen = ensemble.Ensemble.load(os.path.join(run, "ensemble.json"))
    assert [m["name"] for m in chosen.models] == ["snapshots/snapshot-1", "snapshots/snapshot-2"]

    # predict applies what evaluate chose: same masks as the saved ensemble on the two models' TTA output.
    images_dir = os.path.join(demo_dir, "test", "images")
    output = str(tmp_path / "submission.csv")
    status, out, err = _main(["submit", f"--model_dir={run}", f"--images={images_dir}", f"--output={output}"], capsys)
    assert status == 0, err
    assert "ensemble.json" in out
    ids, images = _read_pngs(images_dir)
    x = images[..., None].astype(np.float32) / 255.0
    probabilities = [tta_lib.predict_probabilities(e.model, x, tta=tuple(chosen.tta))
                     for e in exports.load_models(run)]
    frame = pd.read_csv(output, dtype=str, keep_default_na=False)
    decoded = np.stack([kaggle.rle_decode(r) for r in frame["rle_mask"]]).astype(bool)
    np.testing.assert_array_equal(decoded, chosen.masks(probabilities))

    # A new snapshot since evaluate: the saved ensemble no longer matches; say so.
    checkpoints.export_snapshot(run, 3, entry.model, dict(entry.config, epoch=3))
    status, _, err = _main(["submit", f"--model_dir={run}", f"--images={images_dir}", f"--output={output}"], capsys)
    assert status == 2 and "rerun `python -m salt_tf.predict evaluate`" in err and err.count("\n") == 1


def test_evaluate_a_real_snapshot_run(demo_dir, tmp_path, capsys):
    """The snapshots the training loop itself exports (cosine schedule, 2 cycles) are what load_models and
    evaluate pick up, in order."""
    run = str(tmp_path / "cosine")
    run_tiny(demo_dir, run, epochs=2, lr_schedule="cosine", snapshot_cycles=2)
    names = [e.name for e in exports.find_exports(run)]
    assert len(names) == 2 and all(n.startswith("snapshots" + os.sep + "snapshot-") for n in names)
    status, out, err = _main(["evaluate", f"--model_dir={run}", "--folds=3", "--tta=none"], capsys)
    assert status == 0, err
    assert f"{names[0]} (plain)" in out and f"{names[1]} (plain)" in out and "(tta" not in out
    row = next(line for line in out.splitlines() if line.startswith("stacked of 2 (out-of-fold)"))
    assert "n/a" not in row
    # The breakdown table's "all" column is the plain row's metric at 0.5 (the same masks).
    lines = out.splitlines()
    breakdown = lines.index(next(line for line in lines if line.startswith("where the points are lost")))
    for name in names:
        plain_at_half = next(line for line in lines if line.startswith(f"{name} (plain)")).split()[2]
        assert next(line for line in lines[breakdown:] if line.startswith(f"{name} (plain)")).split()[2] == \
            plain_at_half
    assert any(line.startswith("mean of 2 (plain)") for line in lines[breakdown:])
    assert any(line.startswith("vs the best single model by cv") for line in lines)
    assert [m["name"] for m in ensemble.Ensemble.load(os.path.join(run, "ensemble.json")).models] == names


def test_image_head_probability_is_averaged_over_the_views():
    """A deeply supervised U-Net: the head's TTA probability is the mean over identity and hflip of the sigmoid
    of its logit, computed here from the model's forward pass on flipped images; masks are unchanged by it."""
    from salt_tf import model as model_lib

    keras.utils.set_random_seed(4)
    model = model_lib.build_model(model_lib.ModelConfig(base_width=2, depth=2, blocks_per_level=1,
                                                        deep_supervision=True, input_size=104))
    x = _images(5, seed=6)
    probabilities, has_salt = tta_lib.predict_with_head(model, x, batch_size=2)
    logit = lambda a: model.forward(tf.constant(a))["has_salt"].numpy().astype(np.float64)  # noqa: E731
    np.testing.assert_allclose(has_salt, (_sigmoid(logit(x)) + _sigmoid(logit(x[:, :, ::-1]))) / 2, atol=1e-6)
    np.testing.assert_array_equal(probabilities, tta_lib.predict_probabilities(model, x, batch_size=2))
    assert probabilities.shape == (5, 101, 101)
    assert tta_lib.mean_head([None, has_salt, has_salt * 0]) == pytest.approx(has_salt / 2)
    assert tta_lib.mean_head([None, None]) is None


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_submit_on_a_terminal_shows_a_live_bar(tiny_run, demo_dir, tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(predict, "CHUNK_IMAGES", 4)  # plain lines would come every 4 images: the bar replaces them
    status = predict.main(["predict", "submit", f"--model_dir={tiny_run}", "--batch_size=2",
                           f"--images={os.path.join(demo_dir, 'test', 'images')}", f"--output={tmp_path / 's.csv'}"])
    out = terminal.getvalue()
    assert status == 0
    assert "\r" in out and "8/8" in out and "predict image" not in out  # redrawn in place, to the last image
    assert out.rstrip().splitlines()[-1].startswith(f"wrote {tmp_path / 's.csv'}: 8 images")


# ---------------------------------------------------------------------------------------------------------
# The command line: subcommands, their help, the old forms.


def test_old_command_lines_name_the_new_form_and_write_nothing(tiny_run, tmp_path, capsys):
    output = tmp_path / "out.csv"
    cases = [
        ([f"--model_dir={tiny_run}", "--images=test images", f"--output={output}"],
         f"python -m salt_tf.predict submit --model_dir={tiny_run} '--images=test images' --output={output}"),
        ([f"--model_dir={tiny_run}", "--evaluate", "--folds=4"],
         f"python -m salt_tf.predict evaluate --model_dir={tiny_run} --folds=4"),
        (["--evaluate=false", f"--model_dir={tiny_run}"], f"python -m salt_tf.predict submit --model_dir={tiny_run}"),
        (["--evaluate"], "python -m salt_tf.predict evaluate"),
    ]
    for argv, new_form in cases:
        status, out, err = _main(argv, capsys)
        assert status == 2 and out == "", argv
        assert err.count("\n") == 1 and err.startswith("error: salt_tf.predict: the command is now `"), err
        assert f"`{new_form}`" in err, err
    assert os.listdir(tmp_path) == [] and not os.path.exists(os.path.join(tiny_run, "ensemble.json"))


def test_unknown_or_missing_subcommand_and_stray_arguments_are_one_line(capsys):
    for argv, expected in [([], "a command is needed; the commands are submit, evaluate"),
                           (["sumbit", "--model_dir=x"], "unknown command 'sumbit'; the commands are submit, evaluate"),
                           (["submit", "x", "--model_dir=y"], "unexpected arguments: x; flags take the form"),
                           (["evaluate"], "--model_dir is required"),
                           (["evaluate", "--model_dir=x", "--images=y"], "Unknown command line flag 'images'"),
                           (["submit", "--model_dir=x", "--batch_size=0"], "--batch_size")]:
        status, out, err = _main(argv, capsys)
        assert status == 2 and out == "", argv
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, (argv, err)


def test_each_subcommand_has_its_own_help(capsys):
    status, out, _ = _main(["--help"], capsys)
    assert status == 0
    listed = [line.split()[0] for line in out.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == ["submit", "evaluate"]
    flags_of = {}
    for command in ("submit", "evaluate"):
        status, out, _ = _main([command, "--help"], capsys)
        assert status == 0 and out.startswith(f"usage: python -m salt_tf.predict {command} --model_dir=")
        flags_of[command] = set(re.findall(r"^  --(?:\[no\])?(\w+):", out, flags=re.M))
    shared = {"model_dir", "tta", "batch_size", "flagfile", "undefok"}
    assert flags_of["submit"] == shared | {"threshold", "use_ensemble", "images", "output", "masks_dir", "skip_bad",
                                           "bad_as_empty", "depths"}
    assert flags_of["evaluate"] == shared | {"data_dir", "eval_ids", "folds", "stack_l2", "write_ensemble"}

