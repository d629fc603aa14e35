"""The competition pipeline (salt_tf.competition): the plan and its FLOP budget by hand, the refusals, the status
file's rules, and the whole pipeline on the demo set run once without a stop and once stopped between stages
(--until) and killed (SIGKILL of every process) inside a training stage, then rerun: the same final files.

The end-to-end test is the only one here that starts processes (the pipeline runs each stage as its own
process; the test is about stopping and resuming them); the others run in this process on files.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from salt_tf import competition, cv, rundir
from salt_tf.model import ModelConfig, forward_flops_per_image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset=kaggle", "--base_width=4", "--depth=2", "--blocks_per_level=1", "--se_ratio=2",
        "--batch_size=8", "--eval_batch_size=32", "--epochs=1", "--progress_every=0", "--summary_images=0",
        "--summary_worst_images=0", "--summary_every_steps=0", "--folds=2"]
# 1-epoch models are too unsure for the band rule to keep any image: keep them all (margin >= 0).
PSEUDO = ["--pseudo_flag=--confidence=margin", "--pseudo_flag=--min_confidence=0"]


def _recipe(folder, demo_dir):
    path = os.path.join(folder, "tiny_cv.cfg")
    with open(path, "w") as f:
        f.write("\n".join(TINY + [f"--data_dir={demo_dir}"]) + "\n")
    return path


def _args(parent, recipe, demo_dir, *extra):
    return [f"--parent={parent}", f"--recipe={recipe}", f"--test_images={os.path.join(demo_dir, 'test', 'images')}",
            *PSEUDO, *extra]


def _main(argv):
    """competition.main in this process: (status, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = competition.main(["competition", *argv])
    return status, out.getvalue()


# ------------------------------------------------------------------------------------------------ the plan

def test_fold_field_becomes_each_folds_number():
    args = cv.fold_arguments(["--extra_data_dir=pl/fold-{fold}", "--init_checkpoint=r1/fold-{fold}", "--epochs=3"],
                             "P", 1)
    assert args == ["--extra_data_dir=pl/fold-1", "--init_checkpoint=r1/fold-1", "--epochs=3", "--fold=1",
                    f"--model_dir={os.path.join('P', 'fold-1')}"]


def test_dry_run_prints_the_plan_and_its_budget_by_hand_and_writes_nothing(demo_dir, tmp_path):
    recipe = _recipe(str(tmp_path), demo_dir)
    parent = str(tmp_path / "p")
    status, out = _main(_args(parent, recipe, demo_dir, "--release_into=" + str(tmp_path / "rel"),
                              "--round2_flag=--epochs=3", "--dry_run"))
    assert status == 0, out
    assert not os.path.exists(parent) and not os.path.exists(tmp_path / "rel")
    assert "round1" in out and "<= " in out  # the table, with round 2's upper bound
    gflop = forward_flops_per_image(ModelConfig(base_width=4, depth=2, blocks_per_level=1, se_ratio=2)) / 1e9
    labelled, tests, views = 160, 8, 2   # the demo set; TTA identity + hflip
    # round 1: 2 folds x 1 epoch x every labelled image (training or validation), then collect's 1 model x 2 views.
    expected = {"round1": (1 * 2 * labelled + labelled * views) * gflop / 1e3,
                "pseudo-0": tests * views * gflop / 1e3, "pseudo-1": tests * views * gflop / 1e3,
                # round 2: 3 epochs; the pseudo-labels are not made yet: every test image, an upper bound
                "round2": (3 * (2 * labelled + 2 * tests) + labelled * views) * gflop / 1e3,
                "compare": 0.0, "evaluate": 0.0, "submit": tests * views * 2 * gflop / 1e3, "release": 0.0}
    options = competition.Options(parent=parent, recipe=recipe, test_images=os.path.join(demo_dir, "test", "images"),
                                  stage_flags={"round2": ["--epochs=3"]}, release_into=str(tmp_path / "rel"))
    stages = competition.plan(options)
    assert [s.name for s in stages] == list(expected)
    for stage in stages:
        assert stage.tflop == pytest.approx(expected[stage.name], rel=1e-9, abs=1e-12), stage.name
        assert stage.bound == (stage.name == "round2")
    # Once a fold's pseudo-labels exist, round 2 counts them, not the bound: fold 0 keeps 3, fold 1 keeps 5.
    for k, kept in ((0, 3), (1, 5)):
        folder = os.path.join(parent, "pseudo", f"fold-{k}")
        os.makedirs(folder)
        with open(os.path.join(folder, "train.csv"), "w") as f:
            f.write("id,rle_mask\n" + "".join(f"i{j},\n" for j in range(kept)))
    round2 = {s.name: s for s in competition.plan(options)}["round2"]
    assert round2.tflop == pytest.approx((3 * (2 * labelled + 8) + labelled * views) * gflop / 1e3, rel=1e-9)
    assert not round2.bound
    assert "--extra_data_dir=" + os.path.join(parent, "pseudo", "fold-{fold}") in out
    assert "--init_checkpoint=" + os.path.join(parent, "round1", "fold-{fold}") in out


@pytest.mark.parametrize("extra, names", [
    (["--round2_flag=--epochs=0"], "--epochs"),
    (["--round1_flag=--no_such_flag=1"], "no_such_flag"),
    (["--until=round3"], "--until=round3"),
    (["--pseudo=sometimes"], "--pseudo"),
])
def test_bad_flags_stop_with_one_line_before_anything_is_written(demo_dir, tmp_path, extra, names):
    parent = str(tmp_path / "p")
    status, out = _main(_args(parent, _recipe(str(tmp_path), demo_dir), demo_dir, *extra))
    assert status == 2 and out.startswith("error:") and names in out and out.count("\n") == 1, out
    assert not os.path.exists(parent)


def test_a_folder_it_did_not_make_is_refused(demo_dir, tmp_path):
    parent = tmp_path / "p"
    parent.mkdir()
    (parent / "notes.txt").write_text("mine")
    status, out = _main(_args(str(parent), _recipe(str(tmp_path), demo_dir), demo_dir))
    assert status == 2 and "notes.txt" in out and out.count("\n") == 1, out
    assert sorted(os.listdir(parent)) == ["notes.txt"] and (parent / "notes.txt").read_text() == "mine"


def _stage(name, output=None):
    return competition.Stage(name, ("-m", "salt_tf.cv", "compare", "a", "b"), "test", output=output)


def test_a_finished_stage_is_not_redone_with_another_command(tmp_path):
    parent = str(tmp_path)
    options = competition.Options(parent=parent, recipe="r.cfg", test_images="t")
    record = {"status": "done", "command": ["python", "-m", "salt_tf.cv", "compare", "a", "OTHER"]}
    rundir.write_json(os.path.join(parent, rundir.PIPELINE_FILE), {"stages": {"compare": record}})
    with pytest.raises(competition.PipelineError, match="compare: finished with another command"):
        competition.check_parent(options, [_stage("compare")])
    record["command"] = _stage("compare").command()  # the same command: accepted
    rundir.write_json(os.path.join(parent, rundir.PIPELINE_FILE), {"stages": {"compare": record}})
    assert competition.check_parent(options, [_stage("compare")])["stages"]["compare"]["status"] == "done"
    record.update(status="running", command=["python", "other"])  # an unfinished stage takes the new command
    rundir.write_json(os.path.join(parent, rundir.PIPELINE_FILE), {"stages": {"compare": record}})
    competition.check_parent(options, [_stage("compare")])


def test_a_folder_written_whole_after_the_last_start_finishes_its_stage(tmp_path):
    output = tmp_path / "pseudo-0"
    stage = _stage("pseudo-0", output=str(output))
    started = time.time()
    assert not competition.output_finished(stage, {"status": "running", "started_unix": started})  # no folder
    output.mkdir()
    os.utime(output, (started + 1, started + 1))
    assert competition.output_finished(stage, {"status": "running", "started_unix": started})
    # A folder older than the start was there before the stage ran (not its output): not taken as finished.
    os.utime(output, (started - 10, started - 10))
    assert not competition.output_finished(stage, {"status": "running", "started_unix": started})
    assert not competition.output_finished(_stage("compare"), {"status": "running", "started_unix": started})


# ------------------------------------------------------------------------------------------------ end to end

def _start(argv):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "salt_tf.competition", *argv], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(process):
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    return output


def _children(pid):
    """The live processes whose parent is `pid`, from /proc (the stages run in sessions of their own: a process
    group kill would miss them)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
    return found


def _kill_tree(process):
    victims = [process.pid]
    pending = [process.pid]
    while pending:  # breadth first over /proc: the pipeline, its stage, the stage's folds
        below = [p for p in _children(pending.pop()) if p not in victims]
        victims += below
        pending += below
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)


def _status(parent):
    path = os.path.join(parent, rundir.PIPELINE_FILE)
    return json.load(open(path))["stages"] if os.path.isfile(path) else {}


def _final_files(parent, release):
    """What the pipeline makes, path-free: the submission, the final round's models, choice and OOF scores."""
    files = {"submission.csv": open(os.path.join(parent, "submission.csv"), "rb").read()}
    for k in (0, 1):
        export = os.path.join(parent, "round2", f"fold-{k}", "export")
        for name in sorted(os.listdir(export)):
            files[f"fold-{k}/{name}"] = open(os.path.join(export, name), "rb").read()
    for folder in ("fold-0", "fold-1"):
        files["pseudo/" + folder] = open(os.path.join(parent, "pseudo", folder, "train.csv"), "rb").read()
    files["ensemble.json"] = json.load(open(os.path.join(parent, "round2", "ensemble.json")))
    sums = dict(line.split()[::-1] for line in open(os.path.join(release, "SHA256SUMS")))
    files["released weights"] = {p: h for p, h in sums.items() if "weights" in p}
    return files


def _normalised(files, parent, release):
    text = json.dumps(files["ensemble.json"]).replace(parent, "P").replace(release, "R")
    return {**files, "ensemble.json": text}


@pytest.mark.slow
def test_stopped_between_stages_and_killed_inside_one_it_resumes_to_the_same_files(demo_dir, tmp_path):
    recipe = _recipe(str(tmp_path), demo_dir)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rel_a, rel_b = str(tmp_path / "rel_a"), str(tmp_path / "rel_b")
    _finish(_start(_args(a, recipe, demo_dir, f"--release_into={rel_a}")))

    # Stopped between stages: --until ends after pseudo-0; the rerun skips what is done.
    _finish(_start(_args(b, recipe, demo_dir, f"--release_into={rel_b}", "--until=pseudo-0")))
    assert [s["status"] for s in _status(b).values()].count("done") == 2
    # Killed inside a stage: every process of the pipeline, SIGKILL, while round 2's folds train.
    process = _start(_args(b, recipe, demo_dir, f"--release_into={rel_b}"))
    deadline = time.time() + 600
    while not (_status(b).get("round2", {}).get("status") == "running"
               and os.path.isdir(os.path.join(b, "round2", "fold-0", "checkpoints"))):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.1)
    _kill_tree(process)
    assert _status(b)["round2"]["status"] == "running"  # killed inside the stage, which had not finished
    output = _finish(_start(_args(b, recipe, demo_dir, f"--release_into={rel_b}")))
    for name in ("round1", "pseudo-0", "pseudo-1"):
        assert f"pipeline: {name}: done (skipped" in output
    stages = _status(b)
    assert all(s["status"] == "done" for s in stages.values()), stages
    assert stages["round2"]["attempts"] == 2 and stages["round1"]["attempts"] == 1
    assert stages["pseudo-0"]["attempts"] == 1 and stages["submit"]["attempts"] == 1
    assert os.path.getsize(os.path.join(b, "logs", "round2.log")) > 0

    files_a, files_b = (_normalised(_final_files(p, r), p, r) for p, r in ((a, rel_a), (b, rel_b)))
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        assert files_a[name] == files_b[name], name
