"""A released model: the files a user needs to predict with a trained model and to check it, nothing else.

    python -m salt_tf.runs release RUN --model=swa --into=models/NAME [--max_mb=25] [--float16] [--replace]
    python -m salt_tf.runs release PARENT --into=models/NAME [--float16]      # a CV parent: the fold ensemble

    models/NAME/
      export/          the released model: a byte-for-byte copy of the run's --model folder (model.json, weights.*)
      ensemble.json    the choice `predict evaluate` made for exactly that model (threshold, TTA, post-processing,
                       image-head gate), when the run has one; its model is renamed "export"
      flags.cfg  record.json  split.csv  metrics.csv
                       the run's own: how it was trained, with which code, on which data and which validation
                       images, and its curves
      MODEL_CARD.md    what the model is, its validation scores, how to use, verify and reproduce it
      SHA256SUMS       the SHA-256 of every other file; `sha256sum -c SHA256SUMS` in the folder checks them

The folder reads as a run directory whose one model is export/, so `predict submit`, `predict evaluate` (on the
run's validation images, through split.csv and record.json) and `python -m salt_tf.serving` take it as
--model_dir unchanged. Checkpoints, TensorBoard events and the other exports stay in the run: a release is for
using the model, the run for studying it. The release is written whole or not at all (rundir.staged_dir), and
every check (finished run, the model, the size limit, the target) happens before anything is written.

A CV parent whose folds have all finished is released as a fold ensemble, a folder that reads as a CV parent:
fold-k/ for every fold (the fold run's models, by default every model the parent's ensemble.json and oof.json
were made from, and its four run files), the parent's ensemble.json and oof.json (the out-of-fold scores; not
oof.npz), the card and SHA256SUMS; `predict submit --model_dir=NAME` predicts what it predicts from the parent.

--float16 stores every weight as float16 (model.json says so, WEIGHTS_DTYPE); `exports.restore` casts them back to
float32 when it loads them (`cast_weights`). Before the release is written the float16 copy of each model is
compared with its float32 original on validation images of its own run (`check_float16`): it is refused when a
probability moves by more than FLOAT16_TOLERANCE, and the card states the largest difference measured.

This module reads run directories (no TensorFlow when it is imported); --float16 imports TensorFlow and, for its
check, salt_tf.exports, lazily (exports imports this module for check_model_files). The command line is
salt_tf.runs'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil

import numpy as np

from salt_tf import ensemble, oof, rundir

RUN_FILES = (rundir.FLAGS_FILE, rundir.RECORD_FILE, rundir.SPLIT_FILE, rundir.METRICS_FILE)
CARD_FILE = "MODEL_CARD.md"
CHECKSUMS_FILE = "SHA256SUMS"
SNAPSHOTS = rundir.SNAPSHOTS_DIR  # --model=snapshots: every snapshot, kept as snapshots/snapshot-K
DEFAULT_MAX_MB = 25.0  # what a git repository carries comfortably (GitHub warns from 50 MB a file)
WEIGHTS_DTYPE = "weights_dtype"  # model.json of a --float16 release: the dtype its weights.* are stored in
FLOAT32_LAYERS = "float32_layers"  # ... and the layers (layer_of) it keeps in float32
FLOAT16 = "float16"
FLOAT16_TOLERANCE = 1e-3  # the largest change of a probability that --float16 accepts (issue 36)
FLOAT16_SAMPLE = 64       # validation images per model on which --float16 measures it


class ReleaseError(ValueError):
    """A release that cannot be made as asked; the message is one line naming the path and the fix."""


@dataclasses.dataclass
class Plan:
    """What a release holds, found and checked before anything is written."""

    source: str                # the run directory or CV parent released
    runs: dict[str, str]       # folder in the release ("" for a run, "fold-k") -> the run directory it comes from
    models: dict[str, str]     # model folder in the release -> the export folder it copies
    configs: dict[str, dict]   # each model's model.json, by its name in the release
    choice: dict | None        # ensemble.json fitted on exactly these models, renamed; None: not carried
    scores: dict | None = None  # a CV parent's oof.json, renamed; None for a run
    evaluate: str = ""         # the --model_dir `predict evaluate` would fit a choice on (the note without one)


def sha256_of_file(path: str) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def released_models(run_dir: str, model: str) -> dict[str, str]:
    """{folder in the release: export folder of the run} for --model.

    Args:
        run_dir: the run directory.
        model: an export folder relative to it ("export", "swa", "snapshots/snapshot-2"): released as export/;
            or "snapshots": every snapshot, released under its own name (the run's snapshot ensemble).

    Raises:
        ReleaseError: no such export in the run (one line listing the ones it has).
    """
    if model == SNAPSHOTS:
        found = {os.path.relpath(d, run_dir): d for d in rundir.snapshot_dirs(run_dir)}
    else:
        path = os.path.join(run_dir, model)
        found = {rundir.EXPORT_DIR: path} if rundir.is_export(path) else {}
    if not found:
        have = [os.path.relpath(d, run_dir) for d in rundir.run_exports(run_dir)]
        raise ReleaseError(f"{os.path.join(run_dir, model)}: no exported model there; --model is one of "
                           f"{', '.join(have + ([SNAPSHOTS] if any(h.startswith(SNAPSHOTS) for h in have) else []))}"
                           if have else f"{run_dir}: no exported model; train the run to its end first")
    return found


def carried_choice(run_dir: str, model: str, released: dict[str, str], configs: dict[str, dict]) -> dict | None:
    """The ensemble.json the release carries: the run's choice fitted on exactly the released models (names and
    epochs, in order), its model names changed to their names in the release; None when the run has none.
    `configs` holds each released model's model.json (by its name in the release), read once by `release`.

    `predict evaluate --model_dir=RUN/swa` writes RUN/swa/ensemble.json, its one model named "swa"; evaluate on
    the run directory writes RUN/ensemble.json, its models "export" or "snapshots/snapshot-K". The weights are
    copied byte for byte, so a choice fitted on them holds for the copy under its new name.
    """
    wanted = [(os.path.relpath(source, run_dir), configs[name].get("epoch")) for name, source in released.items()]
    candidates = [(os.path.join(run_dir, rundir.ENSEMBLE_FILE), lambda name: name)]
    if model != SNAPSHOTS:  # an export folder's own choice names its one model by the folder's base name
        candidates.insert(0, (os.path.join(run_dir, model, rundir.ENSEMBLE_FILE),
                              lambda name: model if name == os.path.basename(os.path.normpath(model)) else None))
    for path, as_run_name in candidates:
        if not os.path.isfile(path):
            continue
        choice = rundir.read_json(path)
        fitted = [(as_run_name(m.get("name")), m.get("epoch")) for m in choice.get("models", [])]
        if fitted == wanted:
            for entry, name in zip(choice["models"], released):
                entry["name"] = name
            return choice
    return None


def _check_run(run_dir: str) -> dict:
    """The run's record.json, after checking that `run_dir` is a finished run with the files a release copies."""
    if not os.path.isdir(run_dir):
        raise ReleaseError(f"{run_dir}: not found; pass a run directory or a CV parent")
    missing = [name for name in RUN_FILES if not os.path.isfile(os.path.join(run_dir, name))]
    if missing:
        raise ReleaseError(f"{run_dir}: not a run directory with a finished epoch (no {', '.join(missing)}); pass "
                           "the --model_dir of a training run")
    record = rundir.read_json(os.path.join(run_dir, rundir.RECORD_FILE))
    if not rundir.finished(record):
        raise ReleaseError(f"{run_dir}: its training has not finished ({rundir.RECORD_FILE} has no end after its "
                           "last start); run the same train command to its end, then release")
    return record


def _configs(models: dict[str, str]) -> dict[str, dict]:
    """{name: model.json} of each model folder."""
    return {name: rundir.read_json(os.path.join(source, rundir.EXPORT_CONFIG)) for name, source in models.items()}


def run_plan(run_dir: str, model: str | None) -> Plan:
    """The release of one finished run: its --model (default export/, released_models) and its choice.

    Raises:
        ReleaseError: an unfinished run or no such model (one line).
    """
    model = os.path.normpath(model or rundir.EXPORT_DIR)
    _check_run(run_dir)
    released = released_models(run_dir, model)
    configs = _configs(released)
    return Plan(run_dir, {"": run_dir}, released, configs, carried_choice(run_dir, model, released, configs),
                evaluate=run_dir if model == SNAPSHOTS else os.path.join(run_dir, model))


def fold_plan(parent: str, model: str | None) -> Plan:
    """The release of a CV parent whose folds have all finished: the fold ensemble its oof.json and ensemble.json
    were made from. Whether those files still fit the folds is salt_tf.exports' check (load_out_of_fold,
    load_ensemble), as predict makes it on the parent.

    Args:
        parent: the CV parent.
        model: None: every model of each fold as the parent stands for them (exports.find_exports: the fold's
            snapshots, else its export/); else --model of each fold (released_models), which must pick the same
            models, since the out-of-fold scores and the choice are of those.

    Raises:
        ReleaseError: a fold missing or unfinished, no or a stale oof.json, or --model picking other models than
            the out-of-fold predictions were made from (one line with the fix). A stale ensemble.json is left
            behind (the release's note says how to make one).
    """
    from salt_tf import exports  # no TensorFlow here; exports imports this module (check_model_files)

    try:
        entries = exports.find_exports(parent)
    except exports.ExportError as e:
        raise ReleaseError(str(e)) from None
    try:
        scores = exports.load_out_of_fold(parent, entries)[1]
    except exports.ExportError as e:
        raise ReleaseError(f"{e}; a fold ensemble is released with its out-of-fold scores") from None
    runs = {os.path.relpath(run, parent): run for run in rundir.fold_runs(parent).values()}
    released = {}
    for prefix, run in runs.items():
        _check_run(run)
        chosen = ({os.path.relpath(d, run): d for d in rundir.export_dirs(run)} if model is None
                  else released_models(run, os.path.normpath(model)))
        released.update({os.path.join(prefix, name): source for name, source in chosen.items()})
    renamed = {os.path.relpath(source, parent): name for name, source in released.items()}
    if list(renamed) != [e.name for e in entries]:
        raise ReleaseError(f"--model={model}: the out-of-fold scores of {parent} (oof.json, ensemble.json) are of "
                           f"its folds' {', '.join(e.name for e in entries)}, not of {', '.join(renamed)}; a fold "
                           "ensemble is released with the models they were made from: leave out --model")
    choice = None
    if os.path.isfile(os.path.join(parent, rundir.ENSEMBLE_FILE)):
        try:
            exports.load_ensemble(parent, entries)
            choice = rundir.read_json(os.path.join(parent, rundir.ENSEMBLE_FILE))
        except exports.ExportError:
            pass  # fitted on an earlier training of the folds: predict refuses it on the parent too
    return Plan(parent, runs, released, _configs(released), _renamed_choice(choice, renamed),
                _renamed_choice(scores, renamed), evaluate=parent)


def _renamed_choice(payload: dict | None, renamed: dict[str, str]) -> dict | None:
    """ensemble.json or oof.json of a CV parent with its models renamed to their names in the release
    (`renamed`: name in the parent -> name in the release), the meta-model's member positions
    ('fold-*/<model>') as fold-0's models are renamed."""
    if payload is None:
        return None
    payload = dict(payload)
    if "models" in payload:
        payload["models"] = [dict(m, name=renamed.get(m.get("name"), m.get("name"))) for m in payload["models"]]
    stacker = payload.get("stacker")
    if stacker and stacker.get("models"):
        wildcard = f"{rundir.FOLD_PREFIX}*"
        fold_0 = f"{rundir.FOLD_PREFIX}0"

        def member(name: str) -> str:
            head, _, inside = name.partition(os.sep)
            new = renamed.get(os.path.join(fold_0, inside)) if head == wildcard else None
            return os.path.join(wildcard, new.split(os.sep, 1)[1]) if new else name

        payload["stacker"] = dict(stacker, models=[member(name) for name in stacker["models"]])
    return payload


def _check_target(into: str, run_dir: str, replace: bool) -> None:
    """Refuses a target that would overwrite anything but an older release (and that only with --replace)."""
    inside = os.path.commonpath([os.path.abspath(into), os.path.abspath(run_dir)]) == os.path.abspath(run_dir)
    if inside:
        raise ReleaseError(f"--into={into}: inside the run {run_dir}; release into a folder of its own, e.g. "
                           "models/<name>")
    if not os.path.exists(into) or (os.path.isdir(into) and not os.listdir(into)):
        return
    if not os.path.isfile(os.path.join(into, CHECKSUMS_FILE)):
        raise ReleaseError(f"--into={into}: exists and is not a release (no {CHECKSUMS_FILE}); choose another "
                           "folder")
    if not replace:
        raise ReleaseError(f"--into={into}: holds a release already; pass --replace to replace it with this one")
    foreign = _not_released(into)
    if foreign:
        raise ReleaseError(f"--into={into}: {', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not as "
                           f"released (added or changed since, e.g. by predict evaluate); move "
                           f"{'it' if len(foreign) == 1 else 'them'} out of the folder before --replace")


def _not_released(release_dir: str) -> list[str]:
    """The files of a release folder that its SHA256SUMS does not list with their present content."""
    listed = read_checksums(release_dir)
    found = []
    for root, _, files in os.walk(release_dir):
        for name in files:
            path = os.path.relpath(os.path.join(root, name), release_dir)
            if path != CHECKSUMS_FILE and listed.get(path) != sha256_of_file(os.path.join(root, name)):
                found.append(path)
    return sorted(found)


def _model_files(source: str) -> list[str]:
    """The files of an export folder a release carries: model.json and weights.*, by name, sorted."""
    return [entry for entry in sorted(os.listdir(source))
            if entry == rundir.EXPORT_CONFIG or entry.startswith(rundir.EXPORT_WEIGHTS + ".")]


def _files_to_copy(plan: Plan, float16: bool) -> dict[str, str]:
    """{path in the release: source file} of what is copied byte for byte: each model's model.json and
    weights.* (none with `float16`: they are converted, write_float16), then each run's files."""
    files = {}
    for name, source in plan.models.items():
        files.update({os.path.join(name, entry): os.path.join(source, entry)
                      for entry in ([] if float16 else _model_files(source))})
    for prefix, run in plan.runs.items():
        files.update({os.path.join(prefix, name): os.path.join(run, name) for name in RUN_FILES})
    return files


def _expected_bytes(plan: Plan, float16: bool) -> int:
    """The size of the release's copied and converted files (a float16 weights.data-* counted at half)."""
    total = sum(os.path.getsize(os.path.join(source, entry)) // (2 if float16 and ".data-" in entry else 1)
                for source in plan.models.values() for entry in _model_files(source))
    return total + sum(os.path.getsize(os.path.join(run, name)) for run in plan.runs.values() for name in RUN_FILES)


def _check_size(plan: Plan, size: int, max_mb: float, float16: bool) -> None:
    """Raises ReleaseError (one line with the fix) when `size` bytes are over max_mb."""
    if size <= max_mb * 1e6:
        return
    fixes = (["release one model (--model=swa, export or snapshots/snapshot-K)"] if "" in plan.runs else []) + (
        [] if float16 else ["store float16 weights (--float16)"])
    raise ReleaseError(f"{plan.evaluate}: the release would be {size / 1e6:.1f} MB, more than --max_mb={max_mb:g}; "
                       f"{', or '.join(fixes + ['raise --max_mb'])}")


def release(run_dir: str, model: str | None, into: str, max_mb: float = DEFAULT_MAX_MB, replace: bool = False,
            float16: bool = False, data_dir: str | None = None) -> dict:
    """Copies a finished run's model, or a CV parent's fold ensemble, and its record into a release folder, with
    its model card and SHA-256 sums.

    Args:
        run_dir: the run directory, or a CV parent whose folds have all finished (fold_plan).
        model: which model (released_models): an export folder of the run, or "snapshots"; None: export/ of a
            run, every model the parent's out-of-fold predictions were made from (each fold's, fold_plan).
        into: the release folder; must not exist, be empty, or (with `replace`) hold a release.
        max_mb: the largest release allowed, in MB (10^6 bytes), checked before anything is written.
        replace: replace the release at `into` (whole: readers see the old release or the new one).
        float16: store the weights as float16 (write_float16), refused unless every model's probabilities stay
            within FLOAT16_TOLERANCE of its float32 original's (check_float16).
        data_dir: the labelled folder the runs trained on, if it moved (the float16 check reads images of it).

    Returns:
        {"into", "models" (name in the release -> its folder in the run or parent), "bytes", "sha256" (path ->
        hex), "choice" (whether ensemble.json was carried over), "evaluate" (the --model_dir predict evaluate
        would fit one on), "float16_difference" (the largest measured, or None)}.

    Raises:
        ReleaseError: an unfinished run or fold, no such model, a release over max_mb, a target that is not an
            older release, a float16 copy that differs too much, or a file that changed while it was copied
            (one line; nothing written).
    """
    plan = fold_plan(run_dir, model) if rundir.is_cv_parent(run_dir) else run_plan(run_dir, model)
    _check_target(into, run_dir, replace)
    _check_size(plan, _expected_bytes(plan, float16), max_mb, float16)
    with rundir.staged_dir(into) as stage:
        half = _fill(plan, stage, float16, data_dir)
        sums = _sums(stage)
        _check_size(plan, sum(os.path.getsize(os.path.join(stage, path)) for path in sums), max_mb, float16)
        rundir.write_text(os.path.join(stage, CARD_FILE), model_card(plan, into, sums, half))
        sums[CARD_FILE] = sha256_of_file(os.path.join(stage, CARD_FILE))
        rundir.write_text(os.path.join(stage, CHECKSUMS_FILE),
                          "".join(f"{sums[path]}  {path}\n" for path in sorted(sums)))
    size = sum(os.path.getsize(os.path.join(into, path)) for path in sums)
    return {"into": into, "models": {name: os.path.relpath(src, run_dir) for name, src in plan.models.items()},
            "bytes": size, "sha256": sums, "choice": plan.choice is not None, "evaluate": plan.evaluate,
            "float16_difference": half["difference"] if half else None}


def _fill(plan: Plan, stage: str, float16: bool, data_dir: str | None) -> dict | None:
    """Writes the release's files but the card and SHA256SUMS into the staging folder: the copies, the float16
    models (write_float16), the carried ensemble.json and oof.json.

    Returns:
        write_float16's result, or None without `float16`.

    Raises:
        ReleaseError: a source file that changed while it was copied or converted (one line).
    """
    files = _files_to_copy(plan, float16)
    sources = {path: sha256_of_file(source) for path, source in files.items()}
    sources.update({source: sha256_of_file(source) for source in _converted_sources(plan, float16)})
    for path, source in files.items():
        os.makedirs(os.path.dirname(os.path.join(stage, path)), exist_ok=True)
        shutil.copyfile(source, os.path.join(stage, path))
    half = write_float16(plan, stage, data_dir) if float16 else None
    for name, payload in ((rundir.ENSEMBLE_FILE, plan.choice), (rundir.OOF_SUMMARY, plan.scores)):
        if payload is not None:
            rundir.write_json(os.path.join(stage, name), payload)  # its weights_sha256 are the float32 originals
    changed = [path for path in files if sha256_of_file(os.path.join(stage, path)) != sources[path]] + [
        source for source in _converted_sources(plan, float16) if sha256_of_file(source) != sources[source]]
    if changed:
        raise ReleaseError(f"{plan.source}: {', '.join(changed)} changed while being copied; is the run still "
                           "being written? Release it when nothing writes to it")
    return half


def _sums(folder: str) -> dict[str, str]:
    """{path relative to `folder`: SHA-256} of every file under it."""
    return {os.path.relpath(os.path.join(root, name), folder): sha256_of_file(os.path.join(root, name))
            for root, _, names in os.walk(folder) for name in names}


# ------------------------------------------------------------------------------------------- float16 weights
# Plain float16 moves the recipe model's probabilities by up to 0.011 (measured on models/salt-recipe, 32
# validation images), 0.0093 of it from the stem's 160 weights alone: an error in the first layer reaches every
# pixel. So --float16 keeps in float32 the layers whose float16 copy moves the probabilities most, one at a time,
# until the rest moves them by at most half FLOAT16_TOLERANCE on half of a validation sample (float16_layers), and
# checks the result against FLOAT16_TOLERANCE on the other half (check_float16).


def _converted_sources(plan: Plan, float16: bool) -> list[str]:
    """The source files --float16 converts rather than copies (each model's model.json and weights.*)."""
    return [os.path.join(source, entry) for source in plan.models.values() for entry in _model_files(source)
            ] if float16 else []


def layer_of(key: str) -> str:
    """The layer a checkpoint key belongs to, as --float16 chooses them: its first three path components
    ('model/encoder/stem', 'model/decoder/level0')."""
    return "/".join(key.split("/")[:3])


def _read_weights(source: str) -> tuple[list[str], list]:
    """(names, tensors) of every tensor of the TensorFlow checkpoint `source`, in name order."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(source)
    names = sorted(reader.get_variable_to_dtype_map())
    return names, [reader.get_tensor(name) for name in names]


def _cast(names: list[str], tensors: list, dtype: str, keep: frozenset = frozenset()) -> list:
    """`tensors` with every floating-point one cast to `dtype`, except those of the layers in `keep` (layer_of)
    and, when narrowing, the vectors (biases, batch-norm scales and statistics: 0.4 % of the recipe model's
    weights, and 0.0022 of its 0.011 probability change in float16)."""
    def cast(name: str, t) -> bool:
        return (isinstance(t, np.ndarray) and np.issubdtype(t.dtype, np.floating) and layer_of(name) not in keep
                and (t.ndim >= 2 or np.dtype(dtype).itemsize >= t.dtype.itemsize))

    return [t.astype(dtype) if cast(name, t) else t for name, t in zip(names, tensors)]


def _save_weights(target: str, names: list[str], tensors: list) -> None:
    """Writes `tensors` under `names` as the TensorFlow checkpoint `target` (a weights prefix)."""
    import tensorflow as tf

    tf.raw_ops.SaveV2(prefix=target, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)


def cast_weights(source: str, target: str, dtype: str, keep: frozenset = frozenset()) -> None:
    """Writes the TensorFlow checkpoint `source` (an export's weights prefix: weights.index + weights.data-*) as
    `target` with every floating-point tensor cast to `dtype` ("float16" or "float32") except those of the layers
    in `keep` (layer_of); other tensors (the object graph) and every name unchanged, so a cast to float32 gives
    back a checkpoint that restores as any export does. Imports TensorFlow.

    Raises:
        tf.errors.OpError, ValueError: `source` is no readable checkpoint.
    """
    names, tensors = _read_weights(source)
    _save_weights(target, names, _cast(names, tensors, dtype, keep))


def _probabilities(model, inputs) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask probabilities, image-head probabilities or None) of a model, no TTA, in float64."""
    from salt_tf import tta

    p, h = tta.predict_with_head(model, inputs, tta=("none",))
    return p.astype(np.float64), None if h is None else h.astype(np.float64)


def _difference(a: tuple, b: tuple) -> float:
    """The largest absolute difference between two _probabilities results (masks and image head)."""
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b) if x is not None)


def float16_layers(model, source: str, inputs: np.ndarray, reference: tuple) -> list[str]:
    """The layers to keep in float32 (layer_of) so that float16 weights everywhere else move no probability of
    `inputs` by more than half FLOAT16_TOLERANCE: the layers in order of how much their own float16 copy moves
    them, added until the rest does not.

    Args:
        model: the model built for the export (its weights are overwritten here).
        source: the export's float32 weights prefix.
        inputs: model inputs of the sample; `reference`: the float32 model's _probabilities of them.

    Returns:
        The layers kept in float32, in the order chosen (empty when float16 everywhere is close enough).
    """
    from salt_tf import checkpoints

    import tensorflow as tf

    folder = f"ram://salt_tf_float16/{os.getpid()}"  # TensorFlow's in-memory file system: nothing on disk
    names, tensors = _read_weights(source)

    def moved(keep: frozenset) -> float:
        half = _cast(names, _cast(names, tensors, FLOAT16, keep), "float32")
        _save_weights(f"{folder}/{rundir.EXPORT_WEIGHTS}", names, half)
        checkpoints.restore_exported_weights(folder, model)
        return _difference(_probabilities(model, inputs), reference)

    layers = sorted({layer_of(name) for name in names})
    kept: list[str] = []
    target = FLOAT16_TOLERANCE / 2  # a margin for the other images, on which check_float16 holds it to the tolerance
    if moved(frozenset()) > target:
        alone = {layer: moved(frozenset(layers) - {layer}) for layer in layers}
        for layer in sorted(layers, key=lambda name: -alone[name]):
            kept.append(layer)
            if moved(frozenset(kept)) <= target:
                break
    tf.io.gfile.rmtree(folder)
    return kept


def _validation_inputs(run: str, data_dir: str | None, use_depth: bool) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs of 2 x FLOAT16_SAMPLE of the run's validation images (split.csv), evenly spread, as two
    halves: (to choose the float32 layers on, to check the result on)."""
    from salt_tf import pipeline
    from salt_tf.data import kaggle, splits

    ids = sorted(splits.read_split(os.path.join(run, rundir.SPLIT_FILE)).query("role == 'val'")["id"])
    ids = [ids[i] for i in sorted(set(np.linspace(0, len(ids) - 1, 2 * FLOAT16_SAMPLE).astype(int)))] if ids else []
    try:
        data = kaggle.load_labelled(data_dir or rundir.data_dir(run), ids)
    except (kaggle.DataError, rundir.RunDirError) as e:
        raise ReleaseError(f"{e}; --float16 checks the float16 weights on the run's validation images (pass "
                           "--data_dir=<labelled folder>)") from None
    inputs = pipeline.model_inputs(ids, data.images, data.depths, use_depth)
    return inputs[0::2], inputs[1::2]


def write_float16(plan: Plan, stage: str, data_dir: str | None) -> dict:
    """Writes each model of the plan into `stage` with float16 weights but for the layers float16_layers keeps
    (model.json says WEIGHTS_DTYPE float16 and names them, FLOAT32_LAYERS), each checked by check_float16.

    Returns:
        {"difference": the largest change of a probability over every model's check images, "float32": {name:
        the layers kept in float32}, "images": check images per model}.
    """
    from salt_tf import exports  # TensorFlow; exports imports this module

    found = {"difference": 0.0, "float32": {}, "images": 0}
    for name, source in plan.models.items():
        prefix = name.split(os.sep, 1)[0] if name.split(os.sep, 1)[0] in plan.runs else ""  # "fold-k" or a run's ""
        entry = _restored(exports, name, source, plan.configs[name])
        choose, check = _validation_inputs(plan.runs[prefix], data_dir, entry.use_depth)
        reference = _probabilities(entry.model, check)
        weights = os.path.join(source, rundir.EXPORT_WEIGHTS)
        kept = float16_layers(entry.model, weights, choose, _probabilities(entry.model, choose))
        os.makedirs(os.path.join(stage, name))
        cast_weights(weights, os.path.join(stage, name, rundir.EXPORT_WEIGHTS), FLOAT16, frozenset(kept))
        config = dict(plan.configs[name], **{WEIGHTS_DTYPE: FLOAT16, FLOAT32_LAYERS: kept})
        rundir.write_json(os.path.join(stage, name, rundir.EXPORT_CONFIG), config, final_newline=False)
        difference = check_float16(_restored(exports, name, os.path.join(stage, name), config).model, check,
                                   reference, source)
        found = {"difference": max(found["difference"], difference), "images": len(check),
                 "float32": dict(found["float32"], **{name: kept})}
    return found


def _restored(exports, name: str, path: str, config: dict):
    """exports.restore of one model folder, its ExportError a ReleaseError."""
    try:
        return exports.restore(exports.LoadedModel(name, path, config))
    except exports.ExportError as e:
        raise ReleaseError(str(e)) from None


def check_float16(model, inputs: np.ndarray, reference: tuple, source: str) -> float:
    """The largest difference between the probabilities (masks and image head, no TTA) of `model`, a float16
    copy as loaded, and `reference`, its float32 original's, on `inputs`.

    Raises:
        ReleaseError: a difference over FLOAT16_TOLERANCE (one line naming the model `source` and the fix).
    """
    difference = _difference(_probabilities(model, inputs), reference)
    if not difference <= FLOAT16_TOLERANCE:  # NaN too
        raise ReleaseError(f"{source}: its float16 weights move a probability by {difference:.2g} on {len(inputs)} "
                           f"validation images, more than {FLOAT16_TOLERANCE:g}; release it without --float16")
    return difference


def release_of(export_dir: str) -> str | None:
    """The release folder an export folder belongs to (export/ or snapshots/snapshot-K of a folder with
    SHA256SUMS, or of fold-k/ in one), or None when it is not part of a release (a run's export)."""
    root = rundir.source_run_dir(export_dir)
    if os.path.basename(root).startswith(rundir.FOLD_PREFIX):  # a fold ensemble's: <release>/fold-k/<model>
        root = os.path.dirname(root) if os.path.isfile(os.path.join(os.path.dirname(root), CHECKSUMS_FILE)) else root
    return root if os.path.isfile(os.path.join(root, CHECKSUMS_FILE)) else None


def check_model_files(export_dir: str) -> None:
    """Checks a released model's files against its release's SHA256SUMS before they are used; nothing to
    check for a model that is not part of a release.

    Raises:
        ReleaseError: a model file missing from SHA256SUMS or with other bytes than it lists (one line naming
            the file and the fix).
    """
    root = release_of(export_dir)
    if root is None:
        return
    listed = read_checksums(root)
    for name in sorted(os.listdir(export_dir)):
        if name != rundir.EXPORT_CONFIG and not name.startswith(rundir.EXPORT_WEIGHTS + "."):
            continue
        path = os.path.relpath(os.path.join(export_dir, name), root)
        if listed.get(path) != sha256_of_file(os.path.join(export_dir, name)):
            why = "is not listed in" if path not in listed else "does not have the SHA-256 listed in"
            raise ReleaseError(f"{os.path.join(export_dir, name)}: {why} {os.path.join(root, CHECKSUMS_FILE)}; "
                               "the copy is damaged or was changed: fetch the release again")


def read_checksums(release_dir: str) -> dict[str, str]:
    """{path: hex SHA-256} of a release's SHA256SUMS (the `sha256sum` format: hash, two spaces, path)."""
    with open(os.path.join(release_dir, CHECKSUMS_FILE), encoding="utf-8") as f:
        return {path: digest for digest, path in (line.rstrip("\n").split("  ", 1) for line in f if line.strip())}


# ------------------------------------------------------------------------------------------------ model card


def _architecture(config: dict) -> str:
    """The model of a model.json's "model" in words."""
    se = {"scse": "channel + spatial squeeze-and-excitation (scSE)", "channel": "squeeze-and-excitation"}
    parts = [f"residual U-Net, width {config.get('base_width')}, depth {config.get('depth')}, "
             f"{config.get('blocks_per_level')} blocks per level"]
    if config.get("se"):
        parts.append(se.get(config.get("se_type", "channel"), "squeeze-and-excitation") +
                     f" (ratio {config.get('se_ratio')})")
    if config.get("hypercolumn"):
        parts.append("hypercolumn")
    if config.get("deep_supervision"):
        parts.append("deep supervision with an image-level salt head")
    size = config.get("input_size")
    parts.append(f"input padded to {size}x{size} ({config.get('pad_mode')})" if size and size != 101
                 else "native 101x101 input")
    return ", ".join(parts)


def _rules(pp: dict) -> list[str]:
    """The post-processing of ensemble.json in words: threshold, then each rule it applies."""
    rules = [f"threshold {pp.get('threshold')}"]
    if pp.get("min_component"):
        rules.append(f"components under {pp['min_component']} px removed")
    if pp.get("min_salt"):
        rules.append(f"masks under {pp['min_salt']} px emptied")
    if pp.get("min_has_salt"):
        rules.append(f"empty when the image head's salt probability < {pp['min_has_salt']}")
    return rules


def _scores_lines(choice: dict | None, into: str, where: str = "") -> list[str]:
    """The validation section of the card: what ensemble.json chose and its scores. `where`: on which images it
    was chosen (default: the run's validation images)."""
    if choice is None:
        return ["Not evaluated in the release: `python -m salt_tf.predict evaluate "
                f"--model_dir={into}` chooses the threshold, TTA and post-processing on the run's validation "
                "images (the `val` rows of split.csv) and writes ensemble.json; `predict submit` then applies it."]
    pp, scores = choice.get("postprocessing") or {}, choice.get("scores") or {}
    score = ensemble.format_score
    where = where or f"the {scores.get('images')} validation images of split.csv"
    lines = [f"Chosen by `predict evaluate` on {where} (ensemble.json): TTA {'+'.join(choice.get('tta', []))}, "
             f"{choice.get('combine')} of {len(choice.get('models', []))} model(s), {', '.join(_rules(pp))}.", "",
             "| score (competition metric: mean precision over IoU 0.50-0.95) | value |", "|---|---|",
             f"| {scores.get('folds')}-fold cross-validated over the images, thresholds and rules chosen on the "
             f"other folds (the honest figure) | **{score(scores.get('cv_chosen', scores.get('cv_mean_postprocessed')))}** |",
             f"| the same, threshold only | {score(scores.get('cv_mean'))} |",
             f"| with the choice fitted on all of them (optimistic) | {score((pp.get('scores') or {}).get('final'))} |"]
    return lines


def _weights_row(half: dict | None) -> str:
    """The card's row on how the weights are stored (`half`: write_float16's result, None for float32)."""
    if half is None:
        return "| weights | float32, as trained |"
    kept = sorted({layer for layers in half["float32"].values() for layer in layers})
    kept = f" except {len(kept)} layer(s) kept in float32 ({', '.join(kept)})" if kept else ""
    return (f"| weights | stored as float16{kept}, restored to float32 when loaded; largest difference of a "
            f"probability from the float32 model's on {half['images']} validation images of each model's run: "
            f"{half['difference']:.2g} (the release accepts {FLOAT16_TOLERANCE:g}) |")


def _use_lines(into: str, fold_ensemble: bool) -> list[str]:
    """The card's Use and Check sections."""
    serve = ("    python -m salt_tf.serving --model_dir=" + into + " --output=<folder>/1    # a SavedModel for serving"
             if not fold_ensemble else
             "`python -m salt_tf.serving` refuses a fold ensemble (one SavedModel would weigh the folds by their "
             "numbers of models); serve one fold's models with --model_dir=" + os.path.join(into, "fold-0") + ".")
    return ["## Use", "",
            "    python -m salt_tf.predict submit --model_dir=" + into + " --images=<folder of 101x101 PNGs> "
            "--output=submission.csv", serve, "", "## Check", "",
            f"    (cd {into} && sha256sum -c {CHECKSUMS_FILE})", ""]


def _record_parts(record: dict, config: dict, sums: dict[str, str]) -> tuple[str, str, list[str]]:
    """(the card's model row, its code in words, its rows of the weights' SHA-256) from a run's record and one
    released model's model.json."""
    code, env = record.get("code") or {}, record.get("environment") or {}
    dirty = " with uncommitted changes (record.json holds the diff)" if code.get("dirty") else ""
    weights = [(path, digest) for path, digest in sorted(sums.items()) if os.path.basename(path).startswith(
        rundir.EXPORT_WEIGHTS + ".data")]
    return (f"| model | {_architecture(config['model'])}; {config.get('precision', 'float32')} |",
            f"code {str(code.get('commit'))[:12]}{dirty}; TensorFlow {env.get('tensorflow')}; deterministic: "
            f"{bool((record.get('determinism') or {}).get('deterministic'))}",
            [f"| SHA-256 of `{path}` | `{digest}` |" for path, digest in weights])


def model_card(plan: Plan, into: str, sums: dict[str, str], half: dict | None = None) -> str:
    """MODEL_CARD.md of a release (a run's, or a CV parent's fold ensemble: fold_card): the model, its training
    and data, validation scores, use, checks, origin. `half`: write_float16's result, None for float32."""
    if "" not in plan.runs:
        return fold_card(plan, into, sums, half)
    name, run_dir, configs = os.path.basename(os.path.normpath(into)), plan.source, plan.configs
    record = rundir.read_json(os.path.join(run_dir, rundir.RECORD_FILE))
    data, summary = record.get("data") or {}, record.get("summary") or {}
    models = "; ".join(f"`{n}` = the run's `{os.path.relpath(s, run_dir)}` (epoch {configs[n].get('epoch')}, "
                       f"validation metric {ensemble.format_score(configs[n].get('val_metric'))})"
                       for n, s in plan.models.items())
    model_row, code, weights = _record_parts(record, next(iter(configs.values())), sums)
    lines = [
        f"# {name}", "",
        "A salt_tf model for the TGS Salt Identification task: a salt mask for each 101x101 "
        "grayscale seismic image. Released from a finished run by `python -m salt_tf.runs release`; this card is "
        "written from the run's record.", "",
        "| | |", "|---|---|", model_row, f"| released | {models} |",
        f"| training | {summary.get('epochs_completed')} epochs on {data.get('train_images')} images, the flags in "
        f"flags.cfg; {code} |",
        f"| data | fingerprint {str(data.get('fingerprint'))[:16]}... of the labelled folder; "
        f"{data.get('val_images')} validation images (the `val` rows of split.csv) never trained on |",
        *([_weights_row(half)] if half is not None else []), *weights,
        "", "## Validation", "", *_scores_lines(plan.choice, into), "", *_use_lines(into, False),
        "## Reproduce", "",
        f"With the code at commit {(record.get('code') or {}).get('commit')} and the same labelled data (the "
        "fingerprint above):", "",
        f"    python -m salt_tf.train --flagfile={into}/{rundir.FLAGS_FILE} --model_dir=<new run>", "",
        "then `python -m salt_tf.runs diff <new run> <the original run>` compares them; on the same machine type "
        "the weights come out bit-identical (docs/usage.md, Reproducibility).", ""]
    return "\n".join(lines)


def fold_card(plan: Plan, into: str, sums: dict[str, str], half: dict | None) -> str:
    """MODEL_CARD.md of a fold ensemble: K folds, their models, the out-of-fold scores (oof.json: @0.5 and cv,
    per coverage group), the chosen combination, threshold, post-processing and gate (ensemble.json), use,
    checks, and the cv train command that reproduces the folds."""
    records = {prefix: rundir.read_json(os.path.join(run, rundir.RECORD_FILE)) for prefix, run in plan.runs.items()}
    first = next(iter(records.values()))  # fold-0's (fold_runs: in fold order)
    data, scores = first.get("data") or {}, plan.scores or {}
    model_row, code, weights = _record_parts(first, next(iter(plan.configs.values())), sums)
    commits = {str((r.get("code") or {}).get("commit")) for r in records.values()}
    models = "; ".join(f"`{n}` (epoch {c.get('epoch')}, validation metric {ensemble.format_score(c.get('val_metric'))})"
                       for n, c in plan.configs.items())
    epochs = ", ".join(f"{p} {(r.get('summary') or {}).get('epochs_completed')}" for p, r in records.items())
    lines = [
        f"# {os.path.basename(os.path.normpath(into))}", "",
        f"A salt_tf fold ensemble for the TGS Salt Identification task: a salt mask for each 101x101 grayscale "
        f"seismic image, the mean of {len(plan.runs)} folds' models, each fold weighing the same. Released from the "
        f"finished cross-validation parent by `python -m salt_tf.runs release`; this card is written from the "
        f"folds' records and the parent's oof.json and ensemble.json.", "",
        "| | |", "|---|---|", model_row, _weights_row(half), f"| folds | {len(plan.runs)}: {models} |",
        f"| training | epochs per fold: {epochs}; each fold trained on the other folds' images, the flags in "
        f"fold-k/flags.cfg; {code if len(commits) == 1 else 'commits ' + ', '.join(sorted(commits))} |",
        f"| data | fingerprint {str(data.get('fingerprint'))[:16]}... of the labelled folder; every image validated "
        f"by exactly one fold (the `val` rows of fold-k/split.csv) |", *weights,
        "", "## Out-of-fold scores", "",
        f"Every labelled image predicted by the fold that never trained on it (oof.json, `python -m salt_tf.cv "
        f"collect`); `@0.50` at threshold 0.5, `cv threshold` with the threshold chosen on the other images:", "",
        *["    " + line for line in oof.format_summary(scores).splitlines()], "",
        "## The chosen combination", "",
        *(_scores_lines(plan.choice, into, f"the {scores.get('images')} out-of-fold predictions (oof.npz)")
          if plan.choice is not None else
          [f"No ensemble.json: `predict submit` takes the mean of the folds at oof.json's threshold "
           f"{scores.get('threshold')} (TTA {'+'.join(scores.get('tta', []))}). `python -m salt_tf.predict evaluate "
           f"--model_dir={plan.source}` chooses the combination, post-processing and image-head gate on the "
           "out-of-fold predictions; release again after it."]),
        "", *_use_lines(into, True), "## Reproduce", "",
        f"With the code at commit {(first.get('code') or {}).get('commit')} and the same labelled data (the "
        "fingerprint above):", "", *cv_train_lines(plan, into), ""]
    return "\n".join(lines)


def fold_template(values: list[str]) -> str | None:
    """The one value with `{fold}` (salt_tf.cv's per-fold field) that gives values[k] for fold k, e.g.
    ["r1/fold-0", "r1/fold-1"] -> "r1/fold-{fold}"; None when there is none."""
    prefix = os.path.commonprefix(values)
    suffix = os.path.commonprefix([v[len(prefix):][::-1] for v in values])[::-1]
    template = prefix + "{fold}" + suffix
    return template if all(template.replace("{fold}", str(k)) == v for k, v in enumerate(values)) else None


def cv_train_lines(plan: Plan, into: str) -> list[str]:
    """The card's commands that train the folds again: `cv train` with fold-0's flags.cfg, each flag whose value
    differs by fold given with `{fold}` (cv.fold_arguments), then collect and evaluate; or, when a flag differs
    otherwise, each fold's own train command."""
    flagfiles = [rundir.read_flagfile(run) or {} for run in plan.runs.values()]  # in fold order (fold_runs)
    per_fold, odd = [], []
    for name in sorted(set().union(*flagfiles) - {"fold", "model_dir"}):
        values = [f.get(name, "") for f in flagfiles]
        if len(set(values)) > 1:
            template = fold_template(values)
            (per_fold.append(f"--{name}={template}") if template else odd.append(name))
    if odd:
        return [f"The folds' flags differ in {', '.join(odd)}: train each fold with its own, then collect:", "",
                *[f"    python -m salt_tf.train --flagfile={into}/{p}/{rundir.FLAGS_FILE} "
                  f"--model_dir=<new parent>/{p}" for p in plan.runs],
                "    python -m salt_tf.cv collect --parent=<new parent>"]
    return [f"    python -m salt_tf.cv train --flagfile={into}/fold-0/{rundir.FLAGS_FILE} --parent=<new parent>"
            + "".join(f" {flag}" for flag in per_fold),
            "    python -m salt_tf.predict evaluate --model_dir=<new parent>", "",
            "(cv train ends with `cv collect`.) `python -m salt_tf.cv compare <new parent> <the original parent>` "
            "compares their out-of-fold scores; on the same machine type each fold's weights come out "
            "bit-identical (docs/usage.md, Reproducibility)."]
