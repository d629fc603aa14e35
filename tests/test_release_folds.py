"""`runs release` of a cross-validation parent (issue 36): the fold ensemble copied into a folder that predict takes
as it takes the parent, with --float16 weights on request, and the one-line refusals.

The parent is test_fold_ensemble's `collected` (two folds of a tiny deep-supervision run, two snapshots each, its
split.csv per fold, `cv collect` run), imported from there with its fixtures; `predict evaluate` on it writes the
ensemble.json a release carries. The references are independent of salt_tf.release: the parent's own predictions
(predict submit, exports.predict_members on the parent), hashlib, coreutils `sha256sum -c`, the file sizes.
"""

import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from salt_tf import exports, predict, release, rundir, runs, serving
from test_fold_ensemble import _test_images, collected, head_run  # noqa: F401 (fixtures)
from test_release import _runs, _tree, _unfinished

WEIGHTS_DATA = "weights.data-00000-of-00001"


@pytest.fixture(scope="module")
def evaluated(collected, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """A copy of the collected parent after `predict evaluate` (its ensemble.json, chosen on oof.npz)."""
    parent = str(tmp_path_factory.mktemp("evaluated") / "parent")
    shutil.copytree(collected[0], parent)
    assert predict.main(["predict", "evaluate", f"--model_dir={parent}"]) == 0
    return parent


@pytest.fixture(scope="module")
def released(evaluated, tmp_path_factory):
    """(float32 release, float16 release, the float16 command's output) of the evaluated parent."""
    root = tmp_path_factory.mktemp("released")
    assert runs.main(["runs", "release", evaluated, f"--into={root / 'f32'}"]) == 0
    out = root / "f16.out"
    with open(out, "w") as f:
        import contextlib
        with contextlib.redirect_stdout(f):
            assert runs.main(["runs", "release", evaluated, f"--into={root / 'f16'}", "--float16"]) == 0
    return root / "f32", root / "f16", out.read_text()


def _members(model_dir, images):
    """(members' probabilities, the image head) of every model of `model_dir`, as predict combines them."""
    entries = exports.load_models(str(model_dir))
    return exports.predict_members(entries, [str(i) for i in range(len(images))], images,
                                   np.full(len(images), np.nan, np.float32), ("none", "hflip"), 8)


def test_the_release_holds_every_fold_and_predicts_exactly_what_the_parent_predicts(evaluated, released, demo_dir,
                                                                                 tmp_path, capsys):
    into = released[0]
    files = _tree(into)
    models = [f"fold-{k}/snapshots/snapshot-{s}" for k in (0, 1) for s in (1, 2)]
    assert sorted(files) == sorted(
        ["MODEL_CARD.md", "SHA256SUMS", "ensemble.json", "oof.json"]
        + [f"fold-{k}/{n}" for k in (0, 1) for n in ("flags.cfg", "record.json", "split.csv", "metrics.csv")]
        + [f"{m}/{n}" for m in models for n in ("model.json", "weights.index", WEIGHTS_DATA)])
    for path, content in files.items():  # a float32 release copies the folds' files byte for byte
        if path.startswith("fold-"):
            assert content == open(os.path.join(evaluated, path), "rb").read(), path
    for name in ("ensemble.json", "oof.json"):  # the names are the parent's, so both files are carried unchanged
        assert json.loads(files[name]) == json.load(open(os.path.join(evaluated, name))), name

    # SHA256SUMS: every other file, as hashlib and coreutils compute them.
    listed = dict(reversed(line.split("  ", 1)) for line in files["SHA256SUMS"].decode().splitlines())
    assert listed == {p: hashlib.sha256(c).hexdigest() for p, c in files.items() if p != "SHA256SUMS"}
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=into).returncode == 0

    # Predictions: every member and the image head bit for bit, and the submissions byte for byte.
    folder, ids, images = _test_images(demo_dir)
    (p_members, p_head), (r_members, r_head) = _members(evaluated, images), _members(into, images)
    assert len(p_members) == 2 and p_head is not None
    for a, b in zip(p_members + [p_head], r_members + [r_head]):
        np.testing.assert_array_equal(a, b)
    for model_dir, name in ((evaluated, "parent.csv"), (into, "release.csv")):
        assert predict.main(["predict", "submit", f"--model_dir={model_dir}", f"--images={folder}",
                             f"--output={tmp_path / name}"]) == 0
    out = capsys.readouterr().out
    assert out.count("from ensemble.json") == 2, out
    assert (tmp_path / "parent.csv").read_bytes() == (tmp_path / "release.csv").read_bytes()

    # A damaged fold model is refused before it is used, in one line naming the file.
    weights = into / models[3] / WEIGHTS_DATA
    intact = weights.read_bytes()
    weights.write_bytes(bytes([intact[0] ^ 1]) + intact[1:])
    try:
        status = predict.main(["predict", "submit", f"--model_dir={into}", f"--images={folder}",
                               f"--output={tmp_path / 'damaged.csv'}"])
        err = capsys.readouterr().err
        assert status == 2 and models[3] in err and err.count("\n") == 1, err
        assert not (tmp_path / "damaged.csv").exists()
        entry = exports.find_exports(str(into))[3]  # the loader's own check, against the release's SHA256SUMS
        with pytest.raises(exports.ExportError, match="does not have the SHA-256 listed in .*SHA256SUMS"):
            exports.restore(entry)
    finally:
        weights.write_bytes(intact)

    # serving refuses the release in the one line it gives the parent.
    for model_dir in (evaluated, into):
        status = serving.main(["serving", f"--model_dir={model_dir}", f"--output={tmp_path / 'sm' / '1'}"])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and "a cross-validation parent" in err.replace(
            str(model_dir), "P"), err
    assert not (tmp_path / "sm").exists()


def test_the_card_quotes_the_oof_scores_the_choice_and_the_cv_train_command(evaluated, released):
    into = released[0]
    card = (into / "MODEL_CARD.md").read_text()
    scores = json.load(open(os.path.join(evaluated, "oof.json")))
    choice = json.load(open(os.path.join(evaluated, "ensemble.json")))
    assert "fold ensemble" in card and "| folds | 2:" in card and "| weights | float32, as trained |" in card
    for key in ("at_half", "cv"):
        line = scores[key]
        assert f"{line['all']:.4f}  [{line['ci95'][0]:.4f}, {line['ci95'][1]:.4f}]" in card
        assert "".join(f"{line[g]:>8.4f}" for g in ("empty", "small", "medium", "large") if g in line) in card
    assert f"on the {scores['images']} out-of-fold predictions (oof.npz)" in card
    assert f"threshold {choice['postprocessing']['threshold']}" in card
    assert f"{choice['combine']} of 4 model(s)" in card
    chosen = choice["scores"].get("cv_chosen", choice["scores"].get("cv_mean_postprocessed"))
    assert f"**{chosen:.4f}**" in card
    assert f"python -m salt_tf.cv train --flagfile={into}/fold-0/flags.cfg --parent=<new parent>\n" in card
    assert f"predict submit --model_dir={into} " in card and "refuses a fold ensemble" in card
    for path, digest in release.read_checksums(str(into)).items():
        assert (f"| SHA-256 of `{path}` | `{digest}` |" in card) == path.endswith(WEIGHTS_DATA), path


def test_fold_template_gives_each_folds_value():
    assert release.fold_template(["r1/fold-0", "r1/fold-1", "r1/fold-2"]) == "r1/fold-{fold}"
    assert release.fold_template(["pl/fold-0/images", "pl/fold-1/images"]) == "pl/fold-{fold}/images"
    assert release.fold_template(["a", "b"]) is None
    assert release.fold_template(["x-1", "x-0"]) is None  # fold 0's value must come first


def test_float16_weights_are_about_half_the_size_and_predict_within_1e3(evaluated, released, demo_dir, capsys):
    import tensorflow as tf

    f32, f16, output = released
    card = (f16 / "MODEL_CARD.md").read_text()
    for path in release.read_checksums(str(f32)):
        if path.endswith(WEIGHTS_DATA):
            folder = os.path.dirname(path)
            config = json.loads((f16 / folder / "model.json").read_text())
            assert config[release.WEIGHTS_DTYPE] == "float16"
            kept = config[release.FLOAT32_LAYERS]
            assert all(layer in card for layer in kept)
            # Every float kernel is float16 but those of the layers model.json names (vectors stay float32); the
            # data file holds 2 bytes per float16 value, 4 per float32 one (TensorFlow's reader, sizes counted here).
            reader = tf.train.load_checkpoint(str(f16 / folder / "weights"))
            shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
            floats = {k: int(np.prod(shapes[k])) for k, d in dtypes.items() if d.is_floating}
            half = {k for k in floats if dtypes[k] == tf.float16}
            assert half == {k for k in floats if "/".join(k.split("/")[:3]) not in kept and len(shapes[k]) >= 2}
            others = [reader.get_tensor(k) for k in dtypes if k not in floats]  # the object graph (a string)
            expected = sum(2 * n if k in half else 4 * n for k, n in floats.items()) + sum(
                len(t) if isinstance(t, bytes) else np.asarray(t).nbytes for t in others)
            assert abs(os.path.getsize(f16 / path) - expected) <= 0.02 * expected
            assert os.path.getsize(f16 / path) / os.path.getsize(f32 / path) < 0.75, path
            assert sum(floats[k] for k in half) > 0.5 * sum(floats.values())  # most weights are float16
    _, _, images = _test_images(demo_dir)
    (p_members, p_head), (h_members, h_head) = _members(evaluated, images), _members(f16, images)
    differences = [float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(p_members + [p_head],
                                                                                  h_members + [h_head])]
    assert 0 < max(differences) <= 1e-3, differences  # float16 changed the weights, within the promise
    measured = float(card.split("validation images of each model's run: ")[1].split(" ")[0])
    assert 0 < measured <= 1e-3 and "| weights | stored as float16" in card
    assert f"within {measured:.2g} of float32" in output
    # The carried choice still applies: predict submit says so and loads the float16 models.
    folder, _, _ = _test_images(demo_dir)
    assert predict.main(["predict", "submit", f"--model_dir={f16}", f"--images={folder}",
                         f"--output={f16.parent / 'f16.csv'}"]) == 0
    assert "from ensemble.json" in capsys.readouterr().out


def test_plain_float16_moves_the_tiny_model_too_much_and_the_check_refuses_it(evaluated, tmp_path):
    # Every layer in float16 (no layer kept in float32): the check, on validation images of the fold, finds the
    # probabilities moved by more than 1e-3, measured here by hand against the float32 model, and refuses.
    source = os.path.join(evaluated, "fold-0", "snapshots", "snapshot-2")
    config = json.load(open(os.path.join(source, "model.json")))
    copy = tmp_path / "copy"
    copy.mkdir()
    release.cast_weights(os.path.join(source, "weights"), str(copy / "weights"), "float16")
    (copy / "model.json").write_text(json.dumps(dict(config, **{release.WEIGHTS_DTYPE: "float16"})))
    _, check = release._validation_inputs(os.path.join(evaluated, "fold-0"), None, False)
    [original] = exports.load_models(source)
    [half] = exports.load_models(str(copy))
    def sigmoid(entry):  # the mask probabilities by hand: the Keras model's logits through a float64 sigmoid
        return 1 / (1 + np.exp(-np.asarray(entry.model(check, training=False), np.float64)))

    by_hand = float(np.abs(sigmoid(original) - sigmoid(half)).max())
    assert by_hand > 1e-3, by_hand
    reference = release._probabilities(original.model, check)
    assert release._difference(release._probabilities(half.model, check), reference) >= by_hand - 1e-6
    with pytest.raises(release.ReleaseError, match=r"its float16 weights move a probability by .* more than "
                                                   r"0.001; release it without --float16"):
        release.check_float16(half.model, check, reference, source)


@pytest.mark.parametrize("case, argv, expected", [
    ("unfinished fold", ["--into={into}"], "fold-1: its training has not finished"),
    ("no oof.json", ["--into={into}"], "oof.json: not found; run python -m salt_tf.cv collect"),
    ("other models", ["--into={into}", "--model=export"], "leave out --model"),
    ("too large", ["--into={into}", "--max_mb=0.001"],
     "more than --max_mb=0.001; store float16 weights (--float16), or raise --max_mb"),
    ("not a release", ["--into={user}"], "exists and is not a release (no SHA256SUMS)"),
    ("inside", ["--into={parent}/models"], "inside the run"),
])
def test_what_cannot_be_released_is_one_line_and_nothing_is_written(evaluated, tmp_path, capsys, case, argv,
                                                                   expected):
    parent = str(tmp_path / "parent")
    shutil.copytree(evaluated, parent)
    if case == "unfinished fold":
        _unfinished(os.path.join(parent, "fold-1"))
    if case == "no oof.json":
        os.remove(os.path.join(parent, "oof.json"))
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    before = {"parent": _tree(parent), "user": _tree(user)}
    into = tmp_path / "new"
    status, out, err = _runs(["release", parent, *[a.format(into=into, user=user, parent=parent) for a in argv]],
                             capsys)
    assert status == 2 and expected in err and err.count("\n") == 1, err
    assert not into.exists() and {"parent": _tree(parent), "user": _tree(user)} == before
    assert sorted(os.listdir(tmp_path)) == ["parent", "user"]


def test_a_stale_ensemble_json_stays_behind_with_a_note_and_oof_json_chooses(evaluated, tmp_path, capsys):
    parent = str(tmp_path / "parent")
    shutil.copytree(evaluated, parent)
    path = os.path.join(parent, "ensemble.json")
    stale = json.load(open(path))
    stale["models"][0]["epoch"] = 99  # fitted on an earlier training of fold 0
    rundir.write_json(path, stale)
    status, out, err = _runs(["release", parent, f"--into={tmp_path / 'r'}"], capsys)
    assert status == 0, err
    assert f"note: no ensemble.json fitted on that model; `python -m salt_tf.predict evaluate --model_dir={parent}`" \
        in out
    assert not (tmp_path / "r" / "ensemble.json").exists() and (tmp_path / "r" / "oof.json").exists()
    card = (tmp_path / "r" / "MODEL_CARD.md").read_text()
    assert "No ensemble.json: `predict submit` takes the mean of the folds at oof.json's threshold" in card


def test_a_fold_without_a_run_file_is_refused_in_one_line_before_anything_is_written(evaluated, tmp_path, capsys):
    # fold-1 lost its metrics.csv: its models, record and the out-of-fold files are all there, so only the
    # release's own check of each fold's run files (the four it copies) stands between it and a half-made copy.
    parent = str(tmp_path / "parent")
    shutil.copytree(evaluated, parent)
    os.remove(os.path.join(parent, "fold-1", "metrics.csv"))
    before = _tree(parent)
    status, out, err = _runs(["release", parent, f"--into={tmp_path / 'new'}"], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"{os.path.join(parent, 'fold-1')}: not a run directory with a finished epoch (no metrics.csv)" in err, err
    assert not (tmp_path / "new").exists() and _tree(parent) == before


# ---------------------------------------------------------------------------------------------------------
# Unit level (issue 38's mutants of the fold release): the float16 choice on a hand-made model whose float16
# rounding errors are known, and the check of a fold model's files against the release's SHA256SUMS.


def _three_kernels(a, b, c):
    """A Keras model of mask logits x * (a + b + c) + offset (three 1x1 convolutions and a vector, offset =
    -(a + b + c): logit 0 at x = 1), built and its weights set."""
    import keras

    class ThreeKernels(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (keras.layers.Conv2D(1, 1, use_bias=False) for _ in range(3))
            self.offset = self.add_weight(shape=(1,), initializer="zeros", name="offset")

        def call(self, x, training=False):
            return self.a(x) + self.b(x) + self.c(x) + self.offset

    model = ThreeKernels()
    model(np.zeros((1, 101, 101, 1), np.float32))
    for layer, value in zip((model.a, model.b, model.c), (a, b, c)):
        layer.kernel.assign(np.full((1, 1, 1, 1), value, np.float32))
    model.offset.assign(np.array([-(np.float32(a) + np.float32(b) + np.float32(c))], np.float32))
    return model


def test_float16_keeps_the_most_harmful_layers_until_half_the_tolerance_and_refuses_nan(tmp_path):
    import tensorflow as tf

    from salt_tf import checkpoints

    # float16 rounds 32.0128 to 32 (spacing 1/32 there), 16.0064 to 16 and 8.0032 to 8: at x = 1 each kernel's
    # float16 copy alone lowers the logit from 0 by 0.0128, 0.0064, 0.0032: the probability by ~0.0032, 0.0016,
    # 0.0008 (sigmoid' = 1/4). Within half the tolerance (5e-4) only with all three kept in float32: A alone
    # leaves 0.0024, A and B leave 0.0008 (within the whole 1e-3, not within its half).
    model = _three_kernels(32.0128, 16.0064, 8.0032)
    checkpoints.export_to(str(tmp_path / "f32"), model, {"model": {}})
    source = str(tmp_path / "f32" / "weights")
    reader = tf.train.load_checkpoint(source)
    layers = {}
    for key in reader.get_variable_to_shape_map():
        for name in ("a", "b", "c", "offset"):
            if f"/{name}/" in f"/{key}/":
                layers[name] = "/".join(key.split("/")[:3])
    assert len(set(layers.values())) == 4, layers
    x = np.ones((2, 101, 101, 1), np.float32)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    assert abs((sigmoid(0) - sigmoid(-0.0032)) - 0.0008) < 1e-5 and 5e-4 < sigmoid(0) - sigmoid(-0.0032) <= 1e-3
    reference = (np.full((2, 101, 101), 0.5), None)  # logit 0 everywhere, float64
    kept = release.float16_layers(model, source, x, reference)
    assert kept == [layers["a"], layers["b"], layers["c"]]

    # cast_weights: every kernel float16 but the kept ones; the vector (offset) stays float32.
    release.cast_weights(source, str(tmp_path / "f16" / "weights"), "float16", frozenset([layers["a"]]))
    half = tf.train.load_checkpoint(str(tmp_path / "f16" / "weights"))
    values = {name: half.get_tensor(key) for key in half.get_variable_to_shape_map()
              for name in ("a", "b", "c", "offset") if f"/{name}/" in f"/{key}/"}
    assert values["a"].dtype == np.float32 and values["a"].item() == np.float32(32.0128)
    assert values["b"].dtype == values["c"].dtype == np.float16 and (values["b"].item(), values["c"].item()) == (16, 8)
    assert values["offset"].dtype == np.float32 and values["offset"].item() == -(
        np.float32(32.0128) + np.float32(16.0064) + np.float32(8.0032))

    # A float16 copy whose logits are not numbers (+-70000 overflow float16 to +-inf, and inf - inf) is refused.
    nan_model = _three_kernels(70000.0, -70000.0, 1.0)
    checkpoints.export_to(str(tmp_path / "big"), nan_model, {"model": {}})
    with np.errstate(over="ignore"):
        release.cast_weights(str(tmp_path / "big" / "weights"), str(tmp_path / "big16" / "weights"), "float16")
    release.cast_weights(str(tmp_path / "big16" / "weights"), str(tmp_path / "back" / "weights"), "float32")
    checkpoints.restore_exported_weights(str(tmp_path / "back"), nan_model)
    assert np.isnan(np.asarray(nan_model(x))).all()
    with pytest.raises(release.ReleaseError, match="its float16 weights move a probability by nan"):
        release.check_float16(nan_model, x, (np.full((2, 101, 101), sigmoid(0.0)), None), "big")


def test_a_fold_model_is_checked_against_the_sha256sums_of_its_release(tmp_path):
    into = tmp_path / "release"
    files = {"fold-0/snapshots/snapshot-1/model.json": b"{}", "fold-1/export/model.json": b'{"model": {}}',
             "fold-1/export/weights.index": b"index bytes", "fold-1/flags.cfg": b"--fold=1\n"}
    for path, content in files.items():
        (into / path).parent.mkdir(parents=True, exist_ok=True)
        (into / path).write_bytes(content)
    (into / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(c).hexdigest()}  {p}\n" for p, c in files.items()))
    assert release.release_of(str(into / "fold-1" / "export")) == str(into)
    assert release.release_of(str(into / "fold-0" / "snapshots" / "snapshot-1")) == str(into)
    assert release.read_checksums(str(into)) == {p: hashlib.sha256(c).hexdigest() for p, c in files.items()}
    release.check_model_files(str(into / "fold-1" / "export"))  # intact
    (into / "fold-1" / "export" / "weights.index").write_bytes(b"index bytez")
    with pytest.raises(release.ReleaseError, match=r"weights.index: does not have the SHA-256 listed in .*SHA256SUMS"):
        release.check_model_files(str(into / "fold-1" / "export"))
    # A CV parent (no SHA256SUMS above its folds) is not a release: nothing to check.
    parent = tmp_path / "parent" / "fold-0" / "export"
    parent.mkdir(parents=True)
    assert release.release_of(str(parent)) is None
