"""The models a path stands for: exported models (export/, swa/, snapshots) and the ensemble.json fitted on them.

`find_exports` reads their configs (model.json) without TensorFlow, so a command checks every model folder
before it starts TensorFlow; `restore` builds each model and restores its weights. Where the exports of a
run are and what they are called is salt_tf.rundir's (`export_dirs`, `is_export`); this module reads them.
Used by the predict command, the SavedModel export (salt_tf.serving) and tools.
"""

from __future__ import annotations

import dataclasses
import json
import os

from salt_tf import ensemble, rundir, tfstart


class ExportError(ValueError):
    """A model folder or ensemble.json that cannot be used; the message is one line naming the path and the fix."""


@dataclasses.dataclass
class LoadedModel:
    """One exported model: where it is, its model.json, and (after `restore`) the Keras model."""

    name: str          # "export", "snapshots/snapshot-3", or the folder's name
    path: str          # the export folder
    config: dict       # its model.json
    model: object = None

    @property
    def use_depth(self) -> bool:
        return bool(self.config.get("use_depth", False))

    def info(self) -> dict:
        return {"name": self.name, "epoch": self.config.get("epoch"), "val_metric": self.config.get("val_metric")}


def _read_config(export_dir: str) -> dict:
    """The model.json of an export folder, checked to hold a model configuration."""
    path = os.path.join(export_dir, rundir.EXPORT_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise ExportError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise ExportError(f"{path}: not valid JSON ({e}); re-export the model") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ExportError(f"{path}: no 'model' configuration; not a salt_tf export")
    return config


def find_exports(path: str) -> list[LoadedModel]:
    """The models `path` stands for, configs read but no weights (no TensorFlow needed).

    Args:
        path: an export folder (itself), or a run directory (its snapshots in order if any, else its export/;
            rundir.export_dirs).

    Returns:
        One LoadedModel per export; its name is its folder relative to the run directory ("export",
        "snapshots/snapshot-3"), or the export folder's own name.

    Raises:
        ExportError: no such folder, no export in it, or an unreadable model.json (one line).
    """
    try:
        dirs = rundir.export_dirs(path)
    except rundir.RunDirError as e:
        raise ExportError(str(e)) from None
    if rundir.is_export(path):  # an export folder itself
        return [LoadedModel(os.path.basename(os.path.normpath(path)), path, _read_config(path))]
    return [LoadedModel(os.path.relpath(d, path), d, _read_config(d)) for d in dirs]


def restore(entry: LoadedModel) -> LoadedModel:
    """Builds the model of an export's config and restores its weights into it (the first TensorFlow import).

    Args:
        entry: a model of find_exports.

    Returns:
        The same entry, its `model` set.

    Raises:
        ExportError: a model configuration this code cannot build, or weights that do not restore into it.
    """
    tf = tfstart.import_tensorflow()  # the first TensorFlow import of a command: no CUDA noise on a CPU

    from salt_tf import checkpoints, model as model_lib

    config_path = os.path.join(entry.path, rundir.EXPORT_CONFIG)
    try:
        model = model_lib.build_model(model_lib.ModelConfig(**entry.config["model"]))
    except (TypeError, ValueError) as e:
        raise ExportError(f"{config_path}: bad model configuration ({e})") from None
    try:
        checkpoints.restore_exported_weights(entry.path, model)
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        detail = (getattr(e, "message", None) or str(e) or type(e).__name__).strip().splitlines()[0]
        raise ExportError(f"{entry.path}: cannot restore the exported weights ({detail}); the export is "
                           "incomplete or belongs to another model configuration") from None
    entry.model = model
    return entry


def load_models(path: str) -> list[LoadedModel]:
    """The models `path` stands for (see find_exports), built and with their weights restored."""
    return [restore(entry) for entry in find_exports(path)]


def load_ensemble(run_dir: str, entries: list[LoadedModel]) -> ensemble.Ensemble | None:
    """The ensemble.json of `run_dir` (None if it has none), checked against the models it was fitted on.

    Args:
        run_dir: a run directory or an export folder (as --model_dir).
        entries: its models (find_exports), in order.

    Returns:
        The saved choice, or None.

    Raises:
        ExportError: unreadable, or fitted on other models (one line naming both lists).
    """
    path = os.path.join(run_dir, rundir.ENSEMBLE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        chosen = ensemble.Ensemble.load(path)
    except ValueError as e:
        raise ExportError(str(e)) from None
    fitted = [(m.get("name"), m.get("epoch")) for m in chosen.models]
    now = [(e.name, e.config.get("epoch")) for e in entries]
    if fitted != now:
        raise ExportError(
            f"{path}: fitted on models {', '.join(f'{n} (epoch {e})' for n, e in fitted)} but {run_dir} now has "
            f"{', '.join(f'{n} (epoch {e})' for n, e in now)}; rerun `python -m salt_tf.predict evaluate`, or pass "
            "--nouse_ensemble")
    return chosen
