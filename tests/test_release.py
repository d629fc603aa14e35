"""`python -m salt_tf.runs release`: a finished run's model copied into a folder of its own, with its record,
model card and SHA-256 sums, that predict takes as it takes the run.

The references are independent of salt_tf.release: the coreutils `sha256sum -c` and hashlib over the files as
the test reads them, byte comparison of the copies (filecmp), and predict's own output on the run itself.
"""

import filecmp
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from salt_tf import exports, predict, release, rundir, runs


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _runs(argv, capsys):
    status = runs.main(["runs", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return status, out, err


def _tree(folder):
    """{relative path: bytes} of every file under `folder`."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


@pytest.fixture(scope="module")
def run_with_swa(tiny_run_1_epoch, tmp_path_factory):
    """A copy of the session's tiny run with a swa/ export (its export's files) that `predict evaluate` has
    evaluated: run/swa/ensemble.json names its one model "swa"."""
    run = str(tmp_path_factory.mktemp("release") / "run")
    shutil.copytree(tiny_run_1_epoch, run)
    shutil.copytree(os.path.join(run, "export"), os.path.join(run, "swa"))
    assert predict.main(["predict", "evaluate", f"--model_dir={run}/swa", "--folds=4"]) == 0
    return run


def test_a_release_is_a_checked_byte_copy_that_predict_uses_like_the_run(run_with_swa, demo_dir, tmp_path, capsys):
    into = tmp_path / "models" / "tiny"
    status, out, err = _runs(["release", run_with_swa, f"--into={into}", "--model=swa"], capsys)
    assert status == 0, err
    assert f"into {into}" in out and "note:" not in out

    # The model and the run's files, byte for byte; nothing else of the run (checkpoints, events).
    for name in os.listdir(os.path.join(run_with_swa, "swa")):
        if name != "ensemble.json":
            assert filecmp.cmp(os.path.join(run_with_swa, "swa", name), into / "export" / name, shallow=False)
    for name in ("flags.cfg", "record.json", "split.csv", "metrics.csv"):
        assert filecmp.cmp(os.path.join(run_with_swa, name), into / name, shallow=False)
    assert sorted(_tree(into)) == sorted(
        ["MODEL_CARD.md", "SHA256SUMS", "ensemble.json", "flags.cfg", "metrics.csv", "record.json", "split.csv",
         "export/model.json", "export/weights.index", "export/weights.data-00000-of-00001"])

    # SHA256SUMS lists every other file with its hash: coreutils agrees, and so does hashlib here.
    listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0]
              for line in (into / "SHA256SUMS").read_text().splitlines()}
    assert listed == {path: _sha256(into / path) for path in _tree(into) if path != "SHA256SUMS"}
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=into).returncode == 0
        (into / "flags.cfg").write_text((into / "flags.cfg").read_text() + "--epochs=3\n")
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=into,
                              capture_output=True).returncode == 1
        shutil.copyfile(os.path.join(run_with_swa, "flags.cfg"), into / "flags.cfg")

    # The evaluation of the run's swa/ is carried over, its model renamed to its name in the release.
    carried = json.loads((into / "ensemble.json").read_text())
    original = json.load(open(os.path.join(run_with_swa, "swa", "ensemble.json")))
    assert [m["name"] for m in original["models"]] == ["swa"]
    assert [m["name"] for m in carried["models"]] == ["export"]
    original["models"][0]["name"] = "export"
    assert carried == original

    # predict takes the release as --model_dir and writes what it writes from the run's swa/ (ensemble.json
    # applied in both: the same threshold and rules).
    images = os.path.join(demo_dir, "test", "images")
    for model_dir, output in ((f"{run_with_swa}/swa", tmp_path / "run.csv"), (str(into), tmp_path / "rel.csv")):
        assert predict.main(["predict", "submit", f"--model_dir={model_dir}", f"--images={images}",
                             f"--output={output}"]) == 0
    capsys.readouterr()
    assert (tmp_path / "rel.csv").read_text() == (tmp_path / "run.csv").read_text()

    # A damaged copy of the weights (one bit) is refused before predict uses it, in one line: ensemble.json's
    # weights_sha256 notices first; the loader's own check against SHA256SUMS names the file.
    weights = into / "export" / "weights.data-00000-of-00001"
    intact = weights.read_bytes()
    weights.write_bytes(bytes([intact[0] ^ 1]) + intact[1:])
    status = predict.main(["predict", "submit", f"--model_dir={into}", f"--images={images}",
                           f"--output={tmp_path / 'damaged.csv'}"])
    err = capsys.readouterr().err
    assert status == 2 and not (tmp_path / "damaged.csv").exists()
    assert "fitted on other weights than those of export" in err and err.count("\n") == 1, err
    with pytest.raises(exports.ExportError) as refused:
        exports.load_models(str(into))
    assert f"{weights}: does not have the SHA-256 listed in {into / 'SHA256SUMS'}" in str(refused.value)
    weights.write_bytes(intact)

    # The card names the weights' SHA-256 and the cross-validated score of ensemble.json.
    card = (into / "MODEL_CARD.md").read_text()
    assert _sha256(into / "export" / "weights.data-00000-of-00001") in card
    assert f"**{original['scores']['cv_mean_postprocessed']:.4f}**" in card
    assert f"--model_dir={into}" in card
    released = json.loads((into / "export" / "model.json").read_text())
    assert f"(epoch {released['epoch']}, validation metric {released['val_metric']:.4f})" in card


def test_releasing_the_snapshots_keeps_their_names_and_an_unfitted_choice_stays_behind(run_with_swa, tmp_path,
                                                                                     capsys):
    run = str(tmp_path / "run")
    shutil.copytree(run_with_swa, run)
    for k in (0, 1):
        shutil.copytree(os.path.join(run, "export"), os.path.join(run, "snapshots", f"snapshot-{k}"))
    # A run-level ensemble.json fitted on other snapshots (another epoch) is not carried over ...
    stale = {"models": [{"name": "snapshots/snapshot-0", "epoch": 7}, {"name": "snapshots/snapshot-1", "epoch": 1}]}
    rundir.write_json(os.path.join(run, "ensemble.json"), stale)
    status, out, err = _runs(["release", run, f"--into={tmp_path / 'a'}", "--model=snapshots"], capsys)
    assert status == 0, err
    assert not (tmp_path / "a" / "ensemble.json").exists()
    assert f"note: no ensemble.json fitted on that model; `python -m salt_tf.predict evaluate --model_dir={run}`" \
        in out
    assert sorted(p for p in _tree(tmp_path / "a") if p.startswith("snapshots/")) == sorted(
        f"snapshots/snapshot-{k}/{n}" for k in (0, 1)
        for n in ("model.json", "weights.index", "weights.data-00000-of-00001"))
    # ... one fitted on exactly these (names and epochs, in order) is, unchanged.
    epoch = json.load(open(os.path.join(run, "export", "model.json")))["epoch"]
    fitted = {"models": [{"name": f"snapshots/snapshot-{k}", "epoch": epoch} for k in (0, 1)], "tta": ["none"]}
    rundir.write_json(os.path.join(run, "ensemble.json"), fitted)
    assert _runs(["release", run, f"--into={tmp_path / 'b'}", "--model=snapshots"], capsys)[0] == 0
    assert json.loads((tmp_path / "b" / "ensemble.json").read_text()) == fitted


def _unfinished(run):
    record = json.load(open(os.path.join(run, "record.json")))
    record["started"] = "2999-01-01T00:00:00"  # a session started after the last finish: training again
    rundir.write_json(os.path.join(run, "record.json"), record)


@pytest.mark.parametrize("case, argv, expected", [
    ("unfinished", ["--into={into}"], "its training has not finished"),
    ("no such model", ["--into={into}", "--model=snapshots/snapshot-9"],
     "no exported model there; --model is one of export, swa"),
    ("too large", ["--into={into}", "--max_mb=0.001"], "more than --max_mb=0.001; release one model"),
    ("not a release", ["--into={user}"], "exists and is not a release (no SHA256SUMS); choose another folder"),
    ("a release", ["--into={old}"], "holds a release already; pass --replace"),
    ("inside the run", ["--into={run}/release"], "inside the run"),
    ("no --into", [], "--into is required"),
    ("a CV parent of no K-fold", ["--into={into}"], "fold-0: not a fold run (record.json has no --folds)"),
])
def test_what_cannot_be_released_is_one_line_and_nothing_is_written(run_with_swa, tmp_path, capsys, case, argv,
                                                                   expected):
    run = str(tmp_path / "run")
    shutil.copytree(run_with_swa, run)
    if case == "unfinished":
        _unfinished(run)
    if case == "a CV parent of no K-fold":  # the run becomes fold 0 of a parent (tests/test_release_folds.py: one)
        os.makedirs(tmp_path / "parent")
        shutil.move(run, tmp_path / "parent" / "fold-0")
        run = str(tmp_path / "parent")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    old = tmp_path / "old"
    assert _runs(["release", run_with_swa, f"--into={old}"], capsys)[0] == 0
    before = {"run": _tree(run), "user": _tree(user), "old": _tree(old)}
    into = tmp_path / "new"
    status, out, err = _runs(["release", run, *[a.format(into=into, user=user, old=old, run=run) for a in argv]],
                             capsys)
    assert status == 2 and expected in err and err.count("\n") == 1, err
    assert not into.exists()
    assert {"run": _tree(run), "user": _tree(user), "old": _tree(old)} == before
    assert sorted(os.listdir(tmp_path)) == sorted(["old", "user", os.path.basename(run)])


def test_replace_swaps_a_release_whole(run_with_swa, tmp_path, capsys):
    into = tmp_path / "models" / "salt"
    assert _runs(["release", run_with_swa, f"--into={into}", "--model=swa"], capsys)[0] == 0
    assert (into / "ensemble.json").exists()
    run = str(tmp_path / "run")
    shutil.copytree(run_with_swa, run)
    weights = os.path.join(run, "export", "weights.data-00000-of-00001")
    with open(weights, "r+b") as f:  # another model's weights (the release does not read them)
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    status, out, err = _runs(["release", run, f"--into={into}", "--replace"], capsys)
    assert status == 0, err
    assert _sha256(into / "export" / "weights.data-00000-of-00001") == _sha256(weights)
    assert not (into / "ensemble.json").exists()  # the old release's file went with it
    assert release.read_checksums(str(into))["export/weights.data-00000-of-00001"] == _sha256(weights)
    assert os.listdir(tmp_path / "models") == ["salt"]  # no staging or retired folder left

    # What a person added to the release, or changed in it, is never replaced silently.
    (into / "submission.csv").write_text("id,rle_mask\n")
    with open(into / "flags.cfg", "a") as f:
        f.write("--epochs=3\n")
    status, out, err = _runs(["release", run_with_swa, f"--into={into}", "--replace"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "flags.cfg, submission.csv are not as released" in err and "move them out" in err
    assert _sha256(into / "export" / "weights.data-00000-of-00001") == _sha256(weights)
