"""The predict command: a run's models on a folder of images (submit) or on the run's validation images (evaluate).

    python -m salt_tf.predict submit --model_dir=runs/a --images=/data/tgs/test/images --output=submission.csv
    python -m salt_tf.predict evaluate --model_dir=runs/a        # table + <run>/ensemble.json
    python -m salt_tf.predict evaluate --model_dir=runs/a/swa    # one export of the run: <run>/swa/ensemble.json
    python -m salt_tf.predict evaluate --model_dir=runs/cv       # a CV parent: from its oof.npz, <parent>/ensemble.json
    python -m salt_tf.predict submit --model_dir=runs/cv --images=... --output=...   # the fold ensemble

`--model_dir` is a run directory (its snapshots if it made any, else its export/), one export folder, or a
cross-validation parent (python -m salt_tf.cv: the fold ensemble; which models and how they weigh is
salt_tf.exports'). `python -m salt_tf.predict <command> --help` describes a command (SUBMIT_HELP,
EVALUATE_HELP below) and lists its flags. This module is the command only: test-time augmentation and batched
prediction are salt_tf.tta's, the image folder and depths readers salt_tf.data.kaggle's, the model inputs
salt_tf.pipeline's, the table and the ensemble choice salt_tf.ensemble's. The command lines of before the
subcommands (flags only; `--evaluate`) stop with one line naming the new form.

Each subcommand's flags live in a FlagValues of its own (salt_tf.cli), not in absl's global FLAGS, where the
train flags (salt_tf.flags) own `--model_dir`, `--batch_size` and `--data_dir`: both modules can be imported
in one process and keep the natural names.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import shlex
import sys
import time
from typing import Sequence

import numpy as np
from absl import flags

from salt_tf import IMAGE_SIZE, cli, ensemble, exports, metrics, postprocess, progress, rundir, tfstart, tta
from salt_tf.data import kaggle

# submit predicts about this many images at a time (whole batches): the models' probabilities of one chunk are
# in memory at once. Plain progress lines (not on a terminal) come as often, in submit and evaluate.
CHUNK_IMAGES = 2048


class PredictError(ValueError):
    """A problem with the user's flags or run folder; the message is one line naming the path or flag."""


SUBMIT_HELP = """\
Reads every PNG of --images first (an unreadable file stops it with one line naming the file, before anything
is written; --skip_bad predicts the others, lists the bad ones and gives them empty masks in the submission,
or leaves their rows out with --nobad_as_empty), predicts them in batches with TTA, combines the models (the
ensemble.json `evaluate` wrote, if any: mean or stacked meta-model plus post-processing; else the mean and
the export's threshold) and writes the submission CSV `id,rle_mask` atomically, and with --masks_dir one mask
PNG per image. Progress: a live bar on a terminal, a line every ~2048 images otherwise.

A cross-validation parent (--model_dir=<parent> of `python -m salt_tf.cv`, every fold finished) is a fold
ensemble, every fold weighing the same whatever its number of snapshots: when every fold has S models (its
snapshots, else its export/), member position k is the mean over the folds of each fold's k-th model (with
the TTA), else each fold's mean is a member. The parent's ensemble.json (`evaluate --model_dir=<parent>`)
combines the members (their mean, or the stacked meta-model over the positions) and post-processes, its gate
on the folds' mean image-head probability; without one, the mean at the threshold its oof.json chose on the
out-of-fold predictions (`cv collect`), with their TTA. --threshold overrides the threshold."""

EVALUATE_HELP = """\
Predicts the run's validation images (split.csv; the data folder --data_dir, else the run's own,
rundir.data_dir), prints one table of the competition metric (each model plain and with TTA, the mean, the
stacked meta-model cross-validated over images, and both after post-processing; see salt_tf.ensemble) and
writes <model_dir>/ensemble.json, which `submit` applies. Progress as in submit.

A cross-validation parent (--model_dir=<parent>) predicts nothing: its out-of-fold predictions (oof.npz of
`cv collect`: every labelled image, predicted with collect's TTA by the fold that validated on it) are the
evaluation set, so the table is a run's, on ALL labelled images: each member position (position k: the k-th
model of the image's fold), their mean, the stacked meta-model and post-processing with the image-head gate,
chosen by the same cross-validation over images; <parent>/ensemble.json is then what `submit
--model_dir=<parent>` applies. Only the fold mean is evaluated (and says why) when the folds differ in their
numbers of models or oof.npz is of before the per-model predictions (rerun `cv collect`)."""


# ---------------------------------------------------------------------------------------------------------
# Flags.


def _define_shared_flags(flag_values: flags.FlagValues, what: str, combine: bool) -> None:
    """The flags of both subcommands: the models (cli.define_model_flags) and --batch_size."""
    cli.define_model_flags(flag_values, what, combine, cv_parent=True)
    flags.DEFINE_integer("batch_size", 64, "Images per model call (each call runs batch x views images).",
                         lower_bound=1, flag_values=flag_values)


def define_submit_flags(flag_values: flags.FlagValues) -> None:
    """Registers the flags of `predict submit` in `flag_values`."""
    fv = dict(flag_values=flag_values)
    _define_shared_flags(flag_values, "", combine=True)
    flags.DEFINE_string("images", None, "Folder of 101x101 PNG images to predict (e.g. <data>/test/images).",
                        **fv)
    flags.DEFINE_string("output", None, "Submission CSV to write (id,rle_mask); never a file of --images or "
                        "the depths CSV.", **fv)
    flags.DEFINE_string("masks_dir", None, "Also write one mask PNG (0/255) per image into this folder (not the "
                        "--images folder).", **fv)
    flags.DEFINE_boolean("skip_bad", False, "Predict the readable PNGs instead of stopping at an unreadable one "
                         "(each listed with a warning); see --bad_as_empty for the submission rows of the others.",
                         **fv)
    flags.DEFINE_boolean("bad_as_empty", True, "With --skip_bad: give each unreadable image an empty mask in the "
                         "submission, which Kaggle accepts (it rejects a file with ids missing); "
                         "--nobad_as_empty leaves their rows out.", **fv)
    flags.DEFINE_string("depths", None, "CSV id,z for models trained with --use_depth (default: "
                        "<images>/../../depths.csv, the Kaggle layout).", **fv)


def define_evaluate_flags(flag_values: flags.FlagValues) -> None:
    """Registers the flags of `predict evaluate` in `flag_values`."""
    fv = dict(flag_values=flag_values)
    _define_shared_flags(flag_values, " to evaluate (the plain prediction, its identity view, is scored too)",
                         combine=False)
    flags.DEFINE_string("data_dir", None, "Labelled folder in the Kaggle layout (default: the folder the run "
                        "trained on, from its flags.cfg and record.json; not for a CV parent).", **fv)
    flags.DEFINE_enum("eval_ids", "val", ["val", "all"], "'val' = the validation ids of the run's split.csv "
                      "(out-of-sample); 'all' = every labelled image of --data_dir (only for a separate hold-out "
                      "folder).", **fv)
    flags.DEFINE_integer("folds", ensemble.DEFAULT_FOLDS, "Cross-validation folds over images.", lower_bound=2,
                         **fv)
    flags.DEFINE_float("stack_l2", ensemble.DEFAULT_L2, "L2 on the meta-model's weights.", lower_bound=0.0, **fv)
    flags.DEFINE_boolean("write_ensemble", True, "Write <model_dir>/ensemble.json (what submit applies).", **fv)


# ---------------------------------------------------------------------------------------------------------
# Output and progress.


def _say(message: str = "") -> None:
    print(message, flush=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _chunk(batch_size: int) -> int:
    """CHUNK_IMAGES rounded down to whole batches (at least one), so chunks split no batch."""
    return batch_size * max(1, CHUNK_IMAGES // batch_size)


def _progress(label: str, total: int, every: int) -> progress.Progress:
    """Images done of `total`, from now: a live bar on a terminal, else a line on stdout every `every` images."""
    display = progress.Progress(total, label=label, unit="image", every=every,
                                log=lambda fmt, *args: _say(fmt % args))
    display.update(0)
    return display


def _model_share(display: progress.Progress, start: int, count: int, model: int,
                 models: int) -> tta.ProgressCallback:
    """The progress callback of one model's pass over images [start, start + count) that each of `models` models
    predicts: an image counts 1/models per model, so the display moves during every pass (not only the last)
    and reaches start + count when the last model is done."""
    return lambda done, _: display.update(start + (model * count + done) // models)


def submission_text(ids: Sequence[str], masks: np.ndarray) -> str:
    """The Kaggle submission: header id,rle_mask and one row per image (column-major RLE, '' if empty)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "rle_mask"])
    for id_, mask in zip(ids, masks):
        writer.writerow([id_, kaggle.rle_encode(mask)])
    return out.getvalue()


def write_submission(path: str, ids: Sequence[str], masks: np.ndarray) -> None:
    """Writes the submission CSV atomically (rundir.write_text)."""
    rundir.write_text(path, submission_text(ids, masks))


def with_empty_masks(ids: Sequence[str], masks: np.ndarray, missing: Sequence[str]):
    """ids and masks with an empty mask for each id of `missing`, all in id order."""
    every = list(ids) + list(missing)
    order = sorted(range(len(every)), key=lambda i: every[i])
    filled = np.concatenate([masks, np.zeros((len(missing),) + masks.shape[1:], dtype=masks.dtype)])
    return [every[i] for i in order], filled[order]


# ---------------------------------------------------------------------------------------------------------
# submit.


def run_submit(fv: flags.FlagValues) -> int:
    """`predict submit`: the submission CSV (and mask PNGs) of --model_dir's models on the images of --images.

    Args:
        fv: the parsed flags of define_submit_flags.

    Returns:
        0; every problem a user can fix raises (PredictError, exports.ExportError, kaggle.DataError,
        flags.Error) before anything is written.
    """
    cli.require_model_dir(fv)
    _check_output(fv)
    # Cheap checks first (no TensorFlow): the models' configs, then every image.
    entries = exports.find_exports(fv.model_dir)
    chosen, views = _ensemble_and_views(fv, entries)
    ids, images, bad = kaggle.read_image_folder(fv.images, fv.skip_bad)
    for path, reason in bad:
        _warn(f"skipped {path}: {reason}")
    depths = _depths(fv, entries, ids)
    choice, how = _postprocessing(fv, entries, chosen)
    for entry in entries:
        exports.restore(entry)
    _say(tfstart.device_summary())
    _say(f"predict: {len(ids)} images of {fv.images}; {len(entries)} model(s) of {fv.model_dir} "
         f"({', '.join(e.name for e in entries)}); {how}; tta {'+'.join(views)}; {choice.describe()}")
    started = time.time()
    masks = _predict_masks(fv, entries, chosen, choice, views, ids, images, depths)
    _write_outputs(fv, ids, masks, bad, started)
    return 0


def _check_output(fv: flags.FlagValues) -> None:
    """--images and --output are given, and --output can be a new file."""
    if not fv.images or not fv.output:
        raise PredictError("--images and --output are required: the folder of PNG images to predict and the "
                           "submission CSV to write")
    output_parent = os.path.dirname(os.path.abspath(fv.output))
    if not os.path.isdir(output_parent):
        raise PredictError(f"--output={fv.output}: folder {output_parent} does not exist")
    if os.path.isdir(fv.output):
        raise PredictError(f"--output={fv.output}: is a folder; give a file name such as submission.csv")
    _check_not_an_input(fv)


def _check_not_an_input(fv: flags.FlagValues) -> None:
    """Refuses outputs that would overwrite an input: --masks_dir naming the --images folder (each mask <id>.png
    would replace image <id>.png); --output naming an existing file of the --images folder or the depths CSV.

    Raises:
        PredictError: one line naming the flag and the fix; nothing written.
    """
    images = os.path.realpath(fv.images)  # realpath: a symlink or ../ to the same folder counts as the same
    if fv.masks_dir and os.path.realpath(fv.masks_dir) == images:
        raise PredictError(f"--masks_dir={fv.masks_dir} is the --images folder: each mask <id>.png would overwrite "
                           "the image it was predicted from; give another folder, e.g. --masks_dir=masks")
    if not os.path.isfile(fv.output):
        return
    output = os.path.realpath(fv.output)
    if output.startswith(images + os.sep):
        raise PredictError(f"--output={fv.output} is a file of --images={fv.images}: the submission would "
                           "overwrite it; give a new file name outside that folder, e.g. --output=submission.csv")
    if output == os.path.realpath(fv.depths or kaggle.depths_file_of_images(fv.images)):
        raise PredictError(f"--output={fv.output} is the depths CSV of the images: the submission would overwrite "
                           "it; give a new file name, e.g. --output=submission.csv")


def _ensemble_and_views(fv: flags.FlagValues, entries: list[exports.LoadedModel]):
    """(the ensemble.json to apply or None, the TTA views): --tta if given, else ensemble.json's, else hflip."""
    chosen = None
    if fv.use_ensemble:  # a run's ensemble.json, or an evaluated export folder's own (e.g. <run>/swa)
        chosen = exports.load_ensemble(fv.model_dir, entries)
    views = tta.parse_tta(fv.tta)
    if chosen is not None:
        if not fv["tta"].present:
            views = tuple(chosen.tta)
        elif tuple(chosen.tta) != views:
            _warn(f"--tta={fv.tta} differs from the TTA ensemble.json was fitted with ({'+'.join(chosen.tta)})")
    return chosen, views


def _depths(fv: flags.FlagValues, entries: list[exports.LoadedModel], ids: Sequence[str]) -> np.ndarray:
    """float32 [N] depths of the images (NaN where none); the depths CSV is read only if a model uses depth."""
    depths = {}
    if any(e.use_depth for e in entries):
        depths = kaggle.image_folder_depths(fv.images, fv.depths, required=True)
    return kaggle.depth_array(depths, ids)


def _postprocessing(fv: flags.FlagValues, entries: list[exports.LoadedModel], chosen):
    """(the post-processing to apply, how the models are combined, in words); --threshold overrides."""
    folds = len(exports.fold_models(entries))
    combined = f"{folds} folds ({len(entries)} models)" if folds else f"{len(entries)}"
    if chosen is not None:
        choice = chosen.postprocessing
        source = chosen.scores.get("chosen_on", rundir.ENSEMBLE_FILE)
        how = f"{chosen.combine} ensemble of {combined} from {source}" if len(entries) > 1 \
            else f"post-processing from {source}"
    else:
        threshold = entries[0].config.get("threshold") if len(entries) == 1 else None
        choice = postprocess.PostProcessing(threshold=float(threshold if threshold is not None else 0.5))
        how = f"mean of {combined}" if len(entries) > 1 else "single model"
    if fv.threshold is not None:
        choice = dataclasses.replace(choice, threshold=float(fv.threshold))
    return choice, how


def _predict_masks(fv, entries, chosen, choice, views, ids, images, depths) -> np.ndarray:
    """The masks bool [N,101,101] of all images, chunk by chunk (_chunk): every model's TTA probabilities, as the
    ensemble's members (exports.predict_members: a CV parent's folds), combined (ensemble.json's way, else the
    mean) and post-processed; the chunk's mask PNGs with --masks_dir."""
    if fv.masks_dir:
        os.makedirs(fv.masks_dir, exist_ok=True)
    chunk = _chunk(fv.batch_size)
    display = _progress("predict", len(ids), every=chunk)
    masks = np.zeros((len(ids), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for start in range(0, len(ids), chunk):
        stop = min(start + chunk, len(ids))
        members, has_salt = exports.predict_members(
            entries, ids[start:stop], images[start:stop], depths[start:stop], views, fv.batch_size,
            progress=lambda m: _model_share(display, start, stop - start, m, len(entries)))  # used in this chunk only
        combined = chosen.combine_probabilities(members) if chosen is not None else np.mean(members, axis=0)
        masks[start:stop] = postprocess.apply(combined, choice, has_salt)
        if fv.masks_dir:
            for id_, mask in zip(ids[start:stop], masks[start:stop]):
                rundir.write_png(os.path.join(fv.masks_dir, f"{id_}.png"), mask.astype(np.uint8) * 255)
    return masks


def _write_outputs(fv: flags.FlagValues, ids: list[str], masks: np.ndarray, bad: list, started: float) -> None:
    """Writes the submission (bad files as empty masks with --bad_as_empty) and says what was written."""
    if bad and fv.bad_as_empty:  # one row per image of the folder, in id order, as without bad files
        ids, masks = with_empty_masks(ids, masks, [os.path.splitext(os.path.basename(p))[0] for p, _ in bad])
    write_submission(fv.output, ids, masks)
    elapsed = time.time() - started
    with_salt = int(masks.reshape(len(ids), -1).any(axis=1).sum())
    _say(f"wrote {fv.output}: {len(ids)} images ({with_salt} with salt) in {elapsed:.1f} s, "
         f"{len(ids) / max(elapsed, 1e-9):.1f} images/s" + (f"; masks in {fv.masks_dir}" if fv.masks_dir else ""))
    if bad:
        names = ", ".join(os.path.basename(p) for p, _ in bad)
        _warn(f"--skip_bad: {len(bad)} unreadable file(s) written as empty masks in {fv.output}: {names}"
              if fv.bad_as_empty else
              f"--skip_bad --nobad_as_empty: {len(bad)} unreadable file(s) left out of {fv.output}, which Kaggle "
              f"rejects (every test id needs a row): {names}")


# ---------------------------------------------------------------------------------------------------------
# evaluate.


def run_evaluate(fv: flags.FlagValues) -> int:
    """`predict evaluate`: the table of --model_dir's models on the run's validation images, and ensemble.json.

    Args:
        fv: the parsed flags of define_evaluate_flags.

    Returns:
        0; every problem a user can fix raises (PredictError, exports.ExportError, kaggle.DataError,
        flags.Error) before anything is written.
    """
    cli.require_model_dir(fv)
    if rundir.is_cv_parent(fv.model_dir):
        return _evaluate_out_of_fold(fv)
    tfstart.import_tensorflow()  # before pipeline imports it
    # A run directory, or one export folder inside a run (its swa/, export/ or a snapshot): then the run's split
    # and data are used and ensemble.json goes into the export folder, where submit finds it.
    target = fv.model_dir
    run_dir = rundir.source_run_dir(target) if rundir.is_export(target) else target
    entries = _evaluated_models(target, run_dir)
    views = tta.parse_tta(fv.tta)
    data, data_dir, which = _evaluation_data(fv, run_dir)
    for entry in entries:
        exports.restore(entry)
    _say(tfstart.device_summary())
    _say(f"evaluate: {len(entries)} model(s) of {run_dir} ({', '.join(e.name for e in entries)}) on "
         f"{len(data.ids)} images ({which}) of {data_dir}; tta {'+'.join(views)}; {fv.folds}-fold CV over images")
    started = time.time()
    predictions = _predict_validation(fv, entries, data, views)
    chosen = _report_evaluation(fv, entries, data, views, predictions, started, time.time() - started)
    _save_choice(fv, target, chosen)
    return 0


def _save_choice(fv: flags.FlagValues, target: str, chosen: ensemble.Ensemble) -> None:
    """Writes <target>/ensemble.json (unless --nowrite_ensemble), where submit finds it."""
    if fv.write_ensemble:
        path = os.path.join(target, rundir.ENSEMBLE_FILE)
        chosen.save(path)
        _say(f"wrote {path}")


def _evaluate_out_of_fold(fv: flags.FlagValues) -> int:
    """`predict evaluate` of a CV parent: the fold ensemble chosen on its out-of-fold predictions (oof.npz), all
    labelled images, as a run's on its validation images (each member position, the mean, the stacked
    meta-model, post-processing with the image-head gate), no image predicted (and no TensorFlow).

    Args:
        fv: the parsed flags of define_evaluate_flags; --model_dir is a CV parent.

    Returns:
        0; a parent with a fold missing or unfinished, without oof.npz/oof.json or with ones from other fold
        models, or a flag that cannot apply, raises (one line naming the fix) before anything is written.
    """
    parent = fv.model_dir
    for name in ("data_dir", "eval_ids"):
        if fv[name].present:
            raise PredictError(f"--{name}: a CV parent is evaluated on its out-of-fold predictions "
                               f"({rundir.OOF_FILE}: every labelled image); drop --{name}")
    entries = exports.find_exports(parent)
    arrays, summary = exports.load_out_of_fold(parent, entries)
    views = _out_of_fold_views(fv, summary)
    truth, has_salt = arrays["masks"].astype(bool), arrays.get("has_salt")
    probabilities, names, what = _out_of_fold_members(parent, arrays, entries)
    folds = len(exports.fold_models(entries))
    _say(f"evaluate: the out-of-fold predictions of {parent} ({rundir.OOF_FILE}): {len(truth)} images, each "
         f"predicted by the one of {folds} folds ({len(entries)} models) that validated on it; tta "
         f"{'+'.join(views)}; {fv.folds}-fold CV over images; {what}; {_out_of_fold_gate(parent, has_salt, entries)}")
    started = time.time()
    rows, chosen = ensemble.evaluate(truth, probabilities, names, tta=views, folds=fv.folds, l2=fv.stack_l2,
                                     model_info=[e.info() for e in entries], has_salt=has_salt)
    _report_head(truth, has_salt, "the mean of the models of each image's fold")
    combination = f"the mean of {folds} folds" if "member_probabilities" not in arrays else \
        f"{chosen.combine} of {len(names)} member position(s)"
    _report_choice(rows, chosen, combination, names, truth, views, list(probabilities),
                   f"{time.time() - started:.1f} s")
    _save_choice(fv, parent, chosen)
    return 0


def _out_of_fold_views(fv: flags.FlagValues, summary: dict) -> tuple[str, ...]:
    """The TTA of a CV parent's out-of-fold predictions (oof.json's); PredictError (one line) for another --tta."""
    parent = fv.model_dir
    views = tuple(summary["tta"])
    if fv["tta"].present and tta.parse_tta(fv.tta) != views:
        raise PredictError(f"--tta={fv.tta}: the out-of-fold predictions of {parent} are of tta "
                           f"{ensemble.views_label(views)}; rerun python -m salt_tf.cv collect --parent={parent} "
                           f"--tta={fv.tta}, or drop --tta")
    return views


def _out_of_fold_members(parent: str, arrays: dict, entries: list[exports.LoadedModel]):
    """(probabilities [M,N,101,101] float32, their M names, what is evaluated in words) of oof.npz: each member
    position (exports.member_names) when it holds member_probabilities, else the fold mean alone (M = 1), the
    words saying why."""
    if "member_probabilities" in arrays:
        names = exports.member_names(entries)
        stacked = "their stacked meta-model" if len(names) > 1 else "no stacking with one model per fold"
        return (arrays["member_probabilities"].astype(np.float32), names,
                f"{len(names)} member position(s) (position k: the k-th model of the image's fold), their mean, "
                f"{stacked}")
    why = (f"the folds have different numbers of models ({len(entries)} in {len(exports.fold_models(entries))} "
           "folds), so there are no member positions to stack" if exports.positions(entries) is None else
           f"{rundir.OOF_FILE} holds no per-model out-of-fold predictions (collected before they were stored: "
           f"rerun python -m salt_tf.cv collect --parent={parent} to stack them)")
    return arrays["probabilities"][None].astype(np.float32), ["out-of-fold"], f"the fold mean only: {why}"


def _out_of_fold_gate(parent: str, has_salt: np.ndarray | None, entries: list[exports.LoadedModel]) -> str:
    """Whether the post-processing may gate on the image head, in words (why not, if not)."""
    if has_salt is not None:
        return "the post-processing may gate on the image head"
    if not any(e.config["model"].get("deep_supervision") for e in entries):
        return "no image-head gate (the models have no image head)"
    return (f"no image-head gate: {rundir.OOF_FILE} holds no image-head probabilities (rerun python -m "
            f"salt_tf.cv collect --parent={parent})")


def _evaluated_models(target: str, run_dir: str) -> list[exports.LoadedModel]:
    """The models of --model_dir, which must be a run directory or an export folder inside one."""
    if not os.path.isfile(os.path.join(run_dir, rundir.SPLIT_FILE)):
        raise PredictError(f"{target}: evaluate needs a run directory (with split.csv and export/ or "
                           "snapshots/) or an export folder inside one")
    return exports.find_exports(target)


def _evaluation_data(fv: flags.FlagValues, run_dir: str):
    """(the labelled images to evaluate on, their folder, which ids in words): --eval_ids of --data_dir, else of
    the folder the run trained on."""
    from salt_tf.data import splits

    try:
        data_dir = fv.data_dir or rundir.data_dir(run_dir)
    except rundir.RunDirError as e:
        raise PredictError(str(e)) from None
    if fv.eval_ids == "val":
        split_path = os.path.join(run_dir, rundir.SPLIT_FILE)
        split = splits.read_split(split_path)
        if "role" not in split.columns:
            raise PredictError(f"{split_path}: no role column (train/val)")
        ids = list(split.loc[split["role"] == "val", "id"])
        which = "validation ids of split.csv"
    else:
        ids, which = None, "all labelled images"
    data = kaggle.load_labelled(data_dir, ids)
    _warn_if_other_data(run_dir, data_dir)
    return data, data_dir, which


def _warn_if_other_data(run_dir: str, data_dir: str) -> None:
    """Warns when the labelled images of data_dir are not those the run trained on (the data fingerprint in its
    record.json): same ids, other pixels or masks, and the scores are not the run's validation scores. Runs
    that skipped bad examples (--nostrict) fingerprinted fewer ids: not compared."""
    path = os.path.join(run_dir, rundir.RECORD_FILE)
    recorded = (rundir.read_json(path).get("data") or {}) if os.path.isfile(path) else {}
    expected = recorded.get("labelled_fingerprint") or recorded.get("fingerprint")
    if not expected or recorded.get("skipped_examples"):
        return
    if kaggle.fingerprint(data_dir, kaggle.train_ids(data_dir)) != expected:
        _warn(f"{data_dir} holds other images or masks than the run in {run_dir} trained on (its data fingerprint "
              f"in {rundir.RECORD_FILE} differs): these scores are not its validation scores")


def _predict_validation(fv: flags.FlagValues, entries: list[exports.LoadedModel], data: kaggle.LabelledSet,
                        views: Sequence[str]):
    """([plain], [TTA], [image head or None]) predictions of the evaluation images, one per model, with one
    progress display over all models."""
    from salt_tf import pipeline

    display = _progress("evaluate", len(data.ids), every=_chunk(fv.batch_size))
    plain, with_tta, heads, inputs = [], [], [], {}
    for m, entry in enumerate(entries):
        if entry.use_depth not in inputs:
            inputs[entry.use_depth] = pipeline.to_arrays(data, entry.use_depth)[0]
        p, t, h = tta.predict_plain_and_tta(entry.model, inputs[entry.use_depth], fv.batch_size, views,
                                            progress=_model_share(display, 0, len(data.ids), m, len(entries)))
        plain.append(p)
        with_tta.append(t)
        heads.append(h)
    return plain, with_tta, heads


def _report_evaluation(fv, entries, data, views, predictions, started: float, predicted: float) -> ensemble.Ensemble:
    """Chooses the ensemble and prints the image head's scores, the table, the choice and the breakdown; returns
    the choice. `predictions`: (plain, with_tta, heads) of _predict_validation; `predicted`: seconds spent
    predicting."""
    plain, with_tta, heads = predictions
    names = [e.name for e in entries]
    has_salt = tta.mean_head(heads)
    rows, chosen = ensemble.evaluate(data.masks, np.stack(with_tta), names, np.stack(plain), tta=views,
                                     folds=fv.folds, l2=fv.stack_l2, model_info=[e.info() for e in entries],
                                     has_salt=has_salt)
    _report_head(data.masks, has_salt, f"mean of {sum(h is not None for h in heads)} model(s)")
    _report_choice(rows, chosen, f"{chosen.combine} of {len(entries)}", names, data.masks, views, with_tta,
                   f"{len(data.ids) / max(predicted, 1e-9):.1f} images/s predicted, {time.time() - started:.1f} s "
                   "in all")
    return chosen


def _report_head(truth: np.ndarray, has_salt: np.ndarray | None, what: str) -> None:
    """Prints the image head's accuracy and AUC on the evaluation images (nothing without a head); `what`:
    whose head probability it is, in words."""
    if has_salt is None:
        return
    truth_has_salt = np.asarray(truth).reshape(len(truth), -1).any(axis=1)
    _say(f"image head ({what}): accuracy {np.mean((has_salt > 0.5) == truth_has_salt):.4f} at 0.5, AUC "
         f"{metrics.roc_auc(truth_has_salt, has_salt):.4f}; the cv post-processing may gate on it")


def _report_choice(rows: list[ensemble.Row], chosen: ensemble.Ensemble, what: str, names: list[str],
                   truth: np.ndarray, views: Sequence[str], with_tta: list, timing: str) -> None:
    """Prints the evaluation table, the choice (`what`: the combination in words) with its timing, and where
    the points are lost (_report_breakdown)."""
    _say(ensemble.format_table(rows))
    _say(f"@0.50: threshold 0.5.  tuned/thr: best threshold on these same images (optimistic).  cv: threshold, "
         f"meta-model and post-processing fitted on {chosen.scores['folds'] - 1} folds of the images, scored on "
         "the held-out fold.")
    cv = chosen.scores["cv_chosen"]
    weights = ""
    if chosen.stacker is not None:
        weights = "; weights " + ", ".join(f"{n} {w:+.3f}" for n, w in zip(names, chosen.stacker.weights)) + \
            f", bias {chosen.stacker.bias:+.3f}"
    _say(f"chosen: {what} + postprocessing ({chosen.postprocessing.describe()}), cv {cv:.4f}{weights}  [{timing}]")
    _report_breakdown(names, truth, views, with_tta, chosen)


def _report_breakdown(names: list[str], truth: np.ndarray, views: Sequence[str], with_tta: list,
                      chosen: ensemble.Ensemble) -> None:
    """Prints where the points are lost per model (and their mean), and the choice against the best single."""
    shown = ensemble.views_label(views)
    label = "plain" if shown == "none" else f"tta {shown}"
    named = [(f"{name} ({label})", ensemble.error_breakdown(truth, p > 0.5, p)) for name, p in zip(names, with_tta)]
    if len(names) > 1:
        mean = np.mean(with_tta, 0)
        named.append((f"mean of {len(names)} ({label})", ensemble.error_breakdown(truth, mean > 0.5, mean)))
    _say("where the points are lost, at threshold 0.5 (score per coverage group; images without salt that got "
         "some; images with salt that got none; the score with no salt on images without any; missed images that "
         "score at some lower threshold, and the score if each got its best: the most a threshold rule can win "
         "back on them):")
    _say(ensemble.format_breakdown(named))
    versus = chosen.scores["vs_best_single"]
    _say(f"vs the best single model by cv, {versus['model']} ({versus['cv']:.4f}): {versus['difference']:+.4f} "
         f"(95% interval {versus['ci95'][0]:+.4f} .. {versus['ci95'][1]:+.4f}, paired bootstrap over the "
         f"{len(truth)} images)")


# ---------------------------------------------------------------------------------------------------------
# The command line.

_EVALUATE_FLAG = re.compile(r"^--?(no)?evaluate(?:=(.*))?$")


def old_form(argv: list[str]) -> str | None:
    """The one line for a command line of before the subcommands (flags only; `--evaluate` for the evaluation):
    the same command in the new form. None when argv is not such a command line."""
    if not argv[1].startswith("-"):
        return None
    evaluate, rest = False, []
    for arg in argv[1:]:
        match = _EVALUATE_FLAG.match(arg)
        if match:  # absl's boolean forms: --evaluate, --noevaluate, --evaluate=true|false|1|0|t|f
            evaluate = not match.group(1) and (match.group(2) or "true").lower() in ("true", "t", "1")
        else:
            rest.append(arg)
    command = " ".join(["python -m salt_tf.predict", "evaluate" if evaluate else "submit", shlex.join(rest)])
    return (f"salt_tf.predict: the command is now `{command.strip()}` (a subcommand first: submit predicts a "
            "folder, evaluate replaces --evaluate)")


PROGRAM = cli.Program(
    module="salt_tf.predict",
    overview=__doc__.split("\n\n")[0],
    commands=(
        cli.Subcommand("submit", "predict a folder of images: the submission CSV (and mask PNGs)",
                       "--model_dir=<run | export | CV parent> --images=DIR --output=submission.csv "
                       "[--flag=value ...]",
                       define_submit_flags, run_submit, description=SUBMIT_HELP),
        cli.Subcommand("evaluate", "score the run's models on its validation images (a CV parent: its out-of-fold "
                                   "predictions): the table and ensemble.json",
                       "--model_dir=<run | export | CV parent> [--flag=value ...]", define_evaluate_flags,
                       run_evaluate,
                       description=EVALUATE_HELP),
    ),
    user_errors=(PredictError, exports.ExportError, kaggle.DataError),
    writes=True,
    old_form=old_form,
)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 2 bad flags/data/model, 1 a failing write)."""
    return cli.main(PROGRAM, sys.argv if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())  # TensorFlow is first imported by exports.restore(), through tfstart
