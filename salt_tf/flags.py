"""Every command-line flag of `python -m salt_tf.train`, defined in one place and validated up front.

`define_flags()` registers them all, `define_model_flags()` only the model's (the tools that build a model
use those); both are idempotent, so tests and tools may call them too. The validators turn a bad value or a
contradictory combination into one line naming the flag before any work starts. A flag that sets a field of
a config dataclass (model.ModelConfig, losses.LossConfig, schedules.OptimizerConfig, loop.LoopConfig,
pipeline.Augmentation) takes its default from that field; salt_tf.configs turns the parsed flags into those
objects. This module builds nothing. The train command, tests and tools import it; predict and runs have
their own flags.
"""

from __future__ import annotations

import math
import os

from absl import flags

from salt_tf import losses

FLAGS = flags.FLAGS

# define_flags() may be called by the entry point, tests and tools in one process; absl allows one definition.
_DEFINED = False


def _text_list(values) -> list[str]:
    """A tuple field's default as a DEFINE_list default."""
    return [str(v) for v in values]


def define_flags() -> None:
    """Registers every flag of the train command in absl's global FLAGS, with its validators (idempotent)."""
    global _DEFINED
    if _DEFINED:
        return
    _DEFINED = True
    from salt_tf import loop, pipeline, schedules

    loop_defaults, augmentation = loop.LoopConfig(), pipeline.Augmentation()
    loss_defaults, optimizer_defaults = losses.LossConfig(), schedules.OptimizerConfig()

    # --- Run directory and data.
    flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, flags.cfg, metrics.csv, events. "
                        "Running again with the same directory resumes the run: with the same flags "
                        "(--flagfile=<model_dir>/flags.cfg), or changing only those "
                        "salt_tf.flags.RESUME_MAY_CHANGE lists.")
    flags.DEFINE_enum("dataset", "kaggle", ["kaggle", "demo"],
                      "kaggle: read the competition layout from --data_dir. demo: generate the embedded "
                      "synthetic set into --data_dir (once) and train on it.")
    flags.DEFINE_string("data_dir", None, "Folder with train.csv, depths.csv and train/{images,masks}/ "
                        "(the Kaggle download); for --dataset=demo, where the demo set is written.")
    flags.DEFINE_integer("demo_images", 800, "Labelled images in the generated demo set.", lower_bound=16)
    flags.DEFINE_integer("val_images", 400, "Images held out for validation (coverage-stratified).",
                         lower_bound=1)
    flags.DEFINE_integer("split_seed", 0, "Seed of the train/validation split; separate from --seed so "
                         "runs with different training seeds validate on the same images.")
    flags.DEFINE_integer("folds", 0, "K-fold cross-validation: 0 = one coverage-stratified split with "
                         "--val_images; K >= 2 = coverage-stratified K folds by --split_seed, this run validating "
                         "on fold --fold and training on the other K-1 (--val_images is then not used). "
                         "`python -m salt_tf.cv train` trains all K.", lower_bound=0)
    flags.DEFINE_integer("fold", 0, "With --folds=K: the fold this run validates on, 0..K-1; each fold is its own "
                         "run directory.", lower_bound=0)
    flags.DEFINE_list("extra_data_dir", [], "Labelled folders in the Kaggle layout (train.csv, depths.csv, "
                      "train/{images,masks}), e.g. pseudo-labels from `python -m salt_tf.cv pseudo`, used for "
                      "TRAINING ONLY: never validated on, never in split.csv; fingerprinted with --data_dir in "
                      "record.json. A comma list; the flag may also be repeated on the command line.")
    flags.DEFINE_boolean("strict", True, "Stop at the first bad data file. --nostrict skips bad examples with "
                         "a warning and lists them in <model_dir>/skipped.csv.")

    # --- Augmentation.
    flags.DEFINE_boolean("hflip", augmentation.hflip, "Random left-right flips.")
    flags.DEFINE_integer("translate", augmentation.translate,
                         "Random shift of up to this many pixels along each axis, the "
                         "border filled by reflection (0 = off).", lower_bound=0, upper_bound=99)
    flags.DEFINE_float("zoom", augmentation.zoom,
                       "Random zoom-and-crop: a square crop of 101/s pixels, s uniform in [1, "
                       "--zoom], resized back to 101x101 (bilinear; the mask re-thresholded at 0.5). 1 = off; "
                       "1.2 is the common choice.", lower_bound=1.0, upper_bound=2.0)
    flags.DEFINE_float("brightness", augmentation.brightness,
                       "Random brightness: add a value uniform in [-b, b] to the image "
                       "(pixel values are in [0, 1]; the depth plane is not changed). 0 = off.",
                       lower_bound=0.0, upper_bound=0.5)
    flags.DEFINE_float("contrast", augmentation.contrast,
                       "Random contrast: scale the image about its mean by a factor uniform in "
                       "[1 - c, 1 + c]. 0 = off.", lower_bound=0.0, upper_bound=0.9)

    define_model_flags()

    # --- Loss.
    flags.DEFINE_string("loss", loss_defaults.loss, "Weighted loss terms 'name:weight,...' from "
                        f"{', '.join(losses.LOSS_NAMES)}.")
    flags.DEFINE_string("loss_schedule", loss_defaults.loss_schedule,
                        "Loss stages 'spec;spec;...' (each like --loss), overriding "
                        "--loss: with --lr_schedule=plateau_restart or cosine, snapshot cycle k trains with stage "
                        "k (the last stage repeats); with plateau, stages change at --loss_switch_epochs. "
                        "E.g. 'focal:1,dice:1;bce:1,lovasz_elu:1'.")
    flags.DEFINE_list("loss_switch_epochs", _text_list(loop_defaults.loss_switch_epochs),
                      "With --lr_schedule=plateau and --loss_schedule: the epochs "
                      "(0-based) at which the next loss stage starts, e.g. 20.")
    flags.DEFINE_float("side_loss_weight", loss_defaults.side_loss_weight,
                       "With --deep_supervision: weight of each side output's --loss.",
                       lower_bound=0.0)
    flags.DEFINE_float("image_loss_weight", loss_defaults.image_loss_weight,
                       "With --deep_supervision: weight of the image head's BCE.",
                       lower_bound=0.0)
    flags.DEFINE_float("focal_gamma", loss_defaults.focal_gamma, "Focal loss gamma.", lower_bound=0.0)
    flags.DEFINE_float("focal_alpha", loss_defaults.focal_alpha,
                       "Focal loss weight of positives (negatives get 1 - alpha).",
                       lower_bound=0.0, upper_bound=1.0)

    # --- Optimization.
    flags.DEFINE_enum("optimizer", optimizer_defaults.optimizer, ["adam", "sgd"], "adam, or sgd with momentum.")
    flags.DEFINE_float("learning_rate", optimizer_defaults.learning_rate, "Initial learning rate.")
    flags.DEFINE_float("momentum", optimizer_defaults.momentum, "SGD momentum.", lower_bound=0.0, upper_bound=0.999)
    flags.DEFINE_boolean("nesterov", optimizer_defaults.nesterov, "Nesterov momentum for SGD.")
    flags.DEFINE_float("weight_decay", optimizer_defaults.weight_decay,
                       "Decoupled weight decay (AdamW / SGDW style; 0 = off).",
                       lower_bound=0.0)
    flags.DEFINE_float("clip_norm", loop_defaults.clip_norm,
                       "Clip gradients to this global norm (0 = off).", lower_bound=0.0)
    flags.DEFINE_integer("max_bad_steps", loop_defaults.max_bad_steps,
                         "A step with a non-finite loss or gradient is skipped; this many "
                         "in a row stop the run (the last checkpoint stays intact).", lower_bound=1)
    flags.DEFINE_integer("epochs", loop_defaults.epochs,
                         "Epochs to train in all (a resumed run continues to this; a resume may "
                         "raise it: with --lr_schedule=cosine only with --snapshot_cycles raised in "
                         "step, more cycles of the same length; with --swa_epochs only so far that the "
                         "averaged epochs all come after the run's old end).",
                         lower_bound=1)
    flags.DEFINE_integer("batch_size", loop_defaults.batch_size,
                         "Training batch size: the global batch, split evenly over the "
                         "replicas under --strategy=mirrored or multi_worker.", lower_bound=1)
    flags.DEFINE_integer("eval_batch_size", loop_defaults.eval_batch_size, "Validation batch size.", lower_bound=1)

    # --- Learning-rate schedule: the seed recipe's multiply-on-plateau, or snapshot ensembles.
    flags.DEFINE_enum("lr_schedule", loop_defaults.lr_schedule, ["plateau", "plateau_restart", "cosine"],
                      "plateau: LR x --plateau_factor on a plateau. plateau_restart: snapshot ensemble (seed "
                      "variant): on a plateau the cycle's best weights become a snapshot and the LR restarts. "
                      "cosine: snapshot ensemble of Huang et al. 2017, --snapshot_cycles cosine cycles, a "
                      "snapshot at the end of each. Snapshots go to <model_dir>/snapshots/.")
    flags.DEFINE_integer("snapshot_cycles", loop_defaults.snapshot_cycles,
                         "Cycles (= snapshots) of --lr_schedule=cosine; must divide "
                         "--epochs.", lower_bound=1)
    flags.DEFINE_float("plateau_factor", loop_defaults.plateau_factor,
                       "Multiply the LR by this when the validation metric has not "
                       "improved for --plateau_patience epochs.", lower_bound=0.01, upper_bound=1.0)
    flags.DEFINE_integer("plateau_patience", loop_defaults.plateau_patience,
                         "Epochs without improvement before the LR drops.",
                         lower_bound=1)
    flags.DEFINE_float("min_learning_rate", loop_defaults.min_learning_rate,
                       "Floor of the plateau schedule.", lower_bound=0.0)
    flags.DEFINE_integer("swa_epochs", loop_defaults.swa_epochs,
                         "Stochastic weight averaging: average the weights at the end of the "
                         "last N epochs, recompute batch-norm statistics on the training images and export the "
                         "result to <model_dir>/swa (predict --model_dir=<model_dir>/swa). 0 = off.", lower_bound=0)
    flags.DEFINE_integer("early_stop_patience", loop_defaults.early_stop_patience,
                         "Stop after this many epochs without improvement "
                         "(0 = never).", lower_bound=0)

    # --- Reproducibility and bookkeeping.
    flags.DEFINE_integer("seed", loop_defaults.seed, "Seed of initialization, data order and augmentation.")
    flags.DEFINE_boolean("deterministic", True, "Bit-identical runs for the same flags and seed "
                         "(see salt_tf/determinism.py).")
    flags.DEFINE_string("init_checkpoint", "", "Start a new run from the model weights (and batch-norm "
                        "statistics) of an earlier one, e.g. to cycle snapshots from a converged model: its run "
                        "directory (the best model, export/), an export/ or a snapshots/snapshot-K folder. The "
                        "optimizer, schedule and epoch start fresh; the model flags must match. A rerun that "
                        "resumes a run must give the value the run started with (flags.cfg has it).")
    flags.DEFINE_boolean("restart_from_scratch", False, "Train from epoch 0 in a --model_dir that holds a run's "
                         "results (metrics.csv, export/) but no readable checkpoint, replacing those results. "
                         "Without it such a directory stops the run. No effect when a checkpoint can be resumed.")
    flags.DEFINE_integer("keep_checkpoints", loop_defaults.keep_checkpoints,
                         "Most recent epoch checkpoints kept (the best is kept "
                         "apart).", lower_bound=1)
    flags.DEFINE_integer("progress_every", loop_defaults.progress_every,
                         "Steps between progress lines within an epoch (0 = off).",
                         lower_bound=0)

    # --- Devices and hosts (salt_tf/distribute.py; README, "Scaling out").
    flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                      "default: one device. mirrored: tf.distribute.MirroredStrategy over all local GPUs (with "
                      "none, all logical CPU devices) or --devices. multi_worker: MultiWorkerMirroredStrategy over "
                      "the hosts in the TF_CONFIG environment variable (run the same command on every host). "
                      "--batch_size is the global batch, split evenly over the replicas.")
    flags.DEFINE_list("devices", [], "With --strategy=mirrored: the devices to mirror over, e.g. GPU:0,GPU:1 "
                      "(default: all local GPUs, or all logical CPU devices).")
    flags.DEFINE_boolean("sync_batch_norm", False, "With several replicas: batch-norm statistics over the "
                         "global batch (Keras BatchNormalization(synchronized=True); an all-reduce in every BN "
                         "layer, training then equals one device with the same batch). Off: each replica "
                         "normalizes with its own share of the batch. Moving statistics are averaged over "
                         "replicas after every step either way. No effect with one replica.")

    # --- TensorBoard.
    flags.DEFINE_integer("summary_every_steps", loop_defaults.summary_every_steps,
                         "Every N steps, write per-variable histograms, norms, "
                         "gradient norms and update/weight ratios, and the step's losses (0 = never).",
                         lower_bound=0)
    flags.DEFINE_integer("summary_images", loop_defaults.summary_images,
                         "Validation images (a fixed, coverage-spread set) drawn with "
                         "true and predicted outlines every epoch (0 = none).", lower_bound=0, upper_bound=64)
    flags.DEFINE_integer("summary_worst_images", loop_defaults.summary_worst_images,
                         "Worst-scored validation images drawn every epoch.",
                         lower_bound=0, upper_bound=64)
    flags.DEFINE_string("profile_steps", format_profile_steps(loop_defaults.profile_steps),
                        "'START,STOP': profile global steps START..STOP-1 into "
                        "<model_dir>/events for TensorBoard's profile tab (empty = off).")

    _register_validators()


# Model flags' definition state: define_model_flags() is called by define_flags() and by tools on their own.
_MODEL_DEFINED = False


def define_model_flags() -> None:
    """Registers the flags of model.ModelConfig (with --use_depth for its input channels) and --precision, the
    flags every command that builds a model shares (train, tools/model_summary.py, tools/bench.py, ...);
    idempotent. configs.model_config turns them into a ModelConfig."""
    global _MODEL_DEFINED
    if _MODEL_DEFINED:
        return
    _MODEL_DEFINED = True
    from salt_tf import model as model_lib

    model_defaults = model_lib.ModelConfig()
    flags.DEFINE_integer("base_width", model_defaults.base_width,
                         "Filters at the first level; doubled at each level down.",
                         lower_bound=1)
    flags.DEFINE_integer("depth", model_defaults.depth, "Number of poolings (101 -> 50 -> 25 -> 12 -> 6 -> 3).",
                         lower_bound=1, upper_bound=5)
    flags.DEFINE_integer("blocks_per_level", model_defaults.blocks_per_level,
                         "Residual blocks per level.", lower_bound=1)
    flags.DEFINE_boolean("se", model_defaults.se, "Squeeze-and-excitation gates in every residual block.")
    flags.DEFINE_integer("se_ratio", model_defaults.se_ratio,
                         "SE reduction ratio r (hidden units = channels // r).", lower_bound=1)
    flags.DEFINE_float("dropout", model_defaults.dropout, "Spatial dropout rate at the bottleneck and decoder levels.",
                       lower_bound=0.0, upper_bound=0.9)
    flags.DEFINE_enum("se_type", model_defaults.se_type, ["channel",
                      "scse"], "With --se: channel gates (cSE, Hu et al.), or "
                      "scse: channel and spatial gates side by side, added (Roy et al. 2018).")
    flags.DEFINE_boolean("hypercolumn", model_defaults.hypercolumn,
                         "The final 1x1 conv sees every decoder level's output, upsampled "
                         "to full size and concatenated.")
    flags.DEFINE_boolean("deep_supervision", model_defaults.deep_supervision,
                         "Side logits from every decoder level (trained on images "
                         "with salt only) and an image-level 'has salt' logit on the bottleneck (trained on every "
                         "image); weights --side_loss_weight and --image_loss_weight.")
    flags.DEFINE_integer("input_size", model_defaults.input_size,
                         "The network's input size: 101 = native; larger pads each image "
                         "(--pad_mode) to this size, the network runs at it, and the loss, metric and predictions "
                         "see the centre 101x101 only. 128 allows 5 clean poolings.", lower_bound=101,
                         upper_bound=201)
    flags.DEFINE_enum("pad_mode", model_defaults.pad_mode, ["reflect",
                      "edge"], "How --input_size pads the 101x101 image: "
                      "mirror without repeating the border (reflect), or repeat the border pixel (edge).")
    flags.DEFINE_boolean("use_depth", model_defaults.input_channels == 2, "Add the depth from depths.csv as a "
                         "second input channel.")
    flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"],
                      "float32, or Keras' mixed_bfloat16 policy: bfloat16 activations and convolutions, float32 "
                      "variables, batch-norm statistics and losses. Faster on CPUs with AVX512_BF16/AMX and on "
                      "GPUs with bfloat16 units; see docs/performance.md for speed and accuracy measured here.")

    @flags.multi_flags_validator(["depth", "input_size"])
    def _depth_fits_input(values):
        size = values["input_size"]
        for _ in range(values["depth"]):
            size //= 2
        if size < 2:
            raise flags.ValidationError(f"--depth={values['depth']} pools an --input_size={values['input_size']} "
                                        "input below 2x2; lower --depth")
        return True


def _register_validators() -> None:
    def loss_spec_ok(spec):
        try:
            losses.parse_loss_spec(spec)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    flags.register_validator("loss", loss_spec_ok)
    flags.register_validator("learning_rate", lambda v: math.isfinite(v) and v > 0,
                             "--learning_rate must be a positive number")
    flags.register_validator("model_dir", _model_dir_ok)
    flags.register_validator("profile_steps", lambda v: v == "" or parse_profile_steps(v) is not None,
                             "--profile_steps must be 'START,STOP' with 0 <= START < STOP, e.g. 20,25")

    @flags.multi_flags_validator(["dataset", "data_dir"],
                                 message="--data_dir is required (the folder of the Kaggle download, or "
                                         "where --dataset=demo writes its images)")
    def _data_dir_given(values):
        return bool(values["data_dir"])

    @flags.multi_flags_validator(["dataset", "data_dir"])
    def _kaggle_data_exists(values):
        if values["dataset"] == "kaggle" and values["data_dir"] and not os.path.isfile(
                os.path.join(values["data_dir"], "train.csv")):
            raise flags.ValidationError(
                f"--data_dir={values['data_dir']} has no train.csv; point it at the Kaggle download "
                "(train.csv, depths.csv, train/images, train/masks) or use --dataset=demo")
        return True

    @flags.multi_flags_validator(["lr_schedule", "snapshot_cycles", "epochs"])
    def _cycles_divide_epochs(values):
        if values["lr_schedule"] == "cosine" and values["epochs"] % values["snapshot_cycles"]:
            raise flags.ValidationError(f"--snapshot_cycles={values['snapshot_cycles']} must divide "
                                        f"--epochs={values['epochs']} (equal cosine cycles)")
        return True

    @flags.multi_flags_validator(["loss_schedule", "loss_switch_epochs", "lr_schedule"])
    def _loss_schedule_ok(values):
        stages = loss_stages(values["loss_schedule"]) if values["loss_schedule"] else []
        switches = values["loss_switch_epochs"]
        try:
            epochs = [int(e) for e in switches]
        except ValueError:
            raise flags.ValidationError(f"--loss_switch_epochs={','.join(switches)} must be whole numbers") from None
        if epochs and values["lr_schedule"] != "plateau":
            raise flags.ValidationError("--loss_switch_epochs is for --lr_schedule=plateau; snapshot schedules "
                                        "change the loss stage with each cycle")
        if epochs and (len(epochs) != len(stages) - 1 or epochs != sorted(set(epochs)) or epochs[0] < 1):
            raise flags.ValidationError(f"--loss_switch_epochs needs {max(len(stages) - 1, 0)} increasing "
                                        f"epochs >= 1 for the {len(stages)} stages of --loss_schedule")
        return True

    @flags.multi_flags_validator(["swa_epochs", "epochs", "strategy", "devices"])
    def _swa_ok(values):
        if values["swa_epochs"] > values["epochs"]:
            raise flags.ValidationError(f"--swa_epochs={values['swa_epochs']} exceeds --epochs={values['epochs']}")
        if values["swa_epochs"] and (values["strategy"] != "default" or values["devices"]):
            raise flags.ValidationError("--swa_epochs runs on one device only (its batch-norm pass is not "
                                        "distributed); drop --strategy/--devices or --swa_epochs")
        return True

    @flags.multi_flags_validator(["strategy", "devices"])
    def _devices_need_mirrored(values):
        if values["devices"] and values["strategy"] != "mirrored":
            raise flags.ValidationError(f"--devices={','.join(values['devices'])} is for --strategy=mirrored "
                                        f"(got --strategy={values['strategy']}); add --strategy=mirrored or drop "
                                        "--devices")
        return True

    @flags.multi_flags_validator(["learning_rate", "min_learning_rate"],
                                 message="--min_learning_rate must not exceed --learning_rate")
    def _lr_floor(values):
        return values["min_learning_rate"] <= values["learning_rate"]

    @flags.multi_flags_validator(["folds", "fold"])
    def _fold_of_folds(values):
        folds, fold = values["folds"], values["fold"]
        if folds == 1:
            raise flags.ValidationError("--folds=1 is not cross-validation (the one fold would validate on every "
                                        "image and train on none); give --folds=0 (one split, --val_images) or "
                                        "--folds=K with K >= 2")
        if fold and not folds:
            raise flags.ValidationError(f"--fold={fold} needs --folds=K (the number of folds), e.g. --folds=5")
        if folds and fold >= folds:
            raise flags.ValidationError(f"--fold={fold} is not one of the {folds} folds of --folds={folds}; give "
                                        f"--fold from 0 to {folds - 1}")
        return True

    @flags.multi_flags_validator(["dataset", "demo_images", "val_images", "batch_size", "folds"])
    def _enough_training_images(values):
        if values["folds"]:
            return True  # the folds decide the validation images, not --val_images
        if values["dataset"] == "demo" and values["val_images"] + values["batch_size"] > values["demo_images"]:
            raise flags.ValidationError(
                f"--val_images={values['val_images']} leaves fewer than one batch (--batch_size="
                f"{values['batch_size']}) of the {values['demo_images']} demo images for training")
        return True


# Flags of list type the train command accepts repeated on its command line (absl keeps only the last).
REPEATABLE = ("extra_data_dir",)


def join_repeated(argv: list[str]) -> list[str]:
    """argv with every repeated --NAME=VALUE of a REPEATABLE list flag joined into one comma list, at the place
    of the first (a flagfile's value is still overridden by the command line's, as for any flag).

    Args:
        argv: the command line, program name first.

    Returns:
        The new argv; the same when nothing is repeated.
    """
    out, joined = [], {}
    for arg in argv:
        name, _, value = arg[2:].partition("=") if arg.startswith("--") and "=" in arg else ("", "", "")
        if name not in REPEATABLE:
            out.append(arg)
        elif name in joined:
            out[joined[name]] += f",{value}" if value else ""
        else:
            joined[name] = len(out)
            out.append(arg)
    return out


def command_line_conflicts(argv: list[str]) -> None:
    """The combinations absl cannot see because a flagfile may set either flag: raises flags.ValidationError
    (one line naming the flag and the fix) for --val_images given on the command line with --folds=K.

    Args:
        argv: the command line as given (flagfiles not expanded); FLAGS parsed from it.
    """
    named = {arg[2:].partition("=")[0] for arg in argv[1:] if arg.startswith("--")}
    if FLAGS.folds and "val_images" in named:
        raise flags.ValidationError(f"--val_images={FLAGS.val_images} has no effect with --folds={FLAGS.folds} "
                                    f"(fold --fold validates on 1/{FLAGS.folds} of the images); drop --val_images, "
                                    "or drop --folds for one split")


def loss_stages(schedule: str) -> list[str]:
    """'a;b' -> ['a', 'b'], each checked like --loss (ValidationError naming the flag)."""
    try:
        return losses.parse_loss_schedule(schedule)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None


def format_profile_steps(steps: tuple[int, int] | None) -> str:
    """(20, 25) -> '20,25'; None -> '' (the inverse of parse_profile_steps)."""
    return "" if steps is None else ",".join(map(str, steps))


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'20,25' -> (20, 25); '' or a malformed value -> None."""
    if not text:
        return None
    try:
        start, stop = (int(part) for part in text.split(","))
    except ValueError:
        return None
    return (start, stop) if 0 <= start < stop else None


def _model_dir_ok(path):
    if path is None:
        return True  # required-ness is checked by the entry point
    if os.path.exists(path) and not os.path.isdir(path):
        raise flags.ValidationError(f"--model_dir={path} is a file; give a directory")
    parent = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise flags.ValidationError(f"--model_dir={path} is not writable ({parent})")
    return True


# ------------------------------------------------------------------ what a resume may change
# A rerun on a --model_dir that holds a run (a checkpoint or results) resumes it, so every run flag must equal
# the run's flags.cfg (a flag absent from an older run's flags.cfg counts as its default) -- except these,
# which change nothing the run has computed or will compute. train.check_resume_flags stops on any other
# difference; a change of one of these is written to flags.cfg and listed in record.json ("flag_changes").
RESUME_MAY_CHANGE = (
    "model_dir",             # where the run lives, not what it is: a moved or copied run directory resumes
    "data_dir",              # where the data lives: what it is, its fingerprint (record.json), is compared instead
    "strict",                # how bad files are treated: the examples trained on are compared by that fingerprint
    "restart_from_scratch",  # an instruction for this start, not a setting (never written to flags.cfg)
    "keep_checkpoints",      # bookkeeping
    "progress_every",        # logging and TensorBoard only: no effect on any weight or metric
    "summary_every_steps",
    "summary_images",
    "summary_worst_images",
    "profile_steps",
    "max_bad_steps",         # only when non-finite steps stop the run; a stopped run resumes where it was
    "extra_data_dir",        # where the extra training data lives: its fingerprint (in record.json) is compared
)
# --epochs may grow (more epochs; never fewer), as long as the epochs already trained keep their schedule: with
# --lr_schedule=cosine, --snapshot_cycles grows in step (more cycles of the same length: a snapshot ensemble
# gains snapshots); with --swa_epochs, the new averaging window starts after the old end. See growth_refusals.
GROWABLE = ("epochs", "snapshot_cycles")
# Instructions for one start, not settings of the run: left out of flags.cfg, so a later rerun from it (the
# way to resume) never restarts a run on its own.
NOT_RECORDED = ("restart_from_scratch",)


def without_effect() -> set[str]:
    """The run flags the other flags make irrelevant: --val_images under --folds=K (the fold decides the
    validation images). They are left out of flags.cfg and out of the resume comparison, so a fold run resumes
    from its flagfile or from the command it started with, and flags.cfg never names a value the run did not
    use (runs reproduce checks --val_images against record.json's count)."""
    return {"val_images"} if FLAGS.folds else set()


def _text(flag, value) -> str:
    """A flag value as flags.cfg (rundir.parse_flagfile) spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _same(flag, recorded: str | None) -> bool:
    """Whether a flags.cfg value equals the flag's value now; absent = the default (a flag newer than the run)."""
    if recorded is None:
        return flag.value == flag.default
    try:
        return flag.parser.parse(recorded) == flag.value
    except (ValueError, TypeError):
        return False


def growth_refusals(recorded: dict[str, str]) -> dict[str, str]:
    """Why the --epochs and --snapshot_cycles given cannot resume the run whose flags.cfg is `recorded`:
    {flag name: reason}, empty when they can (both as recorded, or grown without changing what the epochs
    already trained were trained with, so the grown run is bit for bit the run the new flags start fresh)."""
    try:
        epochs, cycles = (int(recorded.get(name, FLAGS[name].default)) for name in GROWABLE)
    except ValueError:
        return {name: "not a number in flags.cfg" for name in GROWABLE}
    refusals = {}
    if FLAGS.epochs < epochs:
        refusals["epochs"] = "may only grow"
    elif FLAGS.lr_schedule != "cosine" and FLAGS.snapshot_cycles != cycles:
        refusals["snapshot_cycles"] = "changes only with --lr_schedule=cosine, in step with --epochs"
    elif FLAGS.lr_schedule == "cosine" and FLAGS.epochs * cycles != epochs * FLAGS.snapshot_cycles:
        refusals["epochs" if FLAGS.epochs != epochs else "snapshot_cycles"] = (
            f"sets the cosine cycle length: keep {epochs // cycles} epochs per cycle, e.g. "
            f"--epochs={epochs // cycles * (cycles + 1)} --snapshot_cycles={cycles + 1}")
    if "epochs" not in refusals and FLAGS.epochs > epochs and FLAGS.swa_epochs and \
            FLAGS.epochs - FLAGS.swa_epochs < epochs:
        refusals["epochs"] = (f"sets the epochs --swa_epochs averages: the {FLAGS.swa_epochs} averaged must come "
                              f"after epoch {epochs}, so --epochs={epochs + FLAGS.swa_epochs} or more")
    return refusals


def resume_changes(recorded: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """Compares the flags given now with a run's flags.cfg (`recorded`, parsed). Returns the changes a resume
    may make, {name: [recorded, given]}, and one 'name: recorded -> given' text for each it may not."""
    allowed, refused, ignored = {}, [], without_effect()
    growth = growth_refusals(recorded)
    for flag in sorted(run_flags(), key=lambda f: f.name):
        if flag.name in ignored:
            continue
        was = recorded.get(flag.name)
        if _same(flag, was):
            continue
        shown_was = was if was is not None else f"{_text(flag, flag.default)} (default; not in flags.cfg)"
        now = _text(flag, flag.value) if flag.value is not None else "(none)"
        note = growth.get(flag.name)
        if flag.name in RESUME_MAY_CHANGE or (flag.name in GROWABLE and note is None):
            allowed[flag.name] = [was, now]
        else:
            refused.append(f"{flag.name}: {shown_was} -> {now}" + (f" ({note})" if note else ""))
    return allowed, refused


def run_flags() -> list:
    """The flags defined here, i.e. those that describe a run (not absl's own logging flags)."""
    return FLAGS.get_flags_for_module(__name__)


def run_flag_values() -> dict:
    """{name: value} of the run flags, for the HParams dashboard (lists as comma-separated text)."""
    return {flag.name: ",".join(map(str, flag.value)) if isinstance(flag.value, list) else flag.value
            for flag in run_flags() if flag.value is not None}


def flagfile_text() -> str:
    """The effective values of every run flag, as a flagfile: passing it back reproduces the run."""
    lines = ["# Effective flags of this run; `python -m salt_tf.train --flagfile=<this file>` resumes or",
             "# reproduces it (override --model_dir to reproduce elsewhere)."]
    left_out = set(NOT_RECORDED) | without_effect()
    for flag in sorted(run_flags(), key=lambda f: f.name):
        if flag.value is not None and flag.name not in left_out:
            lines.append(flag.serialize())
    return "\n".join(lines) + "\n"
