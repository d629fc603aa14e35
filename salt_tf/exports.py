"""The models a path stands for: exported models (export/, swa/, snapshots) and the ensemble.json fitted on them.

`find_exports` reads their configs (model.json) without TensorFlow, so a command checks every model folder
before it starts TensorFlow; `restore` builds each model and restores its weights. Where the exports of a
run are and what they are called is salt_tf.rundir's (`export_dirs`, `is_export`, `fold_runs`); this module
reads them. Used by the predict and cv commands, the SavedModel export (salt_tf.serving) and tools.

A CV parent (salt_tf.cv) stands for every model of its finished folds, a fold ensemble, in which every fold
weighs the same whatever its number of snapshots. When every fold has S models its members are S positions,
position k the mean over the folds of each fold's k-th model (snapshot k, or the one export), which a stacked
meta-model can weigh like a run's snapshots; when the folds differ in number, its members are the folds, each
the mean of its own models (`members`, `member_probabilities`). Its choice of combination and post-processing
is its ensemble.json (`predict evaluate` on its out-of-fold predictions, oof.npz), else the fold mean at the
threshold its oof.json chose (`load_ensemble`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np

from salt_tf import ensemble, oof, postprocess, release, rundir, tfstart, tta


class ExportError(ValueError):
    """A model folder or ensemble.json that cannot be used; the message is one line naming the path and the fix."""


@dataclasses.dataclass
class LoadedModel:
    """One exported model: where it is, its model.json, and (after `restore`) the Keras model."""

    name: str          # "export", "snapshots/snapshot-3", the folder's name, or under a CV parent "fold-0/export"
    path: str          # the export folder
    config: dict       # its model.json
    model: object = None
    fold: int | None = None  # under a CV parent: the fold whose run made it

    @property
    def use_depth(self) -> bool:
        return bool(self.config.get("use_depth", False))

    def info(self) -> dict:
        """What a saved choice (ensemble.json, oof.json) records of the model it was fitted on: its name, epoch,
        validation metric and the SHA-256 of its weight files (_check_fitted compares them)."""
        return {"name": self.name, "epoch": self.config.get("epoch"), "val_metric": self.config.get("val_metric"),
                "weights_sha256": self.weights_sha256()}

    def weights_sha256(self) -> str | None:
        """records.files_sha256 of the export's weights.* files (None: no weight files)."""
        from salt_tf import records

        return records.files_sha256(self.path, rundir.EXPORT_WEIGHTS)


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
        path: an export folder (itself), a run directory (its snapshots in order if any, else its export/;
            rundir.export_dirs), or a CV parent (those of each fold run, fold by fold; rundir.fold_runs).

    Returns:
        One LoadedModel per export; its name is its folder relative to the run directory ("export",
        "snapshots/snapshot-3") or to the CV parent ("fold-0/export", its `fold` set), or the export folder's
        own name.

    Raises:
        ExportError: no such folder, no export in it, an unreadable model.json, or a CV parent with a fold
            missing or unfinished (one line).
    """
    try:
        if rundir.is_cv_parent(path):
            return [LoadedModel(os.path.relpath(d, path), d, _read_config(d), fold=k)
                    for k, run in rundir.fold_runs(path).items() for d in rundir.export_dirs(run)]
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
        ExportError: a released model whose files differ from its release's SHA256SUMS, a model configuration
            this code cannot build, or weights that do not restore into it.
    """
    try:  # a released model's files are checked against its SHA256SUMS before they are used
        release.check_model_files(entry.path)
    except release.ReleaseError as e:
        raise ExportError(str(e)) from None
    tf = tfstart.import_tensorflow()  # the first TensorFlow import of a command: no CUDA noise on a CPU

    from salt_tf import checkpoints, model as model_lib

    config_path = os.path.join(entry.path, rundir.EXPORT_CONFIG)
    try:
        model = model_lib.build_model(model_lib.ModelConfig(**entry.config["model"]))
    except (TypeError, ValueError) as e:
        raise ExportError(f"{config_path}: bad model configuration ({e})") from None
    try:
        if entry.config.get(release.WEIGHTS_DTYPE, "float32") != "float32":  # a --float16 release
            _restore_cast(entry.path, model)
        else:
            checkpoints.restore_exported_weights(entry.path, model)
    except (tf.errors.OpError, AssertionError, ValueError, IndexError) as e:
        # IndexError: TensorFlow's checkpoint reader on a weights file shorter than its index says.
        detail = (getattr(e, "message", None) or str(e) or type(e).__name__).strip().splitlines()[0]
        raise ExportError(f"{entry.path}: cannot restore the exported weights ({detail}); the export is "
                           "incomplete or belongs to another model configuration") from None
    entry.model = model
    return entry


def _restore_cast(export_dir: str, model) -> None:
    """Restores an export whose weights are stored in another dtype than the model's float32 (a --float16
    release: model.json's release.WEIGHTS_DTYPE): cast back to float32 (release.cast_weights) into TensorFlow's
    in-memory file system, then restored from there as any export is, so the same checks apply."""
    import uuid

    import tensorflow as tf

    from salt_tf import checkpoints

    folder = f"ram://salt_tf_weights/{uuid.uuid4().hex}"
    try:
        release.cast_weights(os.path.join(export_dir, rundir.EXPORT_WEIGHTS),
                             f"{folder}/{rundir.EXPORT_WEIGHTS}", "float32")
        checkpoints.restore_exported_weights(folder, model)
    finally:
        if tf.io.gfile.exists(folder):
            tf.io.gfile.rmtree(folder)


def load_models(path: str) -> list[LoadedModel]:
    """The models `path` stands for (see find_exports), built and with their weights restored."""
    return [restore(entry) for entry in find_exports(path)]


def fold_models(entries: Sequence[LoadedModel]) -> dict[int, list[int]]:
    """{fold k: the indices into `entries` of fold k's models, in order} of a CV parent's models ({} for a run's
    or an export's, which have no fold)."""
    folds: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        if e.fold is not None:
            folds.setdefault(e.fold, []).append(i)
    return dict(sorted(folds.items()))


def positions(entries: Sequence[LoadedModel]) -> list[list[int]] | None:
    """The member positions of a CV parent's models: position k = the k-th model of every fold (fold by fold), in
    find_exports' order (snapshot 1..S, or the one export). None when the folds have different numbers of
    models (then there are no positions) or `entries` have no fold."""
    folds = fold_models(entries)
    if not folds or len({len(indices) for indices in folds.values()}) != 1:
        return None
    return [list(position) for position in zip(*folds.values())]


def members(entries: Sequence[LoadedModel]) -> list[list[int]]:
    """The members an ensemble of `entries` combines, as indices into `entries`, each member the mean of its
    models (member_probabilities): each model of a run or export is one; a CV parent's members are its
    positions (every fold has S models: member k = the k-th model of every fold) or else its folds (each the
    mean of its own models). Either way every fold weighs the same whatever its number of models.

    Args:
        entries: models of find_exports, in its order.

    Returns:
        One list of indices per member, in order (positions by k, or folds by k).
    """
    if all(e.fold is None for e in entries):
        return [[i] for i in range(len(entries))]
    return positions(entries) or list(fold_models(entries).values())


def member_names(entries: Sequence[LoadedModel]) -> list[str]:
    """One name per member (members), as the evaluation table and the meta-model name them: a model's own
    name; a CV parent's position k: its name inside the fold with the fold as '*' ('fold-*/snapshots/snapshot-1')
    when every fold names its k-th model so, else 'model k of each fold'; a fold: 'fold-k'."""
    if all(e.fold is None for e in entries):
        return [e.name for e in entries]
    if positions(entries) is None:
        return [f"{rundir.FOLD_PREFIX}{k}" for k in fold_models(entries)]
    names = []
    for k, position in enumerate(positions(entries)):
        inside = {entries[i].name.split(os.sep, 1)[-1] for i in position}
        names.append(os.path.join(f"{rundir.FOLD_PREFIX}*", inside.pop()) if len(inside) == 1
                     else f"model {k + 1} of each fold")
    return names


def member_probabilities(entries: Sequence[LoadedModel], probabilities: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The probabilities the ensemble combines, one per member (members): the mean of its models' probabilities.

    Args:
        entries: models of find_exports, in its order.
        probabilities: one array per entry, in the same order.

    Returns:
        One array per member, in order.
    """
    return [np.mean([probabilities[i] for i in member], axis=0) for member in members(entries)]


def predict_members(entries: Sequence[LoadedModel], ids: Sequence[str], images: np.ndarray, depths: np.ndarray,
                    views: Sequence[str], batch_size: int,
                    progress: Callable[[int], tta.ProgressCallback] | None = None):
    """Every model's TTA probabilities of the images, as the ensemble's members (member_probabilities).

    Args:
        entries: restored models (restore, load_models), in find_exports' order.
        ids, images: the images' ids and uint8 [N,101,101] pixels.
        depths: float32 [N] in feet, NaN where unknown (kaggle.depth_array); read for --use_depth models only.
        views: the TTA views (tta.parse_tta).
        batch_size: images per model call.
        progress: progress(m) -> the progress callback of model m's pass (None: no progress).

    Returns:
        (one float32 [N,101,101] per member, the image head's salt probability [N] combined as the members
        are — the mean over the members of each member's mean, so a CV parent's is the mean over its folds —
        or None without a head).
    """
    from salt_tf import pipeline  # TensorFlow: started by restore

    inputs, probabilities, heads = {}, [], []
    for m, entry in enumerate(entries):
        if entry.use_depth not in inputs:
            inputs[entry.use_depth] = pipeline.model_inputs(ids, images, depths, entry.use_depth)
        p, h = tta.predict_with_head(entry.model, inputs[entry.use_depth], batch_size, views,
                                     progress=progress(m) if progress else None)
        probabilities.append(p)
        heads.append(h)
    head = tta.mean_head([tta.mean_head([heads[i] for i in member]) for member in members(entries)])
    return member_probabilities(entries, probabilities), head


def load_ensemble(path: str, entries: list[LoadedModel]) -> ensemble.Ensemble | None:
    """The choice saved for the models of `path`: its ensemble.json (`predict evaluate`), checked against the
    models it was fitted on; for a CV parent without one, the mean of its folds at the threshold its oof.json
    chose (scores["chosen_on"] names oof.json); else None.

    Args:
        path: a run directory, an export folder or a CV parent (as --model_dir).
        entries: its models (find_exports), in order.

    Returns:
        The saved choice, or None.

    Raises:
        ExportError: unreadable, fitted on other models (one line naming both lists), a meta-model over another
            number of members than the models make (one line naming both), or a CV parent without oof.json (one
            line naming `python -m salt_tf.cv collect`).
    """
    file = os.path.join(path, rundir.ENSEMBLE_FILE)
    if not os.path.isfile(file):
        return _oof_choice(path, entries) if rundir.is_cv_parent(path) else None
    try:
        chosen = ensemble.Ensemble.load(file)
    except ValueError as e:
        raise ExportError(str(e)) from None
    fix = "rerun `python -m salt_tf.predict evaluate`, or pass --nouse_ensemble"
    _check_fitted(file, chosen.models, path, entries, fix)
    names = member_names(entries)
    if chosen.stacker is not None and len(chosen.stacker.weights) != len(names):
        raise ExportError(f"{file}: its meta-model combines {len(chosen.stacker.weights)} members "
                          f"({', '.join(chosen.stacker.models)}) but the models of {path} make {len(names)} "
                          f"({', '.join(names)}); {fix}")
    return chosen


def load_out_of_fold(parent: str, entries: list[LoadedModel]) -> tuple[dict, dict]:
    """(oof.npz's arrays, oof.json) of a CV parent, both written by `cv collect` with the fold models now there.

    Args:
        parent: the CV parent.
        entries: its models (find_exports), in order.

    Returns:
        (oof.load's arrays: oof.KEYS, and those of oof.OPTIONAL_KEYS the file holds, its member_probabilities
        one per member of `entries` (members), in order; oof.json's summary).

    Raises:
        ExportError: a file missing or unreadable, collected from other models, or its member_probabilities of
            another number of models per fold (one line naming `python -m salt_tf.cv collect --parent=...`).
    """
    summary = _oof_summary(parent, entries)
    path = os.path.join(parent, rundir.OOF_FILE)
    try:
        arrays = oof.load(path)
    except oof.OOFError as e:
        raise ExportError(str(e)) from None
    stored, expected = len(arrays.get("member_probabilities", ())), len(positions(entries) or ())
    if stored and stored != expected:
        raise ExportError(f"{path}: out-of-fold predictions of {stored} models per fold, but the folds of {parent} "
                          f"now have {expected or 'different numbers of'} models each; rerun python -m "
                          f"salt_tf.cv collect --parent={parent}")
    return arrays, summary


def _oof_summary(parent: str, entries: list[LoadedModel]) -> dict:
    """oof.json, checked against the fold models when it names them (a file of before that is not)."""
    try:
        summary = oof.load_summary(parent)
    except oof.OOFError as e:
        raise ExportError(str(e)) from None
    if summary.get("models"):
        _check_fitted(os.path.join(parent, rundir.OOF_SUMMARY), summary["models"], parent, entries,
                      f"rerun python -m salt_tf.cv collect --parent={parent}")
    return summary


def _oof_choice(parent: str, entries: list[LoadedModel]) -> ensemble.Ensemble:
    """A CV parent's choice without ensemble.json: the mean of its folds at oof.json's threshold and TTA."""
    summary = _oof_summary(parent, entries)
    return ensemble.Ensemble(models=[e.info() for e in entries], tta=list(summary["tta"]), combine="mean",
                             postprocessing=postprocess.PostProcessing(threshold=float(summary["threshold"])),
                             scores={"chosen_on": rundir.OOF_SUMMARY, "cv_mean": summary["cv"]["all"]})


def _check_fitted(file: str, models: list[dict], path: str, entries: list[LoadedModel], fix: str) -> None:
    """Raises ExportError (one line naming both lists and `fix`) unless `models`, the models a saved file was
    made from, are the models of `path` now (names and epochs, in order)."""
    fitted = [(m.get("name"), m.get("epoch")) for m in models]
    now = [(e.name, e.config.get("epoch")) for e in entries]
    if fitted != now:
        raise ExportError(
            f"{file}: fitted on models {', '.join(f'{n} (epoch {e})' for n, e in fitted)} but {path} now has "
            f"{', '.join(f'{n} (epoch {e})' for n, e in now)}; {fix}")
    # Same names and epochs, other weights (another seed's run, a retrained run): files written before the
    # hashes were recorded have none and are not checked, nor are the weights of a --float16 release (stored
    # cast, so their bytes are not the bytes the choice was fitted on; release.check_model_files guards them).
    other = [e.name for m, e in zip(models, entries)
             if m.get("weights_sha256") and e.config.get(release.WEIGHTS_DTYPE, "float32") == "float32" and
             m["weights_sha256"] != e.weights_sha256()]
    if other:
        raise ExportError(f"{file}: fitted on other weights than those of {', '.join(other)} in {path} (same "
                          f"names and epochs, another SHA-256: another run's file, or the run was retrained); {fix}")
