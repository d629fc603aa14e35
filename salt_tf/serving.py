"""A SavedModel of a run's models for serving: raw uint8 images in, salt probabilities and masks out.

    python -m salt_tf.serving --model_dir=runs/a --output=serving/salt/1            # TTA hflip (default)
    python -m salt_tf.serving --model_dir=runs/a/swa --output=serving/salt/2 --tta=none

`--model_dir` is what predict takes: a run directory (its snapshots if it made any, else its export/) or one
export folder. The SavedModel's `serving_default` signature takes

    images   uint8 [N,101,101], [N,101,101,1] or [N,101,101,3] (3 equal channels, as the PNGs are: the
             first is used)
    depths   float32 [N], the depth in feet: only for models trained with --use_depth

and returns

    probabilities  float32 [N,101,101]  the salt probability of each pixel
    masks          uint8   [N,101,101]  1 where probabilities > threshold, else 0

Inside the graph, as the predict command does it: the model input is image / 255 in float32 (plus the
depth / 1000 plane for --use_depth models: pipeline.to_arrays); each model's probabilities are averaged over
the TTA views, each un-flipped (salt_tf.tta.tta_function, the same compiled function predict uses); the models
are combined as predict combines them: the run's ensemble.json (written by `predict evaluate`) if there is
one, mean or stacked meta-model (ensemble.Stacker: the logistic regression on the models' clipped logits,
computed in float64 as there), else the mean. The threshold is ensemble.json's post-processing threshold,
else a single export's validation threshold, else 0.5; --threshold overrides it. The other post-processing
rules of ensemble.json (small-component removal, the empty rule, the image-head gate) are NOT in the graph:
the command says so when the run chose one; predict applies them.

The SavedModel needs no salt_tf to load: `tf.saved_model.load(path).signatures["serving_default"]`.
`assets.extra/salt_tf.json` records what was exported (models, TTA, combine, threshold). TF Serving
expects a numbered version folder: --output=<base>/1. Training does not write a SavedModel; run this
command on the finished run (or on any of its exports).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags

from salt_tf import IMAGE_SIZE, cli, ensemble, exports, rundir, tfstart
from salt_tf import tta as tta_lib  # `tta` is the parameter (the views) below

SERVING_FLAGS = flags.FlagValues()
SIGNATURE = "serving_default"
METADATA = os.path.join("assets.extra", "salt_tf.json")


class ServingError(ValueError):
    """A problem with the user's model folder, output folder or flags; the message is one line."""


def define_flags(flag_values: flags.FlagValues = SERVING_FLAGS) -> None:
    """Registers the serving flags in `flag_values` (idempotent)."""
    if "output" in flag_values:
        return
    cli.define_model_flags(flag_values, " in the graph")
    flags.DEFINE_string("output", None, "Folder to write the SavedModel into (must not exist or be empty); "
                        "for TF Serving a numbered version folder such as serving/salt/1.",
                        flag_values=flag_values)


def _stacked(stacker: ensemble.Stacker, probabilities):
    """The meta-model's probabilities of the models' probabilities [M, N, H, W], as ensemble.Stacker.predict:
    float64 logits of the clipped probabilities, weighted, plus the bias, through the sigmoid."""
    import tensorflow as tf

    p = tf.clip_by_value(tf.cast(probabilities, tf.float64), stacker.clip, 1.0 - stacker.clip)
    z = tf.math.log(p) - tf.math.log1p(-p)
    weights = tf.constant(stacker.weights, tf.float64)[:, None, None, None]
    return tf.cast(tf.sigmoid(tf.reduce_sum(weights * z, axis=0) + stacker.bias), tf.float32)


def build_module(entries: Sequence[exports.LoadedModel], tta: Sequence[str], threshold: float,
                 chosen: ensemble.Ensemble | None = None):
    """The tf.Module to save: restored models, their TTA and combination, and the serving function.

    Args:
        entries: the models (exports.find_exports + exports.restore), in ensemble.json's order.
        tta: the views ("none", "hflip", "vflip") averaged per model, as in predict.
        threshold: masks are probabilities > threshold.
        chosen: the run's ensemble.json (None: the mean of the models).

    Returns:
        A tf.Module whose `serve` tf.function takes images uint8 (and depths float32 [N] when a model uses
        depth) and returns {"probabilities": float32 [N,101,101], "masks": uint8 [N,101,101]}.
    """
    import tensorflow as tf

    from salt_tf import pipeline

    use_depth = any(e.use_depth for e in entries)
    stacker = chosen.stacker if chosen is not None and chosen.combine == "stacked" else None
    module = tf.Module()
    module.models = [e.model for e in entries]  # tracked: their variables are saved with the graph
    # Keras 3 variables wrap tf.Variables; list those too so the SavedModel holds every one of them.
    module.model_variables = [getattr(v, "value", v) for e in entries for v in e.model.weights]
    runs = [tta_lib.tta_function(e.model, tta, 2 if e.use_depth else 1) for e in entries]

    def serve(images, depths=None):
        images = tf.convert_to_tensor(images)
        rank = tf.rank(images)
        shape = tf.shape(images)
        channels = tf.cond(rank == 4, lambda: shape[-1], lambda: tf.constant(1))
        checks = [
            tf.debugging.assert_equal(tf.logical_or(rank == 3, rank == 4), True,
                                      message="images must be [N,101,101], [N,101,101,1] or [N,101,101,3]"),
            tf.debugging.assert_equal(shape[1:3], tf.constant([IMAGE_SIZE, IMAGE_SIZE]),
                                      message=f"images must be {IMAGE_SIZE}x{IMAGE_SIZE}"),
            tf.debugging.assert_equal(tf.logical_or(channels == 1, channels == 3), True,
                                      message="images must have 1 or 3 (equal) channels"),
        ]
        with tf.control_dependencies(checks):
            n = shape[0]
            gray = tf.reshape(images, [n, IMAGE_SIZE, IMAGE_SIZE, -1])[..., :1]
        x = tf.cast(gray, tf.float32) / 255.0                                  # = pipeline.to_arrays
        if depths is not None:
            tf.debugging.assert_equal(tf.shape(depths), [n], message="depths must be [N], one per image")
            plane = tf.broadcast_to(tf.reshape(tf.cast(depths, tf.float32) / pipeline.DEPTH_SCALE, [n, 1, 1, 1]),
                                    tf.shape(x))
            with_depth = tf.concat([x, plane], axis=-1)
        probabilities = [run(with_depth if e.use_depth else x)[0] for e, run in zip(entries, runs)]
        if stacker is not None:
            combined = _stacked(stacker, tf.stack(probabilities))
        else:
            combined = tf.add_n(probabilities) / float(len(probabilities))
        return {"probabilities": combined, "masks": tf.cast(combined > threshold, tf.uint8)}

    images_spec = tf.TensorSpec(None, tf.uint8, name="images")
    if use_depth:
        module.serve = tf.function(serve, input_signature=[images_spec, tf.TensorSpec([None], tf.float32,
                                                                                       name="depths")])
    else:
        module.serve = tf.function(lambda images: serve(images), input_signature=[images_spec])
    return module


def export_savedmodel(model_dir: str, output: str, tta: str | None = None, threshold: float | None = None,
                      use_ensemble: bool = True) -> dict:
    """Writes the SavedModel of `model_dir`'s models to the folder `output` (atomically: a reader sees no
    half-written folder).

    Args:
        model_dir: a run directory or one export folder (as predict's --model_dir).
        output: the folder to create; it must not exist, or be empty.
        tta: "none" or "hflip"/"vflip"/"hflip,vflip" (None: ensemble.json's, else "hflip").
        threshold: overrides the chosen threshold (None: ensemble.json's, else the single export's, else 0.5).
        use_ensemble: use <model_dir>/ensemble.json when present.

    Returns:
        What was exported (also written to <output>/assets.extra/salt_tf.json): models, tta, combine,
        threshold, inputs, and the post-processing rules left out of the graph.

    Raises:
        ServingError, exports.ExportError, flags.Error: one line naming the bad path or flag.
    """
    if not output:
        raise ServingError("--output is required: the folder to write the SavedModel into")
    output = os.path.abspath(output)
    if os.path.isfile(output) or (os.path.isdir(output) and os.listdir(output)):
        raise ServingError(f"--output={output}: exists and is not an empty folder; choose a new folder (for TF "
                           "Serving a new version number)")
    if rundir.is_cv_parent(model_dir):  # the graph's mean would weigh folds by their numbers of snapshots
        raise ServingError(f"{model_dir}: a cross-validation parent; the SavedModel holds the models of one run, not "
                           f"a fold ensemble: pass one fold (--model_dir={rundir.fold_dir(model_dir, 0)}), or "
                           f"predict the fold ensemble with python -m salt_tf.predict submit --model_dir={model_dir}")
    entries = exports.find_exports(model_dir)
    chosen = exports.load_ensemble(model_dir, entries) if use_ensemble else None
    views = tta_lib.parse_tta(tta) if tta is not None else tuple(chosen.tta) if chosen else tta_lib.DEFAULT_TTA
    if chosen is not None:
        chosen_threshold = chosen.postprocessing.threshold
    else:
        single = entries[0].config.get("threshold") if len(entries) == 1 else None
        chosen_threshold = float(single if single is not None else 0.5)
    threshold = float(threshold if threshold is not None else chosen_threshold)

    tf = tfstart.import_tensorflow()
    for entry in entries:
        exports.restore(entry)
    module = build_module(entries, views, threshold, chosen)
    use_depth = any(e.use_depth for e in entries)
    left_out = {}
    if chosen is not None:
        pp = chosen.postprocessing
        left_out = {k: v for k, v in (("min_component", pp.min_component), ("min_salt", pp.min_salt),
                                      ("min_has_salt", pp.min_has_salt)) if v}
    info = {"models": [e.info() for e in entries], "tta": list(views),
            "combine": chosen.combine if chosen is not None else "mean", "threshold": threshold,
            "inputs": ["images", "depths"] if use_depth else ["images"],
            "postprocessing_not_in_graph": left_out, "source": os.path.abspath(model_dir)}

    with rundir.staged_dir(output) as staging:  # replaces the empty --output folder, if there is one, whole
        tf.saved_model.save(module, staging, signatures={SIGNATURE: module.serve.get_concrete_function()})
        os.makedirs(os.path.join(staging, os.path.dirname(METADATA)), exist_ok=True)
        rundir.write_json(os.path.join(staging, METADATA), info, final_newline=False)
    return info


def main(argv: Sequence[str] | None = None, flag_values: flags.FlagValues = SERVING_FLAGS) -> int:
    """The command line; returns the exit status (0 ok, 2 bad flags or model folder, 1 a failing write)."""
    argv = list(sys.argv if argv is None else argv)
    define_flags(flag_values)
    return cli.run_reporting(lambda: _command(argv, flag_values), (ServingError, exports.ExportError),
                             output=lambda: flag_values.output)


def _command(argv: list[str], flag_values: flags.FlagValues) -> int:
    """Parses argv, writes the SavedModel and says what it wrote (and which post-processing it left out)."""
    if not cli.parse_single(argv, flag_values, __doc__):
        return 0
    tta = flag_values.tta if flag_values["tta"].present else None
    info = export_savedmodel(flag_values.model_dir, flag_values.output, tta, flag_values.threshold,
                             flag_values.use_ensemble)
    print(tfstart.device_summary(), flush=True)
    if info["postprocessing_not_in_graph"]:
        rules = ", ".join(f"{k}={v}" for k, v in info["postprocessing_not_in_graph"].items())
        print(f"warning: ensemble.json also chose {rules}; the SavedModel's masks apply the threshold only "
              "(predict applies the rest)", file=sys.stderr, flush=True)
    print(f"wrote {os.path.abspath(flag_values.output)}: signature {SIGNATURE}, inputs "
          f"{' + '.join(info['inputs'])} -> probabilities, masks; {len(info['models'])} model(s) "
          f"({info['combine']}), tta {'+'.join(info['tta'])}, threshold {info['threshold']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())  # TensorFlow is first imported by export_savedmodel, through tfstart
