"""Checkpoints of the training state, resume, and the exported model that `predict` loads.

    <run_dir>/checkpoints/step-N.*         the last --keep_checkpoints (end of an epoch, or where a signal
                                           stopped the run), N = optimizer steps taken
    <run_dir>/checkpoints/best/best-N.*    the epoch with the best validation metric
    <run_dir>/export/                      best weights + model.json (config, threshold): what predict loads

A checkpoint holds everything the loop needs to continue as if never stopped: model weights and batch-norm
statistics, optimizer slots and iteration count, learning rate, the epoch counter and the schedule state.
TensorFlow writes checkpoint data under temporary names and the index file last, so a kill mid-save leaves
the previous checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import tensorflow as tf

from salt_tf import model as model_lib, records

EXPORT_DIR = "export"
EXPORT_WEIGHTS = records.EXPORT_WEIGHTS
EXPORT_CONFIG = "model.json"


class RunCheckpoints:
    """A tf.train.Checkpoint over the training state with two managers: last K epochs and best."""

    def __init__(self, run_dir: str, keep: int, restore_dir: str | None = None, **state):
        """Saves under run_dir; resumes from restore_dir's checkpoints (default run_dir): a non-chief worker
        saves into its temporary directory but resumes from the chief's."""
        self.checkpoint = tf.train.Checkpoint(**state)
        directory = os.path.join(run_dir, "checkpoints")
        self.restore_dir = os.path.join(restore_dir or run_dir, "checkpoints")
        self.last = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep,
                                               checkpoint_name="step")
        self.best = tf.train.CheckpointManager(self.checkpoint, os.path.join(directory, "best"),
                                               max_to_keep=1, checkpoint_name="best")

    def restore_or_initialize(self) -> str | None:
        """Restores the latest epoch checkpoint if there is one; returns its path (None = fresh start)."""
        path = tf.train.latest_checkpoint(self.restore_dir)
        if path:
            # Every saved object must find its variable: a silent partial restore would be a wrong resume.
            self.checkpoint.restore(path).assert_existing_objects_matched()
        return path

    def save(self, step: int) -> str:
        return self.last.save(checkpoint_number=step)

    def save_best(self, step: int) -> str:
        return self.best.save(checkpoint_number=step)


SNAPSHOTS_DIR = "snapshots"
SWA_DIR = "swa"  # the weight average of the last --swa_epochs epochs (swa.py), an export like export/


def export(run_dir: str, model: tf.Module, config: dict) -> str:
    """Writes the model's weights and config to <run_dir>/export (the best model)."""
    return export_to(os.path.join(run_dir, EXPORT_DIR), model, config)


def export_snapshot(run_dir: str, index: int, model: tf.Module, config: dict) -> str:
    """Writes snapshot `index` of a snapshot ensemble to <run_dir>/snapshots/snapshot-<index>."""
    return export_to(os.path.join(run_dir, SNAPSHOTS_DIR, f"snapshot-{index}"), model, config)


def snapshot_dirs(run_dir: str) -> list[str]:
    """A run's snapshot export folders, in snapshot order (empty if it made none)."""
    root = os.path.join(run_dir, SNAPSHOTS_DIR)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("snapshot-") and n[len("snapshot-"):].isdigit()
             and os.path.isfile(os.path.join(root, n, EXPORT_CONFIG))]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[len("snapshot-"):]))]


def export_to(final: str, model: tf.Module, config: dict) -> str:
    """Writes the model's weights and its config (JSON) to folder `final`, replacing any old content in
    one rename, so a reader sees either the old export or the new one."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    tf.train.Checkpoint(model=model).write(os.path.join(staging, EXPORT_WEIGHTS))
    with open(os.path.join(staging, EXPORT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    retired = f"{final}.old{os.getpid()}"
    if os.path.isdir(final):
        os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)
    return final


def read_export_config(export_dir: str) -> dict:
    path = os.path.join(export_dir, EXPORT_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{export_dir}: no exported model ({EXPORT_CONFIG} missing); "
                                "train first or point at a run's export/ folder")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class InitCheckpointError(ValueError):
    """--init_checkpoint names something that cannot start this run; the message is one line."""


# Model settings that change no variable: a model trained with them set otherwise can still start this one.
_SHAPE_FREE_SETTINGS = ("dropout", "input_size", "pad_mode")  # change no variable: may differ from the source


def init_export_dir(path: str) -> str:
    """The export folder --init_checkpoint means: a run directory (its export/, the best model), an export/
    folder, or a snapshots/snapshot-K folder."""
    for candidate in (path, os.path.join(path, EXPORT_DIR)):
        if os.path.isfile(os.path.join(candidate, EXPORT_CONFIG)):
            return candidate
    raise InitCheckpointError(f"--init_checkpoint={path} holds no exported model ({EXPORT_CONFIG}); give a "
                              "finished run's directory, its export/ folder or a snapshots/snapshot-K folder")


def source_run_dir(export_dir: str) -> str:
    """The run directory an export/ or snapshots/snapshot-K folder belongs to."""
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    return os.path.dirname(parent) if os.path.basename(parent) == SNAPSHOTS_DIR else parent


def check_init_compatible(export_dir: str, source_flag: str, model_config: dict) -> dict:
    """The export's config, if its model has the same variables as `model_config`; else one line that
    names each setting that differs."""
    source = read_export_config(export_dir)
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
    tf.train.Checkpoint(model=model).read(os.path.join(export_dir, EXPORT_WEIGHTS)).assert_existing_objects_matched()
