"""Reliability: bad input gets one clear line and writes nothing; faults lose at most the current work."""

import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver
from hypothesis import HealthCheck, given, settings, strategies as st

from salt_tf import checkpoints, determinism, records, rundir, train
from salt_tf import flags as salt_flags
from salt_tf.data import kaggle
from salt_tf.stop_signals import StopSignals
from train_helpers import (REPO_ROOT, assert_bit_identical, read_until, run_tiny, selected, side_by_side,
                           tiny_argv, train_process, wait_ok)

FLAGS = flags.FLAGS


# ------------------------------------------------------------------------------------------ bad input


def first_id(root):
    return pd.read_csv(os.path.join(root, "train.csv"), dtype=str).iloc[0]["id"]


def image_path(root, id_, folder="images"):
    return os.path.join(root, "train", folder, f"{id_}.png")


def edit_train_csv(root, rle):
    frame = pd.read_csv(os.path.join(root, "train.csv"), dtype=str, keep_default_na=False)
    frame.loc[0, "rle_mask"] = rle
    frame.to_csv(os.path.join(root, "train.csv"), index=False)


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


BAD_DATA = {
    # case: (how to break a copy of the data, what the one-line message must contain)
    "missing depths.csv": (lambda r, i: os.remove(os.path.join(r, "depths.csv")), "depths.csv: file not found"),
    "missing image folder": (lambda r, i: shutil.rmtree(os.path.join(r, "train", "images")),
                             "images: folder not found"),
    "truncated image": (lambda r, i: truncate(image_path(r, i)), "not a readable image"),
    "empty mask": (lambda r, i: open(image_path(r, i, "masks"), "wb").close(), "file is empty"),
    "not an image": (lambda r, i: open(image_path(r, i), "wb").write(b"GIF89a not really"), "not a readable"),
    "wrong size": (lambda r, i: cv2.imwrite(image_path(r, i), np.zeros((128, 128), np.uint8)),
                   "expected 101x101"),
    "colour image": (lambda r, i: cv2.imwrite(image_path(r, i), np.dstack([np.zeros((101, 101), np.uint8),
                                                                             np.ones((101, 101), np.uint8),
                                                                             np.zeros((101, 101), np.uint8)])),
                     "channels differ"),
    "mask without image": (lambda r, i: os.remove(image_path(r, i)), "listed in train.csv but missing"),
    "image without mask": (lambda r, i: os.remove(image_path(r, i, "masks")), "listed in train.csv but missing"),
    "extra mask file": (lambda r, i: shutil.copy(image_path(r, i, "masks"), image_path(r, "0000000000", "masks")),
                        "has no matching image"),
    "odd RLE": (lambda r, i: edit_train_csv(r, "1 2 3"), "odd number"),
    "overlapping RLE": (lambda r, i: edit_train_csv(r, "1 10 5 3"), "overlap"),
    "out-of-range RLE": (lambda r, i: edit_train_csv(r, "10200 9"), "past the image"),
    "non-integer RLE": (lambda r, i: edit_train_csv(r, "1 2.5"), "not a whole number"),
    "RLE disagrees with mask": (lambda r, i: edit_train_csv(r, "1 3"), "differs from its rle_mask"),
    "duplicate id": (lambda r, i: open(os.path.join(r, "train.csv"), "a").write(f"{i},\n"), "duplicate id"),
    "depth not a number": (lambda r, i: open(os.path.join(r, "depths.csv"), "a").write("abc,deep\n"),
                           "column z must hold numbers"),
}


def run_main(argv):
    """The entry point as a user runs it, in this process: parse flags, then main. Returns (status,
    stderr lines)."""
    salt_flags.define_flags()
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        FLAGS.unparse_flags()
        train.main(train.parse_flags(argv))
    return exit_info.value.code


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_stops_with_one_line_and_writes_nothing(case, tmp_path, demo_dir, capsys):
    root = str(tmp_path / "data")
    shutil.copytree(demo_dir, root)
    breaker, expected = BAD_DATA[case]
    breaker(root, first_id(root))
    model_dir = str(tmp_path / "run")
    status = run_main(tiny_argv(root, model_dir))
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert status == 2
    assert len(lines) == 1 and expected in lines[0], lines
    assert not os.path.exists(model_dir), "nothing may be written before the data is known good"


def test_latin1_and_crlf_csvs_just_work(tmp_path, demo_dir):
    root = str(tmp_path / "data")
    shutil.copytree(demo_dir, root)
    depths = pd.read_csv(os.path.join(root, "depths.csv"), dtype=str)
    depths["note"] = "d\xe9p\xf4t"  # Latin-1 bytes, invalid as UTF-8
    with open(os.path.join(root, "depths.csv"), "wb") as f:
        f.write(depths.to_csv(index=False, lineterminator="\r\n").encode("latin-1"))
    np.testing.assert_array_equal(kaggle.load_labelled(root).depths, kaggle.load_labelled(demo_dir).depths)


def test_missing_train_csv_is_a_flag_error(tmp_path, demo_dir, capsys):
    root = str(tmp_path / "data")
    shutil.copytree(demo_dir, root)
    os.remove(os.path.join(root, "train.csv"))
    status = run_main(tiny_argv(root, str(tmp_path / "run")))
    assert status == 2 and "has no train.csv" in capsys.readouterr().err


def test_model_dir_that_is_a_file(tmp_path, demo_dir, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert run_main(tiny_argv(demo_dir, str(target))) == 2
    assert "is a file" in capsys.readouterr().err


def test_nostrict_skips_bad_examples_and_lists_them(tmp_path, demo_dir):
    root = str(tmp_path / "data")
    shutil.copytree(demo_dir, root)
    ids = list(pd.read_csv(os.path.join(root, "train.csv"), dtype=str)["id"])
    truncate(image_path(root, ids[3]))
    open(image_path(root, ids[7], "masks"), "wb").close()
    model_dir = str(tmp_path / "run")
    run_tiny(root, model_dir, epochs=1, strict=False)
    skipped = pd.read_csv(os.path.join(model_dir, "skipped.csv"), dtype=str)
    assert sorted(skipped["id"]) == sorted([ids[3], ids[7]])
    assert rundir.read_json(os.path.join(model_dir, "record.json"))["data"]["skipped_examples"] == 2
    split = pd.read_csv(os.path.join(model_dir, "split.csv"), dtype=str)
    assert len(split) == 158 and not set(split["id"]) & {ids[3], ids[7]}


def test_failing_write_is_one_line(tmp_path, demo_dir, capsys, monkeypatch):
    def disk_full(path, text):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(rundir, "write_text", disk_full)
    status = run_main(tiny_argv(demo_dir, str(tmp_path / "run")))
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert status == 1 and len(lines) == 1
    assert "cannot write the run directory" in lines[0] and "No space left" in lines[0]


# ------------------------------------------------------------------------------------------ fuzzing


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789 -+x.\n", max_size=40))
def test_rle_decoder_never_crashes(text):
    try:
        mask = kaggle.rle_decode(text)
    except kaggle.DataError as e:
        assert "\n" not in str(e)
    else:
        assert mask.shape == (101, 101) and set(np.unique(mask)) <= {0, 1}


PNG = cv2.imencode(".png", np.arange(101 * 101, dtype=np.uint16).reshape(101, 101))[1].tobytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)).map(
                     lambda p: PNG[:p[0]] + bytes([p[1]]) + PNG[p[0] + 1:]),
                 st.integers(0, len(PNG)).map(lambda n: PNG[:n])))
def test_png_loader_never_crashes(tmp_path, data):
    path = str(tmp_path / "fuzz.png")
    with open(path, "wb") as f:
        f.write(data)
    for kind in ("image", "mask"):
        try:
            array = kaggle.read_png(path, kind=kind)
        except kaggle.DataError as e:
            assert path in str(e) and "\n" not in str(e)
        else:
            assert array.shape == (101, 101) and array.dtype == np.uint8


# ------------------------------------------------------------------------------------------ faults


def test_non_finite_step_is_skipped_and_counted(tmp_path, demo_dir):
    import keras

    from salt_tf import loop, losses, model as model_lib, pipeline, step as step_lib

    data = kaggle.load_labelled(demo_dir)
    images, masks = pipeline.to_arrays(data, use_depth=False)
    step = step_lib.TrainStep(model_lib.build_model(model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=1)),
                              keras.optimizers.Adam(1e-3), losses.CombinedLoss("bce:1"), batch_size=8)
    trainer = loop.run_dir_trainer(
        step, loop.LoopConfig(epochs=1, batch_size=8, eval_batch_size=16, seed=0,
                              augmentation=pipeline.Augmentation(), max_bad_steps=3),
        (images[32:], masks[32:]), (images[:32], masks[:32]), str(tmp_path / "run"))
    good = tf.constant(images[32:40]), tf.constant(masks[32:40])
    poisoned = images[32:40].copy()
    poisoned[2, 50, 50, 0] = np.nan
    before = determinism.weights_fingerprint(step.model.trainable_variables)
    moving_before = determinism.weights_fingerprint(step.model.non_trainable_variables)
    outputs, _ = step.train_step(tf.constant(poisoned), good[1])
    # The NaN reaches the gradient; whether it also reaches the loss depends on the kernels (oneDNN's fused
    # batch norm turns a NaN batch statistic into a finite output), so the guard checks both.
    assert not bool(outputs["finite"])
    assert not (np.isfinite(float(outputs["loss"])) and np.isfinite(float(outputs["gradient_norm"])))
    assert determinism.weights_fingerprint(step.model.trainable_variables) == before
    # Batch-norm moving statistics are updated by the forward pass itself; a skipped step must undo that,
    # or evaluation would run on NaN statistics.
    assert determinism.weights_fingerprint(step.model.non_trainable_variables) == moving_before
    assert int(step.optimizer.iterations) == 0
    outputs, _ = step.train_step(*good)
    assert bool(outputs["finite"]) and int(step.optimizer.iterations) == 1

    # In the loop: every batch poisoned -> skipped and counted, then the run stops after max_bad_steps.
    trainer.train_images = tf.constant(np.full_like(images[32:], np.nan))
    with pytest.raises(loop.TrainingStopped, match="3 consecutive steps") as stopped:
        trainer.train_epoch(0)
    assert stopped.value.exit_code == 3 and int(trainer.state.skipped_steps) == 3
    assert trainer.checkpoints.last.latest_checkpoint is None  # nothing half-trained was saved
    # The message says what is kept, truthfully: no checkpoint is claimed when none exists, and rerunning the
    # same command (which repeats the same steps) is not the advice.
    message = str(stopped.value)
    assert "No checkpoint had been written" in message and "intact" not in message, message
    assert "same command" not in message
    # With a start checkpoint but no finished epoch: nothing to keep, start again.
    trainer.checkpoints.save(trainer.global_step())
    with pytest.raises(loop.TrainingStopped) as stopped:
        trainer.train_epoch(0)
    assert "No epoch had finished" in str(stopped.value) and "intact" not in str(stopped.value)
    # After a finished epoch, the checkpoint named is the newest one, and the way on is a new run from it.
    trainer.state.epoch.assign(1)
    latest = os.path.basename(trainer.checkpoints.save(trainer.global_step()))
    with pytest.raises(loop.TrainingStopped) as stopped:
        trainer.train_epoch(1)
    message = str(stopped.value)
    assert f"The last good checkpoint, {latest} (1 epoch finished), is intact" in message, message
    assert f"--init_checkpoint={trainer.run_dir}" in message


def stop_at(process, needle, stop):
    """Reads the process's output until a line containing needle, then stops it with `stop(process)`; returns
    everything it wrote."""
    try:
        lines = read_until(process, needle)
        stop(process)
        rest, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    return "".join(lines) + rest


def reference_process(demo_dir, model_dir):
    wait_ok(train_process(demo_dir, model_dir))
    return model_dir


def sigterm_and_resume(demo_dir, model_dir):
    """SIGTERM inside epoch 1, then the same command again: what test_sigterm_... checks, in between and after."""
    process = train_process(demo_dir, model_dir, progress_every=1)
    output = stop_at(process, "epoch 1 step 5/", lambda p: p.send_signal(signal.SIGTERM))
    stopped = dict(model_dir=model_dir, returncode=process.returncode, output=output,
                   latest=tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")))
    wait_ok(train_process(demo_dir, model_dir))
    return stopped


def sigkill_and_resume(demo_dir, model_dir):
    """SIGKILL at a seeded random step of epoch 2, then the same command again."""
    step = random.Random(1234).randint(1, 15)  # a seeded random step of epoch 2
    stop_at(train_process(demo_dir, model_dir, progress_every=1), f"epoch 2 step {step}/", lambda p: p.kill())
    # Everything in the run directory is whole: it reads back, and the run resumes from it.
    killed = dict(model_dir=model_dir, metrics_rows=len(records.read_metrics(model_dir)))
    rundir.read_json(os.path.join(model_dir, "record.json"))
    killed["resumed_output"] = wait_ok(train_process(demo_dir, model_dir))
    return killed


SIGTERM_TEST = "test_sigterm_writes_a_checkpoint_and_resume_is_bit_identical"
SIGKILL_TEST = "test_sigkill_at_a_random_step_loses_at_most_the_epoch"


@pytest.fixture(scope="module", autouse=True)
def stopped_runs(request, tmp_path_factory, demo_dir):
    """An uninterrupted reference run, a run stopped by SIGTERM and one killed, each resumed: processes all,
    started when this module starts. A tiny run keeps about one core busy (start-up and tracing are
    single-threaded, its ops small), so the three run side by side, and beside this module's in-process tests,
    rather than one after the other (only those of the selected tests). Yields {name: Future}: a test's
    .result() waits for the runs it checks and raises whatever went wrong in them."""
    root = tmp_path_factory.mktemp("stopped")
    chains = {name: chain for name, chain, tests in (("reference", reference_process, (SIGTERM_TEST, SIGKILL_TEST)),
                                                      ("sigterm", sigterm_and_resume, (SIGTERM_TEST,)),
                                                      ("sigkill", sigkill_and_resume, (SIGKILL_TEST,)))
              if selected(request, *tests)}
    with side_by_side({name: functools.partial(chain, demo_dir, str(root / name))
                       for name, chain in chains.items()}) as futures:
        yield futures


def test_sigterm_writes_a_checkpoint_and_resume_is_bit_identical(stopped_runs):
    stopped = stopped_runs["sigterm"].result()
    output = stopped["output"]
    assert stopped["returncode"] == 128 + signal.SIGTERM, output[-2000:]
    assert "stopped by SIGTERM at epoch 1 step" in output
    latest = stopped["latest"]
    assert latest is not None and not latest.endswith("step-16")  # mid-epoch, not an epoch's end
    assert_bit_identical(stopped_runs["reference"].result(), stopped["model_dir"])


def test_a_second_interrupt_stops_at_once_with_one_line(tmp_path, demo_dir, capsys, monkeypatch):
    """Ctrl-C twice: the first signal asks for a checkpoint after the step, the second (raised by the
    trainer's handler) stops at once, with one 'stopped' line and exit 130, not a traceback. In this
    process: two SIGINTs sent back to back to a subprocess arrive as one (signals do not queue)."""
    stop = StopSignals()
    before = signal.getsignal(signal.SIGINT)
    assert stop.install() and not stop.install()  # a second install is the first one's
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, nothing raised
        assert stop.signum == signal.SIGINT
        stop.request(signal.SIGTERM)  # another worker's stop does not overwrite our own signal
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before

    def interrupted_run(stop_signals):
        raise KeyboardInterrupt  # what the second signal raises from inside the epoch loop

    monkeypatch.setattr(train, "run", interrupted_run)
    model_dir = str(tmp_path / "run")
    try:
        status = run_main(tiny_argv(demo_dir, model_dir))
    except KeyboardInterrupt:  # caught here, or it would end the whole test session
        pytest.fail("KeyboardInterrupt escaped train.main: the user gets a traceback")
    lines = capsys.readouterr().err.splitlines()
    assert status == 128 + signal.SIGINT
    stopped = [l for l in lines if l.startswith("stopped:")]
    assert len(stopped) == 1 and "stopped at once" in stopped[0] and model_dir in stopped[0], lines
    assert not any("Traceback" in l for l in lines), lines


def test_a_start_up_signal_is_not_lost_in_code_that_catches_everything(tmp_path, demo_dir, capsys, monkeypatch):
    """SIGINT while start-up runs library code that catches KeyboardInterrupt (TensorFlow or Keras code may: a
    start-up SIGINT once let a test run train to the end and exit 0): the run still stops before training,
    with one line, exit 130, and nothing written."""
    load_data = train.load_data

    def load_data_during_a_signal():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a Python handler runs between bytecodes: here
        except BaseException:  # what a catch-all in a library does with a KeyboardInterrupt
            pass
        return load_data()

    monkeypatch.setattr(train, "load_data", load_data_during_a_signal)
    before = signal.getsignal(signal.SIGINT)
    model_dir = str(tmp_path / "run")
    status = run_main(tiny_argv(demo_dir, model_dir))
    lines = capsys.readouterr().err.splitlines()
    assert status == 128 + signal.SIGINT, lines
    assert len([l for l in lines if l.startswith("stopped:")]) == 1, lines
    assert not os.path.exists(model_dir)
    assert signal.getsignal(signal.SIGINT) is before  # main put back the handler (SIG_IGN under nohup)


def test_an_interrupt_during_start_up_is_one_line(tmp_path, demo_dir):
    """SIGINT while TensorFlow starts and the data loads (before the trainer's handlers exist)."""
    model_dir = str(tmp_path / "run")
    process = train_process(demo_dir, model_dir)
    read_until(process, "devices:")  # logged right after TensorFlow is imported; the data and model follow
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert len([l for l in output.splitlines() if l.startswith("stopped:")]) == 1, output[-2000:]


def test_sigkill_at_a_random_step_loses_at_most_the_epoch(stopped_runs):
    killed = stopped_runs["sigkill"].result()  # raises if the killed run's files did not read back
    assert killed["metrics_rows"] == 1
    assert "resumed from" in killed["resumed_output"]
    assert_bit_identical(stopped_runs["reference"].result(), killed["model_dir"])


def test_process_exit_status_for_bad_data(tmp_path, demo_dir):
    """The real process: status 2, one error line, nothing written."""
    root = str(tmp_path / "data")
    shutil.copytree(demo_dir, root)
    truncate(image_path(root, first_id(root)))
    process = train_process(root, str(tmp_path / "run"))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2
    assert len([l for l in output.splitlines() if l.startswith("error:")]) == 1
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ the run directory


def error_lines(capsys):
    return [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]


def drop_first_depth(root):
    depths = pd.read_csv(os.path.join(root, "depths.csv"), dtype=str)
    depths[depths["id"] != first_id(root)].to_csv(os.path.join(root, "depths.csv"), index=False)


USER_ERRORS = {
    # case: (flag overrides, how to break a copy of the data or None, what the one line must contain)
    "batch larger than the training set": (dict(batch_size=129), None,
                                           "--batch_size=129 is larger than the 128 training images"),
    "missing depth with --use_depth": (dict(use_depth=True), drop_first_depth, "--use_depth: depths.csv has no depth"),
    "val_images not below the image count": (dict(val_images=160), None,
                                             "--val_images=160 leaves no training or no validation images out of 160"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_error_stops_before_the_run_directory_is_written(case, tmp_path, demo_dir, capsys):
    overrides, breaker, expected = USER_ERRORS[case]
    root = demo_dir
    if breaker:
        root = str(tmp_path / "data")
        shutil.copytree(demo_dir, root)
        breaker(root)
    model_dir = str(tmp_path / "run")
    assert run_main(tiny_argv(root, model_dir, **overrides)) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and expected in lines[0], lines
    # No flags.cfg or split.csv: a corrected retry starts as if this attempt never happened.
    assert not os.path.exists(model_dir)


HOLD_LOCK = ("import sys, time; from salt_tf import records; records.RunDirLock(sys.argv[1]); "
             "print('locked', flush=True); time.sleep(600)")


def test_one_writer_per_run_directory(tmp_path, demo_dir, capsys, monkeypatch):
    from salt_tf import loop

    model_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, model_dir], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_main(tiny_argv(demo_dir, model_dir, epochs=1)) == 2
        lines = error_lines(capsys)
        assert len(lines) == 1 and f"in use by another training process (pid {holder.pid})" in lines[0], lines
        assert os.listdir(model_dir) == [rundir.LOCK_FILE], "the second process wrote into the directory"
    finally:
        holder.kill()
        holder.wait()
    # The holder died holding the lock (kill -9): its lock blocks nobody.
    records.RunDirLock(model_dir).release()
    # A training holds the lock of the directory it creates for its whole run, and releases it at the end.
    probes = []
    run = loop.Trainer.run

    def run_while_probing(self):
        with pytest.raises(records.RunDirBusy, match=f"pid {os.getpid()}"):
            records.RunDirLock(self.run_dir)
        probes.append(self.run_dir)
        return run(self)

    monkeypatch.setattr(loop.Trainer, "run", run_while_probing)
    fresh_dir = str(tmp_path / "fresh")
    run_tiny(demo_dir, fresh_dir, epochs=1)
    assert probes == [fresh_dir]
    records.RunDirLock(fresh_dir).release()


@pytest.fixture(scope="module")
def tiny_reference(tiny_run_2_epochs):
    """An uninterrupted tiny run in this process (16 steps per epoch, 2 epochs): the session's (conftest), which
    the tests here copy before changing anything."""
    return tiny_run_2_epochs


TIMING_COLUMNS = ["train_seconds", "eval_seconds", "train_images_per_second"]


def assert_same_results(reference, model_dir):
    """Bit-identical weights and training state, every epoch's metrics row, the same best checkpoint and
    export, and no temporary file left."""
    assert_bit_identical(reference, model_dir)
    pd.testing.assert_frame_equal(records.read_metrics(model_dir).drop(columns=TIMING_COLUMNS),
                                  records.read_metrics(reference).drop(columns=TIMING_COLUMNS))
    best = [os.path.basename(tf.train.latest_checkpoint(os.path.join(d, "checkpoints", "best")))
            for d in (reference, model_dir)]
    assert best[0] == best[1]
    export = [os.path.join(d, rundir.EXPORT_DIR) for d in (reference, model_dir)]
    assert records.files_sha256(export[1], rundir.EXPORT_WEIGHTS) == \
        records.files_sha256(export[0], rundir.EXPORT_WEIGHTS)
    assert checkpoints.read_export_config(export[1]) == checkpoints.read_export_config(export[0])
    left = [os.path.join(root, n) for root, folders, files in os.walk(model_dir) for n in folders + files
            if ".tmp" in n or ".old" in n or n.endswith("_temp")]
    assert not left, left


DEAD_PID = 4194304  # above Linux's largest pid_max: the pid of the process that crashed, not of the rerun
COMMIT_FAULTS = {
    # which write of epoch 1's commit fails as on a full disk: (owner, attribute, the call that fails, the
    # temporary file or folder/ the failed write leaves)
    "best checkpoint": ("RunCheckpoints", "save_best", 1, "checkpoints/best/best-16_temp/"),
    "export": ("checkpoints", "export_to", 1, f"export.tmp{DEAD_PID}/"),
    "metrics.csv": ("records", "write_metrics", 1, f"metrics.csv.tmp{DEAD_PID}"),
    "epoch checkpoint": ("RunCheckpoints", "save", 2, "checkpoints/step-16_temp/"),  # call 1: the start, step-0
}


@pytest.mark.parametrize("fault", sorted(COMMIT_FAULTS))
def test_failed_write_at_an_epoch_end_loses_nothing(fault, tmp_path, demo_dir, tiny_reference, capsys,
                                                    monkeypatch):
    owner_name, attribute, failing_call, leftover = COMMIT_FAULTS[fault]
    owner = {"RunCheckpoints": checkpoints.RunCheckpoints, "checkpoints": checkpoints, "records": records}[owner_name]
    model_dir = str(tmp_path / "run")
    leftover = os.path.join(model_dir, leftover)
    original, calls = getattr(owner, attribute), []

    def write(*args, **kwargs):
        calls.append(attribute)
        if len(calls) == failing_call:
            os.makedirs(os.path.dirname(leftover), exist_ok=True)  # a folder when the name ends with /
            open(os.path.join(leftover, "part") if leftover.endswith("/") else leftover, "w").close()
            raise OSError(28, "No space left on device", leftover)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(owner, attribute, write)
        assert run_main(tiny_argv(demo_dir, model_dir)) == 1
    assert "No space left" in capsys.readouterr().err and os.path.exists(leftover)
    run_tiny(demo_dir, model_dir)  # the same command again, with the space back
    assert_same_results(tiny_reference, model_dir)


def truncate_checkpoint(prefix):
    for name in os.listdir(os.path.dirname(prefix)):
        if name.startswith(os.path.basename(prefix) + ".data"):
            truncate(os.path.join(os.path.dirname(prefix), name))


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, demo_dir, tiny_reference, caplog):
    model_dir = str(tmp_path / "run")
    shutil.copytree(tiny_reference, model_dir)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    assert latest.endswith("step-32")
    truncate_checkpoint(latest)
    run_tiny(demo_dir, model_dir)
    assert f"checkpoint {latest} is damaged" in caplog.text
    assert "resuming from the previous one, step-16" in caplog.text
    assert_same_results(tiny_reference, model_dir)


def test_history_without_a_readable_checkpoint_stops_unless_restarted(tmp_path, demo_dir, tiny_reference, capsys):
    model_dir = str(tmp_path / "run")
    shutil.copytree(tiny_reference, model_dir)
    checkpoint_dir = os.path.join(model_dir, "checkpoints")
    for path in tf.train.get_checkpoint_state(checkpoint_dir).all_model_checkpoint_paths:
        truncate_checkpoint(path)
    export_sha = records.files_sha256(os.path.join(model_dir, "export"), rundir.EXPORT_WEIGHTS)
    metrics = open(os.path.join(model_dir, rundir.METRICS_FILE)).read()
    assert run_main(tiny_argv(demo_dir, model_dir)) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "checkpoints are damaged (step-32, step-16)" in lines[0] and \
        "--restart_from_scratch" in lines[0], lines
    assert open(os.path.join(model_dir, rundir.METRICS_FILE)).read() == metrics
    assert records.files_sha256(os.path.join(model_dir, "export"), rundir.EXPORT_WEIGHTS) == export_sha
    # Checkpoints deleted altogether: the same stop.
    no_checkpoints = str(tmp_path / "no_checkpoints")
    shutil.copytree(model_dir, no_checkpoints)
    shutil.rmtree(os.path.join(no_checkpoints, "checkpoints"))
    assert run_main(tiny_argv(demo_dir, no_checkpoints)) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "it has no checkpoints" in lines[0], lines
    # A deliberate restart trains the run again from epoch 0.
    run_tiny(demo_dir, model_dir, restart_from_scratch=True)
    assert_same_results(tiny_reference, model_dir)
    # An instruction for that start, recorded as such, never a setting in flags.cfg: rerunning from flags.cfg
    # must not restart a damaged run on its own.
    assert "restart_from_scratch" not in rundir.read_flagfile(model_dir)
    changes = rundir.read_json(os.path.join(model_dir, rundir.RECORD_FILE))["flag_changes"]
    assert changes[-1]["changed"]["restart_from_scratch"] == [None, "true"]


# ------------------------------------------------------------------------------------------ resume and flags


def edit_flagfile(run_dir, /, **values):
    """Sets (or, with None, removes) flags in a run's flags.cfg, as a run of another code version wrote it: in
    record.json's "flags" too (what the run wrote), so the edit is no hand edit of flags.cfg (which a resume
    refuses, tests/test_user_files.py)."""
    path = os.path.join(run_dir, rundir.FLAGS_FILE)
    lines = [l for l in open(path).read().splitlines()
             if rundir.parse_flagfile(l).keys().isdisjoint(values)]
    lines += [f"--{name}={value}" for name, value in values.items() if value is not None]
    open(path, "w").write("\n".join(lines) + "\n")
    record_path = os.path.join(run_dir, rundir.RECORD_FILE)
    record = rundir.read_json(record_path) if os.path.isfile(record_path) else {}
    if "flags" in record:
        record["flags"] = rundir.parse_flagfile(open(path).read())
        rundir.write_json(record_path, record)


def directory_contents(model_dir):
    """{relative path: bytes} of every file of a run directory but its lock."""
    contents = {}
    for root, _, files in os.walk(model_dir):
        for name in files:
            if name != rundir.LOCK_FILE:
                path = os.path.join(root, name)
                contents[os.path.relpath(path, model_dir)] = open(path, "rb").read()
    return contents


RESUME_REFUSED = {
    # case: (flags.cfg edits, flags given, what the one line must name)
    "lower learning rate": ({}, dict(learning_rate=0.001), ["learning_rate: 0.01 -> 0.001", "--init_checkpoint="]),
    "other model": ({}, dict(base_width=8, hflip=False),
                    ["base_width: 4 -> 8", "hflip: true -> false", "give a new --model_dir"]),
    "fewer epochs": ({}, dict(epochs=1), ["epochs: 2 -> 1 (may only grow)"]),
    "more epochs of a cosine schedule": (dict(lr_schedule="cosine", snapshot_cycles=1),
                                         dict(lr_schedule="cosine", snapshot_cycles=1, epochs=4),
                                         ["epochs: 2 -> 4 (sets the cosine cycle length: keep 2 epochs per cycle, "
                                          "e.g. --epochs=4 --snapshot_cycles=2)"]),
    "more cosine cycles of another length": (dict(lr_schedule="cosine", snapshot_cycles=1),
                                             dict(lr_schedule="cosine", snapshot_cycles=2, epochs=6),
                                             ["epochs: 2 -> 6 (sets the cosine cycle length: keep 2 epochs per cycle"]),
    "snapshot cycles of a plateau schedule": ({}, dict(snapshot_cycles=2),
                                              ["snapshot_cycles: 4 -> 2 (changes only with --lr_schedule=cosine"]),
    "more epochs inside the --swa_epochs window": (
        dict(swa_epochs=2), dict(swa_epochs=2, epochs=3),
        ["epochs: 2 -> 3 (sets the epochs --swa_epochs averages: the 2 averaged must come after epoch 2, so "
         "--epochs=4 or more)"]),
    "flag newer than the run, set": (dict(contrast=None), dict(contrast=0.1),
                                     ["contrast: 0.0 (default; not in flags.cfg) -> 0.1"]),
}


@pytest.mark.parametrize("case", sorted(RESUME_REFUSED))
def test_resume_with_other_flags_stops_with_one_line_and_writes_nothing(case, tmp_path, demo_dir, tiny_reference,
                                                                        capsys):
    edits, given, expected = RESUME_REFUSED[case]
    model_dir = str(tmp_path / "run")
    shutil.copytree(tiny_reference, model_dir)
    edit_flagfile(model_dir, **edits)
    before = directory_contents(model_dir)
    assert run_main(tiny_argv(demo_dir, model_dir, **given)) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    for text in expected + [f"--flagfile={os.path.join(model_dir, rundir.FLAGS_FILE)}"]:
        assert text in lines[0], (text, lines[0])
    # flags.cfg keeps the values the run was trained with; nothing else changed either.
    assert directory_contents(model_dir) == before


def test_legal_flag_changes_resume_bit_identically_and_are_recorded(tmp_path, demo_dir, tiny_reference):
    model_dir = str(tmp_path / "run")
    run_tiny(demo_dir, model_dir, epochs=1)
    # As an older version wrote it: without a flag added since (absent = its default, so the run resumes).
    edit_flagfile(model_dir, contrast=None)
    # More epochs, and logging and bookkeeping flags that change no number.
    run_tiny(demo_dir, model_dir, epochs=2, progress_every=5, summary_every_steps=7, keep_checkpoints=3)
    assert_same_results(tiny_reference, model_dir)
    written = rundir.read_flagfile(model_dir)  # what the run now does, so `runs reproduce` gets the same
    assert (written["epochs"], written["progress_every"], written["contrast"]) == ("2", "5", "0.0")
    changes = rundir.read_json(os.path.join(model_dir, rundir.RECORD_FILE))["flag_changes"]
    assert len(changes) == 1 and changes[0]["checkpoint"] == "step-16", changes
    assert changes[0]["changed"] == {"epochs": ["1", "2"], "progress_every": ["0", "5"],
                                     "summary_every_steps": ["0", "7"], "keep_checkpoints": ["2", "3"]}
    # Resuming from flags.cfg is the same run: nothing more is recorded.
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["train", f"--flagfile={os.path.join(model_dir, rundir.FLAGS_FILE)}"])
        assert train.run()["epochs_completed"] == 2
    assert len(rundir.read_json(os.path.join(model_dir, rundir.RECORD_FILE))["flag_changes"]) == 1


def test_a_snapshot_ensemble_grows_by_whole_cycles_into_the_run_the_new_flags_train_fresh(tmp_path, demo_dir):
    """A finished cosine run with --swa_epochs, resumed with --epochs and --snapshot_cycles raised in step (the
    same cycle length), trains the epochs a fresh run of the new flags trains, bit for bit: every epoch's
    weights, the training state, the new snapshot and the new weight average (of the grown run's last epoch,
    not of the old window); the old average is kept in swa-until-epoch-2/, not lost. With the components of
    flags/recipe.cfg, whose 40-epoch first cycle is grown this way into the 120-epoch recipe."""
    recipe = dict(se_type="scse", hypercolumn=True, deep_supervision=True, loss="bce:1,lovasz_sym_elu:1", zoom=1.2,
                  brightness=0.1, contrast=0.1)
    grown_flags = dict(recipe, lr_schedule="cosine", snapshot_cycles=2, epochs=4, swa_epochs=1)
    fresh, grown = str(tmp_path / "fresh"), str(tmp_path / "grown")
    run_tiny(demo_dir, fresh, **grown_flags)
    run_tiny(demo_dir, grown, **dict(grown_flags, snapshot_cycles=1, epochs=2))
    first_average = records.files_sha256(os.path.join(grown, rundir.SWA_DIR), rundir.EXPORT_WEIGHTS)
    summary = run_tiny(demo_dir, grown, **grown_flags)
    assert summary["epochs_completed"] == 4 and summary["swa_epochs_averaged"] == 1
    assert_bit_identical(fresh, grown, epochs=(1, 2, 3, 4))
    pd.testing.assert_frame_equal(records.read_metrics(grown).drop(columns=TIMING_COLUMNS),
                                  records.read_metrics(fresh).drop(columns=TIMING_COLUMNS))
    for folder in (rundir.SWA_DIR, rundir.EXPORT_DIR, "snapshots/snapshot-0", "snapshots/snapshot-1"):
        assert records.files_sha256(os.path.join(grown, folder), rundir.EXPORT_WEIGHTS) == \
            records.files_sha256(os.path.join(fresh, folder), rundir.EXPORT_WEIGHTS), folder
    assert checkpoints.read_export_config(os.path.join(grown, rundir.SWA_DIR))["epoch"] == 4
    retired = rundir.retired_swa_dir(grown, 2)
    assert records.files_sha256(retired, rundir.EXPORT_WEIGHTS) == first_average != \
        records.files_sha256(os.path.join(grown, rundir.SWA_DIR), rundir.EXPORT_WEIGHTS)
    assert not os.path.exists(rundir.retired_swa_dir(fresh, 2))
    changes = rundir.read_json(os.path.join(grown, rundir.RECORD_FILE))["flag_changes"]
    assert [c["changed"] for c in changes] == [{"epochs": ["2", "4"], "snapshot_cycles": ["1", "2"]}]


def test_resume_follows_moved_data_but_not_other_data(tmp_path, demo_dir, tiny_reference, capsys):
    model_dir = str(tmp_path / "run")
    shutil.copytree(tiny_reference, model_dir)
    moved = str(tmp_path / "moved")
    shutil.copytree(demo_dir, moved)
    metrics = open(os.path.join(model_dir, rundir.METRICS_FILE)).read()
    run_tiny(moved, model_dir)  # the same images elsewhere: resumes (a finished run: nothing to train)
    assert rundir.read_flagfile(model_dir)["data_dir"] == moved
    assert open(os.path.join(model_dir, rundir.METRICS_FILE)).read() == metrics
    image = image_path(moved, first_id(moved))
    cv2.imwrite(image, 255 - cv2.imread(image, cv2.IMREAD_GRAYSCALE))
    before = directory_contents(model_dir)
    assert run_main(tiny_argv(moved, model_dir)) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "other images or masks than the run" in lines[0], lines
    assert directory_contents(model_dir) == before
