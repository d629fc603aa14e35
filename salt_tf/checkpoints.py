"""Checkpoints of the training state, resume, and the exported model that `predict` loads.

    <run_dir>/checkpoints/step-N.*         the last --keep_checkpoints (the start, end of an epoch, or where a
                                           signal stopped the run), N = optimizer steps taken
    <run_dir>/checkpoints/best/best-N.*    the epoch with the best validation metric
    <run_dir>/export/                      best weights + model.json (config, threshold): what predict loads

A checkpoint holds everything the loop needs to continue as if never stopped: model weights and batch-norm
statistics, optimizer slots and iteration count, learning rate, the epoch counter and the schedule state.
TensorFlow writes checkpoint data under temporary names and the index file last, so a kill mid-save leaves
the previous checkpoint as the latest. A run resumes from the newest checkpoint that reads back whole
(resume_point): a damaged one is skipped with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf
from absl import logging

from salt_tf import model as model_lib, records, rundir


class RunCheckpoints:
    """A tf.train.Checkpoint over the training state with two managers: last K epochs and best."""

    def __init__(self, run_dir: str, keep: int, restore_dir: str | None = None, **state):
        """Saves under run_dir; resumes from restore_dir's checkpoints (default run_dir): a non-chief worker
        saves into its temporary directory but resumes from the chief's. Creates the partial-epoch state
        (PartialEpoch, below), so call it outside `strategy.scope()`."""
        self.partial_epoch = PartialEpoch()
        self.checkpoint = tf.train.Checkpoint(partial_epoch=self.partial_epoch.variable, **state)
        directory = os.path.join(run_dir, rundir.CHECKPOINTS_DIR)
        self.restore_dir = os.path.join(restore_dir or run_dir, rundir.CHECKPOINTS_DIR)
        self.last = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep,
                                               checkpoint_name="step")
        self.best = tf.train.CheckpointManager(self.checkpoint, os.path.join(directory, rundir.BEST_DIR),
                                               max_to_keep=1, checkpoint_name="best")

    def restore(self, path: str) -> None:
        """Restores the training state from checkpoint `path` (resume_point picks it)."""
        # Every saved object must find its variable: a silent partial restore would be a wrong resume.
        self.checkpoint.restore(path).assert_existing_objects_matched()

    def save(self, step: int) -> str:
        return self.last.save(checkpoint_number=step)

    def save_best(self, step: int) -> str:
        return self.best.save(checkpoint_number=step)


# ---------------------------------------------------------------------------------- partial-epoch state
# Where an interrupted epoch stopped, so a resume continues at that batch. Saved in every checkpoint as the
# string variable `partial_epoch` holding JSON (the format of every checkpoint written so far): empty between
# epochs, else {"steps", "sums", "finite_steps", "seconds"}.


@dataclasses.dataclass
class EpochProgress:
    """How far the current epoch got: its steps done, the running sums of the step outputs over its finite
    steps, how many steps were finite, and the training seconds spent on it."""
    steps: int = 0
    sums: dict = dataclasses.field(default_factory=dict)
    finite_steps: int = 0
    seconds: float = 0.0


class PartialEpoch:
    """The checkpointed EpochProgress of an interrupted epoch (a JSON string in a tf.Variable)."""

    def __init__(self):
        # Outside any strategy's scope: collectives cannot broadcast a string (every worker writes the same
        # value anyway, from plain Python).
        if tf.distribute.has_strategy():
            raise RuntimeError("create RunCheckpoints (its partial_epoch string variable) outside strategy.scope()")
        self.variable = tf.Variable("", dtype=tf.string, trainable=False, name="partial_epoch")

    def read(self) -> EpochProgress:
        """The progress saved by `write`, or a fresh epoch's (nothing done) when the last epoch finished."""
        text = self.variable.numpy().decode()
        if not text:
            return EpochProgress()
        saved = json.loads(text)
        # Checkpoints written before "finite_steps" existed counted every step as finite.
        return EpochProgress(steps=saved["steps"], sums=saved["sums"],
                             finite_steps=saved.get("finite_steps", saved["steps"]), seconds=saved["seconds"])

    def write(self, progress: EpochProgress) -> None:
        """Records the progress of an epoch about to be interrupted (the next checkpoint saves it)."""
        self.variable.assign(json.dumps({"steps": progress.steps, "sums": progress.sums,
                                         "finite_steps": progress.finite_steps, "seconds": progress.seconds}))

    def clear(self) -> None:
        """The epoch finished: the next one starts at its first batch."""
        self.variable.assign("")


class ResumeError(ValueError):
    """The run directory cannot be resumed as it is; the message is one line naming the way forward."""


def newest_intact(checkpoint_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest checkpoint of `checkpoint_dir` (in save order) whose every tensor reads back, and the newer
    ones that did not, as (path, reason). (None, [...]) when none is intact or there are none."""
    state = tf.train.get_checkpoint_state(checkpoint_dir)
    damaged = []
    for path in reversed(list(state.all_model_checkpoint_paths) if state else []):
        reason = unreadable(path)
        if reason:
            damaged.append((path, reason))
            continue
        return path, damaged
    return None, damaged


def unreadable(path: str) -> str | None:
    """Why the checkpoint at prefix `path` (a checkpoint or an export's weights) does not read back whole, in one
    line; None when every tensor reads."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, IndexError, ValueError) as e:  # truncated, corrupt or missing files
        return (getattr(e, "message", None) or str(e)).splitlines()[0]
    return None


def has_history(run_dir: str) -> bool:
    """Whether finished epochs left results in the run directory (metrics.csv rows or an export)."""
    return not records.read_metrics(run_dir).empty or rundir.is_export(os.path.join(run_dir, rundir.EXPORT_DIR))


def resume_point(run_dir: str, restart_from_scratch: bool = False) -> str | None:
    """The checkpoint a run in `run_dir` continues from: the newest intact one, each newer damaged one named
    in a warning; None for a fresh start. A run with history but no intact checkpoint raises ResumeError
    rather than silently starting again from epoch 0 over its results, unless `restart_from_scratch`. (A
    fresh run checkpoints its starting state before writing any history, so a crash never leaves history
    without a checkpoint.)"""
    path, damaged = newest_intact(os.path.join(run_dir, rundir.CHECKPOINTS_DIR))
    for bad, reason in damaged:
        logging.warning("checkpoint %s is damaged (%s); %s", bad, reason,
                        f"resuming from the previous one, {os.path.basename(path)}" if path else "skipped")
    if path is None and has_history(run_dir) and not restart_from_scratch:
        found = f"its checkpoints are damaged ({', '.join(os.path.basename(b) for b, _ in damaged)})" \
            if damaged else "it has no checkpoints"
        raise ResumeError(f"--model_dir={run_dir} holds a run's results (metrics.csv, export/) but {found}, so it "
                          "cannot resume; add --restart_from_scratch to train it again from epoch 0 over those "
                          "results, or give a new --model_dir")
    return path


def export(run_dir: str, model: tf.Module, config: dict) -> str:
    """Writes the model's weights and config to <run_dir>/export (the best model)."""
    return export_to(os.path.join(run_dir, rundir.EXPORT_DIR), model, config)


def export_snapshot(run_dir: str, index: int, model: tf.Module, config: dict) -> str:
    """Writes snapshot `index` of a snapshot ensemble to <run_dir>/snapshots/snapshot-<index>."""
    return export_to(rundir.snapshot_dir(run_dir, index), model, config)


def export_to(final: str, model: tf.Module, config: dict) -> str:
    """Writes the model's weights and its config (JSON) to folder `final`, replacing any old content in
    one rename (rundir.staged_dir), so a reader sees either the old export or the new one."""
    with rundir.staged_dir(final) as staging:
        tf.train.Checkpoint(model=model).write(os.path.join(staging, rundir.EXPORT_WEIGHTS))
        rundir.write_json(os.path.join(staging, rundir.EXPORT_CONFIG), config, final_newline=False)
    return final


def read_export_config(export_dir: str) -> dict:
    if not rundir.is_export(export_dir):
        raise FileNotFoundError(f"{export_dir}: no exported model ({rundir.EXPORT_CONFIG} missing); "
                                "train first or point at a run's export/ folder")
    return rundir.read_json(os.path.join(export_dir, rundir.EXPORT_CONFIG))


class InitCheckpointError(ValueError):
    """--init_checkpoint names something that cannot start this run; the message is one line."""


# Model settings that change no variable: a model trained with them set otherwise can still start this one.
_SHAPE_FREE_SETTINGS = ("dropout", "input_size", "pad_mode")  # change no variable: may differ from the source


def init_export_dir(path: str) -> str:
    """The export folder --init_checkpoint means: a run directory (its export/, the best model), an export/
    folder, or a snapshots/snapshot-K folder."""
    for candidate in (path, os.path.join(path, rundir.EXPORT_DIR)):
        if rundir.is_export(candidate):
            return candidate
    raise InitCheckpointError(f"--init_checkpoint={path} holds no exported model ({rundir.EXPORT_CONFIG}); give a "
                              "finished run's directory, its export/ folder or a snapshots/snapshot-K folder")


def check_init_compatible(export_dir: str, source_flag: str, model_config: dict) -> dict:
    """The export's config, if its model has the same variables as `model_config`; else one line that
    names each setting that differs."""
    try:
        source = read_export_config(export_dir)
    except ValueError as e:  # a cut-short model.json
        raise InitCheckpointError(f"--init_checkpoint={source_flag}: {os.path.join(export_dir, rundir.EXPORT_CONFIG)} "
                                  f"is not readable JSON ({e}); give another export of that run or copy it again"
                                  ) from None
    damage = unreadable(os.path.join(export_dir, rundir.EXPORT_WEIGHTS))
    if damage:
        raise InitCheckpointError(f"--init_checkpoint={source_flag}: the weights in {export_dir} are damaged "
                                  f"({damage}); give another export of that run (e.g. a snapshots/snapshot-K "
                                  "folder) or copy the run again")
    # An export written before a model setting existed was built with that setting's default.
    trained = dict(dataclasses.asdict(model_lib.ModelConfig()), **source.get("model", {}))
    differ = [name for name, value in model_config.items()
              if name not in _SHAPE_FREE_SETTINGS and trained.get(name) != value]
    if differ:
        was = ", ".join(f"{name}={trained.get(name)}" for name in differ)
        now = ", ".join(f"{name}={model_config[name]}" for name in differ)
        raise InitCheckpointError(f"--init_checkpoint={source_flag} is a model with {was}; this run builds "
                                  f"{now}: set the same model flags (input_channels follows --use_depth)")
    return source


def restore_exported_weights(export_dir: str, model: tf.Module) -> None:
    weights = os.path.join(export_dir, rundir.EXPORT_WEIGHTS)
    tf.train.Checkpoint(model=model).read(weights).assert_existing_objects_matched()
