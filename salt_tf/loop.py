"""The epoch loop: train an epoch, evaluate, move the schedule, run the epoch-end actions, checkpoint.

    for each epoch from the checkpointed one to --epochs:
        for each batch of the epoch's dataset (order and augmentation fixed by seed and epoch):
            step.train_step (salt_tf/step.py: forward, loss, gradients, clip, apply)
            (every --summary_every_steps steps, per-variable statistics computed around the same step)
        evaluate: predict the WHOLE validation set, competition metric, loss, pixel IoU, best threshold
        schedule: LR x factor when the metric has not improved for `patience` epochs (or a snapshot
                  cycle ends: its snapshot is exported, see schedules.py)
        save: best checkpoint, the epoch-end actions (export best, snapshot), the metrics row and
              fingerprints, TensorBoard, and LAST the epoch checkpoint, which commits the epoch; console line

No Keras `fit`, no callbacks: the steps are `tf.function`s over our own variables, and everything between
them is plain Python a debugger can step through. Orbit's split: the `Trainer` owns the loop, when things
happen, resume, signals and profiling; it is given the `TrainStep` (what one step does), the checkpoints
(checkpoints.RunCheckpoints), the summaries (summaries.Summaries: tags, grids) and the epoch-end actions.
`run_dir_trainer` wires them for a run directory; without one (tools, tests) a Trainer writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from salt_tf import checkpoints as checkpoints_lib
from salt_tf import determinism, distribute, metrics, pipeline, progress, records, schedules, swa
from salt_tf.step import TrainStep
from salt_tf import rundir
from salt_tf.stop_signals import StopSignals
from salt_tf.summaries import Summaries


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How the loop runs. Every field is a train flag of the same name (configs.loop_config), whose default is
    the field's default here; `augmentation` gathers the augmentation flags."""
    epochs: int = 50
    batch_size: int = 32            # the global batch
    eval_batch_size: int = 64
    seed: int = 0
    augmentation: pipeline.Augmentation = pipeline.Augmentation()
    clip_norm: float = 0.0          # 0 = no clipping
    plateau_factor: float = 0.7
    plateau_patience: int = 5
    min_learning_rate: float = 1e-5
    early_stop_patience: int = 0    # 0 = never stop early
    keep_checkpoints: int = 2
    progress_every: int = 10        # steps between progress lines; 0 = none
    summary_every_steps: int = 100  # per-variable statistics and gradients every N steps; 0 = never
    summary_images: int = 8         # fixed validation images drawn every epoch; 0 = none
    summary_worst_images: int = 4   # worst-scored validation images drawn every epoch; 0 = none
    profile_steps: tuple[int, int] | None = None  # profile global steps [start, stop) into events/
    max_bad_steps: int = 20         # consecutive non-finite steps (skipped) before the run stops
    lr_schedule: str = "plateau"    # plateau | plateau_restart | cosine (see schedules.py)
    snapshot_cycles: int = 4        # cosine: number of cycles (and snapshots)
    loss_switch_epochs: tuple[int, ...] = ()  # plateau: epochs at which the next loss stage starts
    swa_epochs: int = 0             # average the weights of the last N epochs into <run_dir>/swa; 0 = off

    def averages(self, epoch: int) -> bool:
        """Whether epoch `epoch` (1-based) is one of the last --swa_epochs, whose weights are averaged."""
        return epoch > self.epochs - self.swa_epochs


class TrainingStopped(Exception):
    """The run stopped early on purpose; the message is one line for the user, `exit_code` the status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopAfterEpoch(Exception):
    """Raised by an epoch-end action to end the run after this epoch (a sweep's pruned trial): the loop still
    commits the epoch (metrics row, summaries, checkpoint), then raises it out of `Trainer.run`."""


# Extra epoch-end actions of every run_dir_trainer made inside `extra_epoch_end` (a sweep trial's report to
# its study): the train command's own code runs, and the run's bits do not depend on them.
_EXTRA_EPOCH_END: list = []


@contextlib.contextmanager
def extra_epoch_end(action: Callable[["EpochEnd"], None]):
    """Adds `action` after the run directory's own epoch-end actions of the trainers made in this block."""
    _EXTRA_EPOCH_END.append(action)
    try:
        yield action
    finally:
        _EXTRA_EPOCH_END.remove(action)


# ---------------------------------------------------------------------------------- evaluation


class Validation:
    """The validation set and its evaluation by a TrainStep's eval step."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, batch_size: int):
        """Args: images [N,101,101,C] and masks [N,101,101,1] float32 arrays; batch_size of the eval step."""
        self.images, self.masks = tf.constant(images), tf.constant(masks)
        self.truth = np.asarray(masks)[..., 0] > 0.5
        self.batch_size = batch_size

    def predict(self, step: TrainStep, stage: int = 0) -> dict[str, np.ndarray]:
        """The eval step's outputs over the whole set: "probabilities" [N,101,101], "loss" [N] (loss stage
        `stage`) and, with an image-level head, "has_salt" [N]."""
        batches = [step.eval_step(images, masks, stage) for images, masks in
                   pipeline.eval_dataset(self.images, self.masks, batch_size=self.batch_size)]
        return {name: np.concatenate([batch[name].numpy() for batch in batches]) for name in batches[0]}

    def evaluate(self, step: TrainStep, stage: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
        """Returns the validation results (val_loss, val_metric, ... as metrics.csv names them), the
        probabilities [N,101,101] and the per-image scores [N] behind them."""
        outputs = self.predict(step, stage)
        probabilities, losses = outputs["probabilities"], outputs["loss"]
        predicted = probabilities > 0.5
        image_scores = metrics.image_scores(self.truth, predicted)
        threshold, threshold_metric = metrics.best_threshold(self.truth, probabilities)
        results = {
            "val_loss": float(losses.mean()),
            "val_metric": float(image_scores.mean()),
            "val_pixel_iou": metrics.pixel_iou(self.truth, predicted),
            "val_best_threshold": threshold,
            "val_metric_at_best_threshold": threshold_metric,
        }
        for group, score in metrics.coverage_group_scores(self.truth, image_scores).items():
            results[f"val_metric_{group}"] = score
        if "has_salt" in outputs:  # the image-level head: how well it tells salt from empty images
            has_salt = self.truth.any(axis=(1, 2))
            results["val_image_accuracy"] = float(np.mean((outputs["has_salt"] > 0.5) == has_salt))
            results["val_image_auc"] = metrics.roc_auc(has_salt, outputs["has_salt"])
        return results, probabilities, image_scores


# ---------------------------------------------------------------------------------- the loop's state


class TrainingState:
    """The loop's own variables, checkpointed with the model and optimizer: epochs completed, skipped
    (non-finite) steps, the schedule, and with --swa_epochs the running weight sum."""

    def __init__(self, step: TrainStep, config: LoopConfig, train_images: int):
        """Creates the variables under the step's strategy scope (mirrored on every replica, like the model).

        Args:
          step: the TrainStep (its model, optimizer and strategy).
          config: the loop's settings (schedule, SWA).
          train_images: the number of training images (the schedule's steps per epoch).
        """
        self.model, self.optimizer = step.model, step.optimizer
        with step.strategy.scope():
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")  # epochs completed
            self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
            # Only with --swa_epochs, so checkpoints of other runs hold exactly what they held before.
            self.weight_average = swa.WeightAverage(step.model) if config.swa_epochs else None
            self.schedule = schedules.Schedule(
                config.lr_schedule, float(step.optimizer.learning_rate.numpy()), config.plateau_factor,
                config.plateau_patience, config.min_learning_rate, config.snapshot_cycles, config.epochs,
                pipeline.steps_per_epoch(train_images, config.batch_size))

    def checkpoint_items(self) -> dict:
        """{name: trackable} of the training state, for checkpoints.RunCheckpoints. The names are the
        checkpoint's keys: changing one makes older checkpoints unreadable."""
        items = dict(model=self.model, optimizer=self.optimizer, epoch=self.epoch, schedule=self.schedule,
                     skipped_steps=self.skipped_steps)
        if self.weight_average is not None:
            items["swa"] = self.weight_average
        return items


# ---------------------------------------------------------------------------------- epoch-end actions


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What an epoch-end action sees: the epoch just finished and its results."""
    epoch: int                          # its number, 1-based (= epochs completed)
    cycle: int                          # its snapshot cycle
    stage: int                          # its loss stage
    row: dict                           # its metrics row (metrics.csv)
    outcome: schedules.EpochOutcome     # improved? a snapshot cycle ended?
    model: tf.Module


class ExportBest:
    """Epoch-end action: when the validation metric improved, the model goes to <run_dir>/export (predict)."""

    def __init__(self, run_dir: str, export_config: dict):
        self.run_dir, self.export_config = run_dir, export_config

    def __call__(self, end: EpochEnd) -> None:
        if end.outcome.improved:
            checkpoints_lib.export(self.run_dir, end.model, dict(
                self.export_config, epoch=end.epoch, val_metric=end.row["val_metric"],
                threshold=end.row["val_best_threshold"]))


class ExportSnapshot:
    """Epoch-end action of a snapshot ensemble: plateau_restart exports a cycle's best weights so far, cosine
    the weights at a cycle's end, to <run_dir>/snapshots/snapshot-k."""

    def __init__(self, run_dir: str, export_config: dict, lr_schedule: str):
        self.run_dir, self.export_config, self.lr_schedule = run_dir, export_config, lr_schedule

    def __call__(self, end: EpochEnd) -> None:
        outcome, row = end.outcome, end.row
        config = dict(self.export_config, epoch=end.epoch, val_metric=row["val_metric"],
                      threshold=row["val_best_threshold"], cycle=end.cycle, loss_stage=end.stage)
        if self.lr_schedule == "plateau_restart" and outcome.improved_cycle:
            checkpoints_lib.export_snapshot(self.run_dir, end.cycle, end.model, config)
        elif self.lr_schedule == "cosine" and outcome.finished_cycle is not None:
            checkpoints_lib.export_snapshot(self.run_dir, outcome.finished_cycle, end.model, config)
        if outcome.finished_cycle is not None:
            logging.info("snapshot cycle %d ended at epoch %d", outcome.finished_cycle, end.epoch)


class RunHistory:
    """The metrics row of every epoch and the weight fingerprints after it: in memory, and with a run directory
    in its metrics.csv and fingerprints.json (the metrics-row action). The loop reads it back on resume (the
    final summary covers earlier sessions), so it is given to the Trainer apart from the other actions."""

    def __init__(self, run_dir: str | None = None):
        self.run_dir = run_dir
        self.rows: list[dict] = []
        self.fingerprints: dict[int, dict[str, str]] = {}

    def resume(self, epochs_done: int) -> None:
        """Loads the rows of the epochs the resumed checkpoint holds; rows of later epochs belong to work that
        is about to be redone."""
        if self.run_dir is None:
            return
        self.rows = [row for row in records.read_metrics(self.run_dir).to_dict("records")
                     if row["epoch"] <= epochs_done]
        self.fingerprints = {epoch: value for epoch, value in records.read_fingerprints(self.run_dir).items()
                             if epoch <= epochs_done}

    def add(self, row: dict, fingerprints: dict[str, str]) -> None:
        """Appends an epoch's row and fingerprints (and rewrites both files)."""
        self.rows.append(row)
        self.fingerprints[row["epoch"]] = fingerprints
        if self.run_dir is not None:
            records.write_metrics(self.run_dir, self.rows)
            records.write_fingerprints(self.run_dir, self.fingerprints)


class ExportWeightAverage:
    """The end of a --swa_epochs run: the averaged model goes to <run_dir>/swa, an export like export/."""

    def __init__(self, run_dir: str, export_config: dict):
        self.directory, self.export_config = os.path.join(run_dir, rundir.SWA_DIR), export_config

    def exported(self, epoch: int) -> dict | None:
        """The export's config if an earlier session wrote it at `epoch` (a rerun after the last checkpoint),
        else None. An export of an earlier epoch is the average of a run since grown (--epochs raised): it is
        kept, moved to rundir.retired_swa_dir, and None returned."""
        if not rundir.is_export(self.directory):
            return None
        config = checkpoints_lib.read_export_config(self.directory)
        if config.get("epoch") == epoch:
            return config
        retired = rundir.retired_swa_dir(os.path.dirname(self.directory), config.get("epoch"))
        os.replace(self.directory, retired)
        logging.info("the run grew: its weight average until epoch %s moved to %s", config.get("epoch"), retired)
        return None

    def __call__(self, model: tf.Module, epoch: int, results: dict, count: int) -> None:
        checkpoints_lib.export_to(self.directory, model, dict(
            self.export_config, epoch=epoch, val_metric=results["val_metric"],
            threshold=results["val_best_threshold"], swa_epochs_averaged=count))


# ---------------------------------------------------------------------------------- the trainer


class Trainer:
    """The epoch loop over a TrainStep: resume, epochs, evaluation, schedule, signals, profiling."""

    def __init__(self, step: TrainStep, config: LoopConfig, train_arrays, validation: Validation, *,
                 state: TrainingState | None = None, checkpoints: checkpoints_lib.RunCheckpoints | None = None,
                 summaries: Summaries | None = None, epoch_end: Sequence[Callable[[EpochEnd], None]] = (),
                 history: RunHistory | None = None, weight_average_export: ExportWeightAverage | None = None,
                 resume_checkpoint: str | None = None, init_weights: str | None = None,
                 stop_signals: StopSignals | None = None):
        """Args:
          step: the train step (model, optimizer, loss stages, strategy, batch size).
          config: the loop's settings; its batch_size must be the step's.
          train_arrays: (images, masks) arrays of the training set.
          validation: the validation set.
          state: the loop's variables (default: new ones); required with `checkpoints`, which hold them.
          checkpoints: where the training state is saved and restored (None: nowhere).
          summaries: TensorBoard (None: nothing written).
          epoch_end: actions called in order at the end of every epoch, before its checkpoint commits it.
          history: the metrics rows (default: in memory only).
          weight_average_export: with --swa_epochs, where the averaged model goes at the end.
          resume_checkpoint: the checkpoint to continue from (checkpoints.resume_point picks it; None = a
            fresh start).
          init_weights: an export folder whose model weights a fresh run starts from (ignored on resume).
          stop_signals: the process's stop request, installed since start-up by the train command (default: a
            new one, installed by `run` for its duration).
        """
        if config.batch_size != step.batch_size:
            raise ValueError(f"LoopConfig.batch_size={config.batch_size} but the TrainStep's is {step.batch_size}")
        if checkpoints is not None and state is None:
            raise ValueError("checkpoints hold a TrainingState: pass the one they were built over as `state`")
        self.step, self.config, self.validation = step, config, validation
        self.train_images, self.train_masks = (tf.constant(a) for a in train_arrays)
        self.state = state or TrainingState(step, config, int(self.train_images.shape[0]))
        self.checkpoints = checkpoints
        self.summaries = summaries or Summaries(None)
        self.epoch_end = list(epoch_end)
        self.history = history or RunHistory()
        self.weight_average_export = weight_average_export
        self.resume_checkpoint, self.init_weights = resume_checkpoint, init_weights
        self.stage = 0  # the loss stage of the current epoch
        self.stop_signals = stop_signals or StopSignals()
        self._profiling = False

    @property
    def run_dir(self) -> str | None:
        """The directory this process writes its checkpoints under (None without checkpoints)."""
        return os.path.dirname(self.checkpoints.last.directory) if self.checkpoints else None

    def global_step(self) -> int:
        """Training steps taken, skipped (non-finite) ones included: the x axis of every summary."""
        return int(self.step.optimizer.iterations.numpy()) + int(self.state.skipped_steps.numpy())

    def evaluate(self) -> tuple[dict, np.ndarray, np.ndarray]:
        """The validation results with the current loss stage (Validation.evaluate)."""
        return self.validation.evaluate(self.step, self.stage)

    # ---------------------------------------------------------------------------------- run

    def run(self) -> dict:
        """Trains from the resumed checkpoint (or from scratch) to `epochs`.

        SIGINT/SIGTERM finish the current step, write a checkpoint and raise TrainingStopped.

        Returns:
          The final summary: epochs completed, best epoch and metric, final fingerprint, times (and with
          --swa_epochs the averaged model's metric).
        """
        installed_here = self.stop_signals.install()
        try:
            return self._run()
        finally:
            if installed_here:
                self.stop_signals.restore()
            self._profile(None)
            self.summaries.close()

    def _run(self) -> dict:
        first_epoch = self._start()
        run_start = time.perf_counter()
        for epoch in range(first_epoch, self.config.epochs):
            row, outcome, cycle, (probabilities, image_scores) = self._train_and_evaluate(epoch)
            self._end_epoch(epoch + 1, row, outcome, cycle, probabilities, image_scores)
            if self._should_stop_early(epoch + 1):
                logging.info("early stop: no improvement for %d epochs", self.config.early_stop_patience)
                break
            if epoch + 1 < self.config.epochs and self._stop_requested():
                self._stopped(f"after epoch {epoch + 1}")
        summary = self._final_summary(self.history.rows, time.perf_counter() - run_start)
        if self.state.weight_average is not None and int(self.state.weight_average.count.numpy()):
            summary.update(self._export_weight_average())
        return summary

    def _drop_stale_weight_average(self, first_epoch: int) -> None:
        """A run resumed with more --epochs (flags.growth_refusals: its new averaging window starts after the
        old end) holds the sums of its old window in the checkpoint; they are dropped, so the average is that
        of the last --swa_epochs of the grown run, as a fresh run of the same flags averages."""
        average = self.state.weight_average
        if average is not None and int(average.count.numpy()) and not self.config.averages(first_epoch):
            logging.info("--epochs grew to %d: the weight average of %d epochs before epoch %d is dropped; the "
                         "last %d epochs are averaged", self.config.epochs, int(average.count.numpy()), first_epoch,
                         self.config.swa_epochs)
            average.reset()

    def _start(self) -> int:
        """Restores the resumed checkpoint, or starts fresh (--init_checkpoint's weights, the step-0
        checkpoint); returns the epochs already completed."""
        restored = self.resume_checkpoint
        if restored:
            self.checkpoints.restore(restored)
        first_epoch = int(self.state.epoch.numpy())
        self.history.resume(first_epoch)
        if restored:
            logging.info("resumed from %s at epoch %d", restored, first_epoch)
            self._drop_stale_weight_average(first_epoch)
        else:
            if self.init_weights:
                checkpoints_lib.restore_exported_weights(self.init_weights, self.step.model)
                logging.info("started from the weights of %s", self.init_weights)
            # The starting state is checkpointed before any epoch writes its files: a run directory with
            # results always has a checkpoint to resume from (see the commit order in _end_epoch).
            self._save()
        if first_epoch == 0:
            # The starting model's validation metric (untrained, or --init_checkpoint's): the baseline every
            # epoch is compared with.
            baseline, _, _ = self.evaluate()
            self.summaries.start(baseline)
            logging.info("epoch 0 (starting weights)  val_loss %.4f  val_metric %.4f", baseline["val_loss"],
                         baseline["val_metric"])
        return first_epoch

    def _train_and_evaluate(self, epoch: int) -> tuple[dict, schedules.EpochOutcome, int, tuple]:
        """Trains epoch `epoch` (0-based), evaluates, moves the schedule; returns the epoch's metrics row, the
        schedule's outcome, the snapshot cycle and (validation probabilities, per-image scores)."""
        schedule, optimizer = self.state.schedule, self.step.optimizer
        cycle = schedule.current_cycle(epoch)
        self.stage = self._loss_stage(epoch, cycle)
        first_step_lr = schedule.step_learning_rate(self.global_step())
        row = {"epoch": epoch + 1, "cycle": cycle, "loss_stage": self.stage,
               "learning_rate": float(optimizer.learning_rate.numpy()) if first_step_lr is None
               else first_step_lr}
        row.update(self.train_epoch(epoch))
        eval_start = time.perf_counter()
        results, probabilities, image_scores = self.evaluate()
        row.update(results)
        row["eval_seconds"] = time.perf_counter() - eval_start
        outcome = schedule.end_epoch(epoch + 1, row["val_metric"], optimizer.learning_rate)
        self.state.epoch.assign(epoch + 1)
        if self.state.weight_average is not None and self.config.averages(epoch + 1):
            self.state.weight_average.add(self.step.model)
        return row, outcome, cycle, (probabilities, image_scores)

    def _end_epoch(self, epoch: int, row: dict, outcome: schedules.EpochOutcome, cycle: int,
                   probabilities: np.ndarray, image_scores: np.ndarray) -> None:
        """Writes what epoch `epoch` (1-based) produced. The epoch's files first, its checkpoint last: the
        checkpoint commits the epoch. A crash or a failed write before it resumes from the previous checkpoint
        and redoes the epoch, rewriting each file with the same content (the resume drops rows past the
        checkpoint, so metrics.csv never holds an epoch twice); after it, every file of the epoch is in place."""
        fingerprints = determinism.variable_fingerprints(self.step.model.variables)
        row["weights_sha256"] = determinism.combined_fingerprint(fingerprints)
        step = self.global_step()
        if outcome.improved and self.checkpoints is not None:
            self.checkpoints.save_best(step)
        end = EpochEnd(epoch=epoch, cycle=cycle, stage=self.stage, row=row, outcome=outcome, model=self.step.model)
        stop = None
        for action in self.epoch_end:
            try:
                action(end)
            except StopAfterEpoch as e:  # raised after the epoch is committed below
                stop = e
        self.history.add(row, fingerprints)
        self.summaries.epoch(row, float(self.state.schedule.best.numpy()), step)
        self.summaries.validation_images(self.validation.images.numpy()[..., 0], self.validation.truth,
                                         probabilities, image_scores, step)
        self.summaries.flush()
        self._save(step)
        self._log_epoch(row, outcome.improved)
        if stop is not None:
            raise stop

    # ---------------------------------------------------------------------------------- one epoch

    def train_epoch(self, epoch: int) -> dict:
        """Trains epoch `epoch` (0-based), from where an interrupted session left it.

        Returns:
          The epoch's training columns of the metrics row: train_<output> means over its finite steps,
          train_skipped_steps, train_seconds, train_images_per_second.
        """
        steps = pipeline.steps_per_epoch(int(self.train_images.shape[0]), self.config.batch_size)
        # A resumed epoch continues at the batch it stopped at, with the same batches (they depend on
        # seed and epoch only) and the sums of the steps already done.
        resumed = self.checkpoints.partial_epoch.read() if self.checkpoints else checkpoints_lib.EpochProgress()
        done, sums, finite_steps = resumed.steps, resumed.sums, resumed.finite_steps
        seconds_before = resumed.seconds
        dataset = self.step.strategy.distribute_datasets_from_function(
            lambda input_context: pipeline.train_dataset(
                self.train_images, self.train_masks, batch_size=self.config.batch_size, seed=self.config.seed,
                epoch=epoch, augmentation=self.config.augmentation, start_step=done, input_context=input_context))
        global_step = self.global_step()
        every = self.config.summary_every_steps if self.summaries.enabled else 0
        consecutive_bad = 0
        # Steps done, images/s and the time left in the epoch and the run: a live bar on a terminal, a log line
        # every --progress_every steps otherwise (progress.py); wall-clock only, never touches the step.
        display = progress.Progress(
            steps, label=f"epoch {epoch + 1}", unit="step", every=self.config.progress_every,
            items_per_unit=self.config.batch_size, remaining_after=(self.config.epochs - epoch - 1) * steps,
        ) if self.config.progress_every else None
        if display:
            display.update(done)
        start = time.perf_counter()
        for step, (images, masks) in enumerate(dataset, start=done + 1):
            self._profile(global_step)
            outputs = self._train_one(images, masks, global_step, summarize=bool(every) and global_step % every == 0)
            global_step += 1
            if bool(outputs.pop("finite")):
                consecutive_bad = 0
                finite_steps += 1
                for name, value in outputs.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
            else:
                consecutive_bad += 1
                self.state.skipped_steps.assign_add(1)
                logging.warning("epoch %d step %d: non-finite loss or gradient (loss %s); step skipped, %d in a "
                                "row", epoch + 1, step, float(outputs["loss"]), consecutive_bad)
                if consecutive_bad >= self.config.max_bad_steps:
                    raise self._non_finite_stop(consecutive_bad, epoch, step)
            if display:
                display.update(step, {"loss": sums.get("loss", math.nan) / max(finite_steps, 1)})
            if step < steps and self._stop_requested():
                self._stop_inside_epoch(epoch, step, steps, checkpoints_lib.EpochProgress(
                    steps=step, sums=sums, finite_steps=finite_steps,
                    seconds=seconds_before + time.perf_counter() - start))
        if self.checkpoints:
            self.checkpoints.partial_epoch.clear()
        results = {f"train_{name}": total / max(finite_steps, 1) for name, total in sums.items()}
        results["train_skipped_steps"] = steps - finite_steps
        results["train_seconds"] = seconds_before + time.perf_counter() - start
        results["train_images_per_second"] = (steps - done) * self.config.batch_size / (time.perf_counter() - start)
        return results

    def _train_one(self, images, masks, global_step: int, summarize: bool) -> dict:
        """One step at the schedule's learning rate; on a summary step, with the per-variable statistics
        computed around it (separate compiled functions: the step's graph is the same either way)."""
        learning_rate = self.state.schedule.step_learning_rate(global_step)
        if learning_rate is not None:
            self.step.optimizer.learning_rate.assign(learning_rate)
        if not summarize:
            return self.step.train_step(images, masks, self.stage)[0]
        values_before = self.step.snapshot()
        outputs, gradients = self.step.train_step(images, masks, self.stage)
        model = self.step.model
        self.summaries.step_statistics(
            dict(outputs, learning_rate=self.step.optimizer.learning_rate),
            self.step.variable_statistics(gradients, values_before),
            model.trainable_variables, model.non_trainable_variables, global_step)
        return outputs

    def _loss_stage(self, epoch: int, cycle: int) -> int:
        """Which loss stage trains epoch `epoch` (0-based): the cycle's, or by --loss_switch_epochs."""
        last = len(self.step.loss_stages) - 1
        if self.config.lr_schedule != "plateau":
            return min(cycle, last)
        return min(sum(epoch >= e for e in self.config.loss_switch_epochs), last)

    # ---------------------------------------------------------------------------------- stopping

    def _save(self, step: int | None = None) -> str | None:
        """Saves the training state (a no-op without checkpoints); returns the checkpoint's path."""
        if self.checkpoints is None:
            return None
        return self.checkpoints.save(self.global_step() if step is None else step)

    def _stop_inside_epoch(self, epoch: int, step: int, steps: int, progress) -> None:
        """A stop signal mid-epoch: the epoch's progress goes into a checkpoint, then TrainingStopped."""
        if self.checkpoints is None:
            self._stopped(f"at epoch {epoch + 1} step {step}/{steps} (no checkpoints: nothing saved)")
        self.checkpoints.partial_epoch.write(progress)
        # Named in the run directory resumed from: a non-chief worker's own copy is temporary.
        path = os.path.join(self.checkpoints.restore_dir, os.path.basename(self._save()))
        self._stopped(f"at epoch {epoch + 1} step {step}/{steps}; checkpoint {path}")

    def _non_finite_stop(self, count: int, epoch: int, step: int) -> TrainingStopped:
        """The stop after --max_bad_steps non-finite steps in a row, saying truthfully what is kept. Rerunning the
        same command would repeat the same steps: the way on is other settings, hence a new run directory."""
        latest = self.checkpoints.last.latest_checkpoint if self.checkpoints else None
        done = int(self.state.epoch.numpy())
        message = (f"{count} consecutive steps had a non-finite loss or gradient (epoch {epoch + 1}, step {step}); "
                   "stopped. ")
        start_again = (f"start again with a lower --learning_rate or a --clip_norm, with a new --model_dir (or "
                       f"after deleting {self.run_dir}).")
        if latest is None:
            message += "No checkpoint had been written: " + start_again
        elif done == 0:
            message += "No epoch had finished, so nothing is lost: " + start_again
        else:
            message += (f"The last good checkpoint, {os.path.basename(latest)} ({done} epoch"
                        f"{'s' if done > 1 else ''} finished), is intact; to go on with a lower --learning_rate or "
                        f"a --clip_norm, start a new run from its best weights with --init_checkpoint={self.run_dir} "
                        "and a new --model_dir.")
        return TrainingStopped(message, exit_code=3)

    def _should_stop_early(self, epochs_done: int) -> bool:
        patience = self.config.early_stop_patience
        return patience > 0 and epochs_done - int(self.state.schedule.best_epoch.numpy()) >= patience

    def _stop_requested(self) -> bool:
        """A stop signal arrived here, or (multi-worker) on any worker: all workers stop at the same step.
        The agreed answer is returned, not the local flag: a signal handled during the vote counts at the
        next step, on every worker alike."""
        requested = distribute.any_worker(self.step.strategy, self.stop_signals.signum is not None)
        if requested:
            self.stop_signals.request(signal.SIGTERM)  # another worker's signal (a no-op after our own)
        return requested

    def _stopped(self, where: str) -> None:
        signum = self.stop_signals.signum
        raise TrainingStopped(f"stopped by {signal.Signals(signum).name} {where}; run the same command to resume",
                              exit_code=128 + signum)

    # ---------------------------------------------------------------------------------- edges

    def _export_weight_average(self) -> dict:
        """The mean of the averaged epochs' weights, with batch-norm statistics recomputed on the (unaugmented)
        training images, evaluated and exported (ExportWeightAverage); the model's own weights are left as they
        were. Done again by a rerun if a crash came between the last checkpoint and this export."""
        average, model = self.state.weight_average, self.step.model
        count = int(average.count.numpy())
        epoch = int(self.state.epoch.numpy())
        exported = self.weight_average_export.exported(epoch) if self.weight_average_export else None
        if exported is not None:
            return {"swa_epochs_averaged": count, "swa_val_metric": exported.get("val_metric")}
        with average.applied(model):
            seen = swa.recompute_batch_norm(model, (images for images, _ in pipeline.eval_dataset(
                self.train_images, self.train_masks, batch_size=self.config.batch_size)))
            results, _, _ = self.evaluate()
            if self.weight_average_export:
                self.weight_average_export(model, epoch, results, count)
        self.summaries.weight_average(results["val_metric"], self.global_step())
        self.summaries.flush()
        logging.info("weight average of the last %d epochs (batch norm recomputed on %d images): val_metric %.4f "
                     "(%.4f at threshold %.2f)%s", count, seen, results["val_metric"],
                     results["val_metric_at_best_threshold"], results["val_best_threshold"],
                     f"; exported to {self.weight_average_export.directory}" if self.weight_average_export else "")
        return {"swa_epochs_averaged": count, "swa_val_metric": results["val_metric"],
                "swa_val_metric_at_best_threshold": results["val_metric_at_best_threshold"]}

    def _profile(self, global_step: int | None) -> None:
        """Starts/stops the TensorFlow profiler around --profile_steps (None: stop if running), into the
        summaries' events/ folder (no profile without one)."""
        if self.config.profile_steps is None or not self.summaries.enabled:
            return
        start, stop = self.config.profile_steps
        if global_step == start and not self._profiling:
            tf.profiler.experimental.start(self.summaries.root)
            self._profiling = True
        elif self._profiling and (global_step is None or global_step >= stop):
            tf.profiler.experimental.stop()
            self._profiling = False
            logging.info("profile of steps %d-%d written to %s", start, stop - 1, self.summaries.root)

    def _log_epoch(self, row: dict, improved: bool) -> None:
        logging.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_metric %.4f%s  (%.4f at threshold %.2f)  "
            "lr %.2e  %.0fs  %.1f img/s", row["epoch"], self.config.epochs, row["train_loss"], row["val_loss"],
            row["val_metric"], " *" if improved else "", row["val_metric_at_best_threshold"],
            row["val_best_threshold"], row["learning_rate"], row["train_seconds"] + row["eval_seconds"],
            row["train_images_per_second"])

    def _final_summary(self, history: list[dict], seconds: float) -> dict:
        best = max(history, key=lambda r: r["val_metric"]) if history else {}
        return {
            "epochs_completed": int(self.state.epoch.numpy()),
            "best_epoch": best.get("epoch"),
            "best_val_metric": best.get("val_metric"),
            "best_val_metric_at_best_threshold": best.get("val_metric_at_best_threshold"),
            "best_threshold": best.get("val_best_threshold"),
            "final_weights_sha256": history[-1]["weights_sha256"] if history else None,
            "wall_seconds_this_session": seconds,
            "train_seconds_total": float(sum(r["train_seconds"] + r["eval_seconds"] for r in history)),
        }


def run_dir_trainer(step: TrainStep, config: LoopConfig, train_arrays, val_arrays, run_dir: str, *,
                    restore_dir: str | None = None, export_config: dict | None = None, hparams: dict | None = None,
                    resume_checkpoint: str | None = None, init_weights: str | None = None,
                    stop_signals: StopSignals | None = None) -> Trainer:
    """A Trainer that writes run directory `run_dir`: its checkpoints, events, export/, snapshots/, swa/,
    metrics.csv and fingerprints.json. Call it outside `strategy.scope()` (checkpoints.PartialEpoch).

    Args:
      step: the train step; its model and optimizer were created under its strategy's scope.
      config: the loop's settings.
      train_arrays, val_arrays: (images, masks) arrays of the training and validation sets.
      run_dir: where this process writes.
      restore_dir: the run directory whose checkpoints it resumes (default: run_dir; a non-chief worker
        writes to a temporary directory but resumes from the chief's).
      export_config: what every export's model.json holds besides epoch, metric and threshold (the model's
        config, use_depth, precision).
      hparams: {flag: value} for TensorBoard's HParams dashboard.
      resume_checkpoint, init_weights, stop_signals: as Trainer's.

    Returns:
      The Trainer; `run()` trains.
    """
    export_config = export_config or {}
    state = TrainingState(step, config, len(train_arrays[0]))
    checkpoints = checkpoints_lib.RunCheckpoints(run_dir, config.keep_checkpoints, restore_dir=restore_dir,
                                                 **state.checkpoint_items())
    summaries = Summaries(run_dir, images=config.summary_images, worst_images=config.summary_worst_images,
                          hparams=hparams)
    return Trainer(step, config, train_arrays, Validation(*val_arrays, batch_size=config.eval_batch_size),
                   state=state, checkpoints=checkpoints, summaries=summaries,
                   epoch_end=[ExportBest(run_dir, export_config),
                              ExportSnapshot(run_dir, export_config, config.lr_schedule), *_EXTRA_EPOCH_END],
                   history=RunHistory(run_dir),
                   weight_average_export=ExportWeightAverage(run_dir, export_config) if config.swa_epochs else None,
                   resume_checkpoint=resume_checkpoint, init_weights=init_weights, stop_signals=stop_signals)
