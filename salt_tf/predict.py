"""Prediction: test-time augmentation, exported models, ensembles, the Kaggle submission, and evaluation.

    python -m salt_tf.predict --model_dir=runs/a --images=/data/tgs/test/images --output=submission.csv
    python -m salt_tf.predict --model_dir=runs/a --evaluate        # table + <run>/ensemble.json
    python -m salt_tf.predict --model_dir=runs/a/swa --evaluate    # one export of the run: <run>/swa/ensemble.json

`--model_dir` is a run directory (its snapshots if it made any, else its export/) or one export folder.
Predict mode reads every PNG of `--images` first (an unreadable file stops it with one line naming the
file, before anything is written; `--skip_bad` predicts the others, lists the bad ones and gives them empty
masks in the submission, or leaves their rows out with `--nobad_as_empty`), predicts them in
batches with TTA, combines the models (the run's `ensemble.json` if `--evaluate` wrote one: mean or stacked
meta-model plus post-processing; else the mean and the export's threshold) and writes the submission CSV
`id,rle_mask` atomically, and with `--masks_dir` one mask PNG per image.

Evaluate mode predicts the run's validation images (split.csv; the data folder --data_dir, else the run's
own, rundir.data_dir), prints one table of the competition metric (each model plain and with TTA, the mean,
the stacked meta-model cross-validated over images, and both after post-processing; see `salt_tf.ensemble`)
and writes `<run>/ensemble.json` for predict mode.

TTA (`predict_probabilities`): per batch ONE compiled function stacks the views (identity, horizontal flip,
optionally vertical flip) along the batch axis, runs the model once in inference mode, un-flips each view's
probabilities and averages them.

Flags live in this module's own `FlagValues` (`PREDICT_FLAGS`), not in absl's global `FLAGS`: absl refuses
to define a flag name twice in one FlagValues (DuplicateFlagError) and the train flags (salt_tf.flags)
already own `--model_dir`, `--batch_size` and `--data_dir` there; with a separate registry both modules can
be imported in one process and keep the natural names.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
import time
import weakref
from typing import Callable, Sequence

import numpy as np
from absl import flags

from salt_tf import IMAGE_SIZE, ensemble, metrics, postprocess, rundir, tfstart
from salt_tf.data import kaggle

PREDICT_FLAGS = flags.FlagValues()

VIEWS = ("none", "hflip", "vflip")   # identity, left-right mirror, up-down mirror (in this order)
DEFAULT_TTA = ("none", "hflip")      # seismic images are not vertically symmetric: no vflip by default


class PredictError(ValueError):
    """A problem with the user's model folder or flags; the message is one line naming the path or flag."""


def define_model_flags(flag_values: flags.FlagValues, what: str = "") -> None:
    """The flags that choose the models and how they are combined, shared by predict and serving: --model_dir,
    --tta, --threshold, --use_ensemble. `what` ends the --tta help (e.g. " in the graph")."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("model_dir", None, "A run directory (its snapshots if any, else its export/) or one "
                        "export folder (model.json + weights).", **fv)
    flags.DEFINE_string("tta", "hflip", f"Test-time augmentation{what}: 'none', or views averaged with the "
                        "identity from hflip,vflip. Default: the TTA of the run's ensemble.json, else hflip.", **fv)
    flags.DEFINE_float("threshold", None, "Probability threshold; overrides ensemble.json and the export's "
                       "validation threshold.", lower_bound=0.0, upper_bound=0.999, **fv)
    flags.DEFINE_boolean("use_ensemble", True, "Use <model_dir>/ensemble.json (written by --evaluate) when "
                         "present: its combination, threshold and TTA.", **fv)


def define_flags(flag_values: flags.FlagValues = PREDICT_FLAGS) -> None:
    """Registers the predict flags in `flag_values` (idempotent)."""
    if "tta" in flag_values:
        return
    fv = dict(flag_values=flag_values)
    define_model_flags(flag_values)
    flags.DEFINE_string("images", None, "Folder of 101x101 PNG images to predict (e.g. <data>/test/images).",
                        **fv)
    flags.DEFINE_string("output", None, "Submission CSV to write (id,rle_mask).", **fv)
    flags.DEFINE_string("masks_dir", None, "Also write one mask PNG (0/255) per image into this folder.", **fv)
    flags.DEFINE_integer("batch_size", 64, "Images per model call (each call runs batch x views images).",
                         lower_bound=1, **fv)
    flags.DEFINE_boolean("skip_bad", False, "Predict the readable PNGs instead of stopping at an unreadable one "
                         "(each listed with a warning); see --bad_as_empty for the submission rows of the others.",
                         **fv)
    flags.DEFINE_boolean("bad_as_empty", True, "With --skip_bad: give each unreadable image an empty mask in the "
                         "submission, which Kaggle accepts (it rejects a file with ids missing); "
                         "--nobad_as_empty leaves their rows out.", **fv)
    flags.DEFINE_string("depths", None, "CSV id,z for models trained with --use_depth (default: "
                        "<images>/../../depths.csv, the Kaggle layout).", **fv)
    flags.DEFINE_boolean("evaluate", False, "Evaluate the run's models on labelled images, print the table and "
                         "write <model_dir>/ensemble.json, instead of predicting --images.", **fv)
    flags.DEFINE_string("data_dir", None, "--evaluate: labelled folder in the Kaggle layout (default: the "
                        "folder the run trained on, from its flags.cfg and record.json).", **fv)
    flags.DEFINE_enum("eval_ids", "val", ["val", "all"], "--evaluate: 'val' = the validation ids of the run's "
                      "split.csv (out-of-sample); 'all' = every labelled image of --data_dir (only for a "
                      "separate hold-out folder).", **fv)
    flags.DEFINE_integer("folds", ensemble.DEFAULT_FOLDS, "--evaluate: cross-validation folds over images.",
                         lower_bound=2, **fv)
    flags.DEFINE_float("stack_l2", ensemble.DEFAULT_L2, "--evaluate: L2 on the meta-model's weights.",
                       lower_bound=0.0, **fv)
    flags.DEFINE_boolean("write_ensemble", True, "--evaluate: write <model_dir>/ensemble.json.", **fv)


def parse_tta(text: str) -> tuple[str, ...]:
    """'hflip' -> ('none', 'hflip'); 'none' -> ('none',); 'hflip,vflip' -> all three views."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    unknown = [n for n in names if n not in VIEWS]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise PredictError(f"--tta={text}: expected 'none' or a comma list of hflip, vflip")
    return tuple(v for v in VIEWS if v == "none" or v in names)


# ---------------------------------------------------------------------------------------------------------
# Test-time augmentation.

_TTA_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _flip(t, view: str):
    """The view's flip of [B, H, W, ...]; each flip is its own inverse."""
    import tensorflow as tf

    if view == "hflip":
        return tf.reverse(t, axis=[2])
    if view == "vflip":
        return tf.reverse(t, axis=[1])
    return t


def tta_function(model, views: Sequence[str], channels: int):
    """The compiled TTA function of `model` for `views`: x [B,101,101,C] -> (mean probability [B,101,101],
    first view's probability [B,101,101], mean image-head salt probability [B] — NaN without a head). One
    trace per (model, views, channels), any batch size."""
    import tensorflow as tf

    from salt_tf import model as model_lib

    views = tuple(views)
    if not views or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
        raise ValueError(f"views must be distinct names from {VIEWS}, got {views}")
    cache = _TTA_FUNCTIONS.setdefault(model, {})
    key = (views, int(channels))
    if key not in cache:
        # The function refers to the model weakly: a strong reference from the cached value would keep the
        # WeakKeyDictionary's key (the model) alive forever.
        model_ref = weakref.ref(model)

        @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, channels], tf.float32)])
        def run(x):
            batch = tf.shape(x)[0]
            stacked = tf.concat([_flip(x, v) for v in views], axis=0)          # [V*B, H, W, C]
            outputs = model_lib.outputs_of(model_ref(), stacked, training=False)
            p = tf.sigmoid(tf.cast(outputs["mask"], tf.float32))[..., 0]      # [V*B, H, W]
            p = tf.reshape(p, [len(views), batch, tf.shape(p)[1], tf.shape(p)[2]])
            unflipped = [_flip(p[i], v) for i, v in enumerate(views)]
            if "has_salt" in outputs:
                has_salt = tf.reduce_mean(tf.reshape(tf.sigmoid(outputs["has_salt"]), [len(views), batch]), axis=0)
            else:
                has_salt = tf.fill([batch], float("nan"))
            return tf.add_n(unflipped) / float(len(views)), unflipped[0], has_salt

        cache[key] = run
    return cache[key]


def _predict(model, images: np.ndarray, batch_size: int, tta: Sequence[str], want_first: bool,
             progress: Callable[[int, int], None] | None = None):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must be [N, {IMAGE_SIZE}, {IMAGE_SIZE}, C], got {images.shape}")
    run = tta_function(model, tta, images.shape[-1])
    n = len(images)
    mean = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    first = np.empty_like(mean) if want_first else None
    has_salt = np.empty(n, np.float32)
    for start in range(0, n, batch_size):
        m, f, h = run(images[start:start + batch_size])
        mean[start:start + batch_size] = m.numpy()
        has_salt[start:start + batch_size] = h.numpy()
        if want_first:
            first[start:start + batch_size] = f.numpy()
        if progress:
            progress(min(start + batch_size, n), n)
    return mean, first, (None if np.isnan(has_salt).all() else has_salt)


def predict_probabilities(model, images: np.ndarray, batch_size: int = 64,
                          tta: Sequence[str] = DEFAULT_TTA, progress=None) -> np.ndarray:
    """Salt probabilities float32 [N,101,101] of model inputs [N,101,101,C], averaged over the `tta` views
    ("none", "hflip", "vflip"), each un-flipped before averaging."""
    return _predict(model, images, batch_size, tta, False, progress)[0]


def predict_with_head(model, images: np.ndarray, batch_size: int = 64,
                      tta: Sequence[str] = DEFAULT_TTA) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities [N,101,101] as predict_probabilities, the image head's salt probability [N] averaged over
    the same views — None for a model without a head) from one pass."""
    mean, _, has_salt = _predict(model, images, batch_size, tta, False)
    return mean, has_salt


def predict_plain_and_tta(model, images: np.ndarray, batch_size: int = 64,
                          tta: Sequence[str] = DEFAULT_TTA) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(plain, TTA) probabilities from one pass: the plain prediction is the identity view of the TTA; and the
    image head's TTA salt probability [N] (None without a head)."""
    if tta[0] != "none":
        raise ValueError("the first view must be 'none' to read the plain prediction off the TTA pass")
    mean, first, has_salt = _predict(model, images, batch_size, tta, True)
    return first, mean, has_salt


def mean_head(heads: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The mean salt probability [N] of the models that have an image head (None if none has)."""
    present = [h for h in heads if h is not None]
    return np.mean(present, axis=0) if present else None


# ---------------------------------------------------------------------------------------------------------
# Exported models.


@dataclasses.dataclass
class LoadedModel:
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
    path = os.path.join(export_dir, rundir.EXPORT_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise PredictError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise PredictError(f"{path}: not valid JSON ({e}); re-export the model") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise PredictError(f"{path}: no 'model' configuration; not a salt_tf export")
    return config


def find_exports(path: str) -> list[LoadedModel]:
    """The models `path` stands for (rundir.export_dirs: an export folder itself, else a run directory's
    snapshots in order if any, else its export/), configs read but no weights (no TensorFlow needed). A
    model's name is its folder relative to the run directory ("export", "snapshots/snapshot-3"), or the
    export folder's own name."""
    try:
        dirs = rundir.export_dirs(path)
    except rundir.RunDirError as e:
        raise PredictError(str(e)) from None
    if rundir.is_export(path):  # an export folder itself
        return [LoadedModel(os.path.basename(os.path.normpath(path)), path, _read_config(path))]
    return [LoadedModel(os.path.relpath(d, path), d, _read_config(d)) for d in dirs]


def restore(entry: LoadedModel) -> LoadedModel:
    """Builds the model of an export's config and restores its weights into it."""
    tf = tfstart.import_tensorflow()  # the first TensorFlow import of a command: no CUDA noise on a CPU

    from salt_tf import checkpoints, model as model_lib

    config_path = os.path.join(entry.path, rundir.EXPORT_CONFIG)
    try:
        model = model_lib.build_model(model_lib.ModelConfig(**entry.config["model"]))
    except (TypeError, ValueError) as e:
        raise PredictError(f"{config_path}: bad model configuration ({e})") from None
    try:
        checkpoints.restore_exported_weights(entry.path, model)
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        detail = (getattr(e, "message", None) or str(e) or type(e).__name__).strip().splitlines()[0]
        raise PredictError(f"{entry.path}: cannot restore the exported weights ({detail}); the export is "
                           "incomplete or belongs to another model configuration") from None
    entry.model = model
    return entry


def load_models(path: str) -> list[LoadedModel]:
    """The models `path` stands for (see find_exports), built and with their weights restored."""
    return [restore(entry) for entry in find_exports(path)]


# ---------------------------------------------------------------------------------------------------------
# Images in, submission out.


def read_image_folder(directory: str, skip_bad: bool = False):
    """(ids, images uint8 [N,101,101], bad [(path, reason)]) of every PNG in `directory`, sorted by id.

    Every file is read before anything else happens: without skip_bad, an unreadable one raises DataError
    naming it (and how many are bad); with skip_bad they are left out and returned in `bad`.
    """
    ids = kaggle.list_images(directory)
    if not ids:
        raise kaggle.DataError(f"{directory}: no PNG images")
    names = {os.path.splitext(n)[0]: n for n in os.listdir(directory) if n.lower().endswith(".png")}
    kept, images, bad = [], [], []
    for id_ in ids:
        path = os.path.join(directory, names[id_])
        try:
            images.append(kaggle.read_png(path, kind="image"))
            kept.append(id_)
        except kaggle.DataError as e:
            bad.append((path, str(e)))
    if bad and not skip_bad:
        extra = f"; {len(bad)} of {len(ids)} files are unreadable" if len(bad) > 1 else ""
        raise kaggle.DataError(f"{bad[0][1]}{extra} (--skip_bad predicts the others)")
    if not kept:
        raise kaggle.DataError(f"{directory}: none of the {len(ids)} PNG files is readable")
    return kept, np.stack(images), bad


def read_depths_csv(path: str) -> dict[str, float]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        return dict(zip(frame["id"].str.strip(), frame["z"].astype(float)))
    except FileNotFoundError:
        raise kaggle.DataError(f"{path}: file not found; pass --depths=<depths.csv> for a --use_depth model") \
            from None
    except (KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise kaggle.DataError(f"{path}: not a depths CSV with columns id,z ({e})") from None


def model_inputs(ids: Sequence[str], images: np.ndarray, use_depth: bool,
                 depths: dict[str, float] | None = None) -> np.ndarray:
    """Model inputs [N,101,101,C] of uint8 images, prepared exactly as in training (pipeline.to_arrays)."""
    from salt_tf import pipeline

    z = np.array([np.nan if depths is None else depths.get(i, np.nan) for i in ids], dtype=np.float32)
    # to_arrays also converts masks; these placeholders are never used.
    labelled = kaggle.LabelledSet(np.asarray(ids, dtype=object), images, np.zeros((len(ids), 1, 1), np.uint8), z)
    try:
        return pipeline.to_arrays(labelled, use_depth)[0]
    except ValueError as e:
        raise kaggle.DataError(str(e)) from None


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


# ---------------------------------------------------------------------------------------------------------
# The two commands.


def _say(message: str = "") -> None:
    print(message, flush=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_ensemble(run_dir: str, entries: list[LoadedModel]) -> ensemble.Ensemble | None:
    """The ensemble.json of `run_dir` (None if it has none), checked against the models it was fitted on.

    Args:
        run_dir: a run directory or an export folder (as --model_dir).
        entries: its models (find_exports), in order.

    Returns:
        The saved choice, or None.

    Raises:
        PredictError: unreadable, or fitted on other models (one line naming both lists).
    """
    path = os.path.join(run_dir, rundir.ENSEMBLE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        chosen = ensemble.Ensemble.load(path)
    except ValueError as e:
        raise PredictError(str(e)) from None
    fitted = [(m.get("name"), m.get("epoch")) for m in chosen.models]
    now = [(e.name, e.config.get("epoch")) for e in entries]
    if fitted != now:
        raise PredictError(
            f"{path}: fitted on models {', '.join(f'{n} (epoch {e})' for n, e in fitted)} but {run_dir} now has "
            f"{', '.join(f'{n} (epoch {e})' for n, e in now)}; rerun with --evaluate, or pass --nouse_ensemble")
    return chosen


def run_predict(fv: flags.FlagValues) -> int:
    if not fv.images or not fv.output:
        raise PredictError("--images and --output are required (or pass --evaluate)")
    output_parent = os.path.dirname(os.path.abspath(fv.output))
    if not os.path.isdir(output_parent):
        raise PredictError(f"--output={fv.output}: folder {output_parent} does not exist")
    if os.path.isdir(fv.output):
        raise PredictError(f"--output={fv.output}: is a folder; give a file name such as submission.csv")

    # Cheap checks first (no TensorFlow): the models' configs, then every image.
    entries = find_exports(fv.model_dir)
    chosen = None
    if fv.use_ensemble:  # a run's ensemble.json, or an evaluated export folder's own (e.g. <run>/swa)
        chosen = load_ensemble(fv.model_dir, entries)
    tta = parse_tta(fv.tta)
    if chosen is not None:
        if not fv["tta"].present:
            tta = tuple(chosen.tta)
        elif tuple(chosen.tta) != tta:
            _warn(f"--tta={fv.tta} differs from the TTA ensemble.json was fitted with ({'+'.join(chosen.tta)})")
    ids, images, bad = read_image_folder(fv.images, fv.skip_bad)
    for path, reason in bad:
        _warn(f"skipped {path}: {reason}")
    depths = None
    if any(e.use_depth for e in entries):
        depths_path = fv.depths or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fv.images))),
                                                "depths.csv")
        depths = read_depths_csv(depths_path)

    if chosen is not None:
        choice = chosen.postprocessing
        how = f"{chosen.combine} ensemble of {len(entries)} from {rundir.ENSEMBLE_FILE}" if len(entries) > 1 \
            else f"post-processing from {rundir.ENSEMBLE_FILE}"
    else:
        threshold = entries[0].config.get("threshold") if len(entries) == 1 else None
        choice = postprocess.PostProcessing(threshold=float(threshold if threshold is not None else 0.5))
        how = "mean of the models" if len(entries) > 1 else "single model"
    if fv.threshold is not None:
        choice = dataclasses.replace(choice, threshold=float(fv.threshold))

    for entry in entries:
        restore(entry)
    _say(tfstart.device_summary())
    _say(f"predict: {len(ids)} images of {fv.images}; {len(entries)} model(s) of {fv.model_dir} "
         f"({', '.join(e.name for e in entries)}); {how}; tta {'+'.join(tta)}; {choice.describe()}")
    if fv.masks_dir:
        os.makedirs(fv.masks_dir, exist_ok=True)

    started = time.time()
    chunk = fv.batch_size * max(1, 2048 // fv.batch_size)
    masks = np.zeros((len(ids), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for start in range(0, len(ids), chunk):
        stop = min(start + chunk, len(ids))
        inputs = {}
        probabilities, heads = [], []
        for entry in entries:
            if entry.use_depth not in inputs:
                inputs[entry.use_depth] = model_inputs(ids[start:stop], images[start:stop], entry.use_depth, depths)
            p, h = predict_with_head(entry.model, inputs[entry.use_depth], fv.batch_size, tta)
            probabilities.append(p)
            heads.append(h)
        combined = chosen.combine_probabilities(probabilities) if chosen is not None \
            else np.mean(probabilities, axis=0)
        masks[start:stop] = postprocess.apply(combined, choice, mean_head(heads))
        if fv.masks_dir:
            for id_, mask in zip(ids[start:stop], masks[start:stop]):
                rundir.write_png(os.path.join(fv.masks_dir, f"{id_}.png"), mask.astype(np.uint8) * 255)
        elapsed = time.time() - started
        _say(f"  {stop}/{len(ids)} images  {stop / max(elapsed, 1e-9):.1f} images/s")
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
    return 0


def with_empty_masks(ids: Sequence[str], masks: np.ndarray, missing: Sequence[str]):
    """ids and masks with an empty mask for each id of `missing`, all in id order."""
    every = list(ids) + list(missing)
    order = sorted(range(len(every)), key=lambda i: every[i])
    filled = np.concatenate([masks, np.zeros((len(missing),) + masks.shape[1:], dtype=masks.dtype)])
    return [every[i] for i in order], filled[order]


def run_evaluate(fv: flags.FlagValues) -> int:
    tfstart.import_tensorflow()  # before pipeline imports it
    from salt_tf import pipeline
    from salt_tf.data import splits

    # A run directory, or one export folder inside a run (its swa/, export/ or a snapshot): then the run's split
    # and data are used and ensemble.json goes into the export folder, where predict finds it.
    target = fv.model_dir
    run_dir = rundir.source_run_dir(target) if rundir.is_export(target) else target
    split_path = os.path.join(run_dir, rundir.SPLIT_FILE)
    if not os.path.isfile(split_path):
        raise PredictError(f"{target}: --evaluate needs a run directory (with split.csv and export/ or "
                           "snapshots/) or an export folder inside one")
    entries = find_exports(target)
    tta = parse_tta(fv.tta)
    try:
        data_dir = fv.data_dir or rundir.data_dir(run_dir)
    except rundir.RunDirError as e:
        raise PredictError(str(e)) from None
    if fv.eval_ids == "val":
        split = splits.read_split(split_path)
        if "role" not in split.columns:
            raise PredictError(f"{split_path}: no role column (train/val)")
        ids = list(split.loc[split["role"] == "val", "id"])
        which = "validation ids of split.csv"
    else:
        ids, which = None, "all labelled images"
    data = kaggle.load_labelled(data_dir, ids)
    for entry in entries:
        restore(entry)
    _say(tfstart.device_summary())
    _say(f"evaluate: {len(entries)} model(s) of {run_dir} ({', '.join(e.name for e in entries)}) on "
         f"{len(data.ids)} images ({which}) of {data_dir}; tta {'+'.join(tta)}; {fv.folds}-fold CV over images")
    started = time.time()
    plain, with_tta, heads, inputs = [], [], [], {}
    for entry in entries:
        if entry.use_depth not in inputs:
            inputs[entry.use_depth] = pipeline.to_arrays(data, entry.use_depth)[0]
        p, t, h = predict_plain_and_tta(entry.model, inputs[entry.use_depth], fv.batch_size, tta)
        plain.append(p)
        with_tta.append(t)
        heads.append(h)
    predicted = time.time() - started
    names = [e.name for e in entries]
    has_salt = mean_head(heads)
    rows, chosen = ensemble.evaluate(data.masks, np.stack(with_tta), names, np.stack(plain), tta=tta,
                                     folds=fv.folds, l2=fv.stack_l2, model_info=[e.info() for e in entries],
                                     has_salt=has_salt)
    if has_salt is not None:
        truth_has_salt = data.masks.reshape(len(data.ids), -1).any(axis=1)
        _say(f"image head (mean of {sum(h is not None for h in heads)} model(s)): accuracy "
             f"{np.mean((has_salt > 0.5) == truth_has_salt):.4f} at 0.5, AUC "
             f"{metrics.roc_auc(truth_has_salt, has_salt):.4f}; the cv post-processing may gate on it")
    _say(ensemble.format_table(rows))
    _say(f"@0.50: threshold 0.5.  tuned/thr: best threshold on these same images (optimistic).  cv: threshold, "
         f"meta-model and post-processing fitted on {chosen.scores['folds'] - 1} folds of the images, scored on "
         "the held-out fold.")
    cv = chosen.scores[f"cv_{chosen.combine}_postprocessed"]
    weights = ""
    if chosen.stacker is not None:
        weights = "; weights " + ", ".join(f"{n} {w:+.3f}" for n, w in zip(names, chosen.stacker.weights)) + \
            f", bias {chosen.stacker.bias:+.3f}"
    _say(f"chosen: {chosen.combine} of {len(entries)} + postprocessing ({chosen.postprocessing.describe()}), "
         f"cv {cv:.4f}{weights}  [{len(data.ids) / max(predicted, 1e-9):.1f} images/s predicted, "
         f"{time.time() - started:.1f} s in all]")
    views = ensemble.views_label(tta)
    label = "plain" if views == "none" else f"tta {views}"
    named = [(f"{name} ({label})", ensemble.error_breakdown(data.masks, p > 0.5)) for name, p in zip(names, with_tta)]
    if len(entries) > 1:
        named.append((f"mean of {len(entries)} ({label})",
                      ensemble.error_breakdown(data.masks, np.mean(with_tta, 0) > 0.5)))
    _say("where the points are lost, at threshold 0.5 (score per coverage group; images without salt that got "
         "some; images with salt that got none; the score with no salt on images without any):")
    _say(ensemble.format_breakdown(named))
    versus = chosen.scores["vs_best_single"]
    _say(f"vs the best single model by cv, {versus['model']} ({versus['cv']:.4f}): {versus['difference']:+.4f} "
         f"(95% interval {versus['ci95'][0]:+.4f} .. {versus['ci95'][1]:+.4f}, paired bootstrap over the "
         f"{len(data.ids)} images)")
    if fv.write_ensemble:
        path = os.path.join(target, rundir.ENSEMBLE_FILE)
        chosen.save(path)
        _say(f"wrote {path}")
    return 0


def parse_command_line(argv: Sequence[str], flag_values: flags.FlagValues, doc: str, error: type) -> bool:
    """Parses a model command's argv (predict, serving) into `flag_values`.

    Returns:
        False when it printed the help (the first two paragraphs of `doc`, then the flags): nothing more to do.
    Raises:
        flags.Error for a bad flag; `error` (one line) for a stray argument or a missing --model_dir.
    """
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        _say("\n\n".join(doc.split("\n\n")[:2]) + "\n")
        _say(flag_values.get_help())
        return False
    flag_values.unparse_flags()
    remaining = flag_values(list(argv))
    if len(remaining) > 1:
        raise error(f"unexpected arguments: {' '.join(remaining[1:])}; flags take the form --name=value")
    if not flag_values.model_dir:
        raise error("--model_dir is required: a run directory or an export folder")
    return True


def main(argv: Sequence[str] | None = None, flag_values: flags.FlagValues = PREDICT_FLAGS) -> int:
    """The command line; returns the exit status (0 ok, 2 bad flags/data/model, 1 a failing write)."""
    argv = list(sys.argv if argv is None else argv)
    define_flags(flag_values)
    try:
        if not parse_command_line(argv, flag_values, __doc__, PredictError):
            return 0
        if flag_values.evaluate:
            return run_evaluate(flag_values)
        return run_predict(flag_values)
    except (flags.Error, PredictError, kaggle.DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        print(f"error: cannot write {e.filename or ''}: {e.strerror or e}; check the folder's permissions and "
              "free space", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())  # TensorFlow is first imported by restore(), through tfstart
