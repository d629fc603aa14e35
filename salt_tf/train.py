"""Entry point: `python -m salt_tf.train --flagfile=flags/<name>.cfg [--flag=value ...]`.

Flags -> determinism -> data and split -> model, loss, optimizer -> loop -> run record. The logic lives in
the modules it calls; this file only wires them together.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags, logging

from salt_tf import flags as salt_flags

FLAGS = flags.FLAGS


def prepare_run_dir(run_dir: str) -> None:
    """Creates the run directory and writes the effective flagfile (a resume rewrites the same text)."""
    from salt_tf import records

    os.makedirs(run_dir, exist_ok=True)
    records.atomic_write_text(os.path.join(run_dir, records.FLAGS_FILE), salt_flags.flagfile_text())


def load_split_data(run_dir: str):
    """The labelled set and its train/validation split; the split is read back from the run directory on
    resume, so a run always validates on the images it started with."""
    from salt_tf.data import kaggle, splits, synthetic
    from salt_tf import records

    if FLAGS.dataset == "demo":
        synthetic.ensure_demo_data(FLAGS.data_dir, FLAGS.demo_images, seed=0)
    data = kaggle.load_labelled(FLAGS.data_dir)
    split_path = os.path.join(run_dir, records.SPLIT_FILE)
    if os.path.isfile(split_path):
        split = splits.read_split(split_path)
    else:
        split = splits.stratified_split(list(data.ids), data.coverage(), FLAGS.val_images, FLAGS.split_seed)
        splits.write_split(split, split_path)
    train_ids = list(split.loc[split["role"] == "train", "id"])
    val_ids = list(split.loc[split["role"] == "val", "id"])
    return data.subset(train_ids), data.subset(val_ids), kaggle.fingerprint(FLAGS.data_dir, list(data.ids))


def build_optimizer():
    import keras

    common = dict(learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay or None)
    if FLAGS.optimizer == "adam":
        optimizer = keras.optimizers.Adam(**common)
    else:
        optimizer = keras.optimizers.SGD(momentum=FLAGS.momentum, nesterov=FLAGS.nesterov, **common)
    if FLAGS.weight_decay:
        # Decay the kernels only: shrinking biases and batch-norm scales regularizes nothing.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def run() -> dict:
    """Runs (or resumes) the training described by FLAGS; returns the final summary."""
    run_dir = FLAGS.model_dir
    prepare_run_dir(run_dir)

    # Before TensorFlow runs its first op: thread pools are fixed then.
    from salt_tf import determinism

    applied = determinism.configure(FLAGS.seed, FLAGS.deterministic)

    from salt_tf import losses, loop, model as model_lib, pipeline, records

    started = time.time()
    train_data, val_data, data_fingerprint = load_split_data(run_dir)
    logging.info("data: %d training, %d validation images from %s", len(train_data.ids), len(val_data.ids),
                 FLAGS.data_dir)
    model_config = model_lib.ModelConfig(
        base_width=FLAGS.base_width, depth=FLAGS.depth, blocks_per_level=FLAGS.blocks_per_level, se=FLAGS.se,
        se_ratio=FLAGS.se_ratio, dropout=FLAGS.dropout, input_channels=2 if FLAGS.use_depth else 1)
    model = model_lib.build_model(model_config)
    logging.info("model: %d parameters, %.2f GFLOP forward per image", model_lib.count_params(model),
                 model_lib.forward_flops_per_image(model_config) / 1e9)
    loss_fn = losses.CombinedLoss(FLAGS.loss, focal_gamma=FLAGS.focal_gamma, focal_alpha=FLAGS.focal_alpha)
    config = loop.LoopConfig(
        epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, eval_batch_size=FLAGS.eval_batch_size,
        seed=FLAGS.seed, augmentation=pipeline.Augmentation(hflip=FLAGS.hflip, translate=FLAGS.translate),
        clip_norm=FLAGS.clip_norm, plateau_factor=FLAGS.plateau_factor,
        plateau_patience=FLAGS.plateau_patience, min_learning_rate=FLAGS.min_learning_rate,
        early_stop_patience=FLAGS.early_stop_patience, keep_checkpoints=FLAGS.keep_checkpoints,
        progress_every=FLAGS.progress_every, summary_every_steps=FLAGS.summary_every_steps,
        summary_images=FLAGS.summary_images, summary_worst_images=FLAGS.summary_worst_images,
        profile_steps=salt_flags.parse_profile_steps(FLAGS.profile_steps))
    records.update_record(run_dir, code=records.code_version(), environment=determinism.environment(),
                          determinism=applied, data={"dir": os.path.abspath(FLAGS.data_dir),
                                                     "fingerprint": data_fingerprint,
                                                     "train_images": len(train_data.ids),
                                                     "val_images": len(val_data.ids)},
                          started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)))
    trainer = loop.Trainer(
        model=model, optimizer=build_optimizer(), loss_fn=loss_fn,
        train_arrays=pipeline.to_arrays(train_data, FLAGS.use_depth),
        val_arrays=pipeline.to_arrays(val_data, FLAGS.use_depth), config=config, run_dir=run_dir,
        export_config={"model": dataclasses.asdict(model_config), "use_depth": FLAGS.use_depth},
        hparams=salt_flags.run_flag_values())
    summary = trainer.run()
    records.update_record(run_dir, summary=summary,
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()))
    logging.info("done: best val_metric %.4f at epoch %s (%.4f at threshold %.2f); run directory %s",
                 summary["best_val_metric"] or 0.0, summary["best_epoch"],
                 summary["best_val_metric_at_best_threshold"] or 0.0, summary["best_threshold"] or 0.5, run_dir)
    return summary


class _QuietSaverLogs:
    """Drops TensorFlow's per-save 'Sharding callback duration' info lines, which bury the epoch lines."""

    def filter(self, record):
        return "Sharding callback" not in record.getMessage()


def parse_flags(argv: list[str]) -> list[str]:
    """Parses argv into FLAGS; a bad flag ends the program with one line naming it (exit status 2)."""
    try:
        remaining = FLAGS(argv)
        if FLAGS.model_dir is None:
            raise flags.IllegalFlagValueError("--model_dir is required: the run directory to write (or resume)")
        return remaining
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value")
    from salt_tf.data.kaggle import DataError

    logging.get_absl_handler().addFilter(_QuietSaverLogs())
    try:
        run()
    except DataError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    salt_flags.define_flags()
    app.run(main, flags_parser=parse_flags)
