"""The training loop: the train step, the evaluation, and the epoch loop. Read it top to bottom.

    for each epoch from the checkpointed one to --epochs:
        for each batch of the epoch's dataset (order and augmentation fixed by seed and epoch):
            train_step: forward (batch-norm in training mode), loss, gradients, clip, apply
                        (under tf.distribute: each replica does its share of the batch, the sums are applied)
            (every --summary_every_steps steps, per-variable statistics computed around the same step)
        evaluate: predict the WHOLE validation set, competition metric, loss, pixel IoU, best threshold
        schedule: LR x factor when the metric has not improved for `patience` epochs (or a snapshot
                  cycle ends: its snapshot is exported, see schedules.py)
        save: best checkpoint and export (when the metric improved), snapshot, metrics.csv row, fingerprints,
              TensorBoard scalars, and LAST the epoch checkpoint, which commits the epoch; console line

No Keras `fit`, no callbacks: the steps are `tf.function`s over our own variables, and everything between
them is plain Python a debugger can step through.

One code path serves one device and many: `strategy` is `tf.distribute.get_strategy()` (the default, one
device) unless train.py created another (distribute.py); with one replica `strategy.run` just calls the
function and the reductions add no op, so the default run is the plain single-device step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from salt_tf import checkpoints, determinism, distribute, metrics, pipeline, records, schedules, summaries, swa
from salt_tf import model as model_lib
from salt_tf import rundir
from salt_tf.summaries import Summaries


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size: int
    eval_batch_size: int
    seed: int
    augmentation: pipeline.Augmentation
    clip_norm: float = 0.0          # 0 = no clipping
    plateau_factor: float = 0.7
    plateau_patience: int = 5
    min_learning_rate: float = 1e-5
    early_stop_patience: int = 0    # 0 = never stop early
    keep_checkpoints: int = 2
    progress_every: int = 10        # steps between progress lines; 0 = none
    summary_every_steps: int = 0    # per-variable statistics and gradients every N steps; 0 = never
    summary_images: int = 8         # fixed validation images drawn every epoch; 0 = none
    summary_worst_images: int = 4   # worst-scored validation images drawn every epoch; 0 = none
    profile_steps: tuple[int, int] | None = None  # profile global steps [start, stop) into events/
    max_bad_steps: int = 20         # consecutive non-finite steps (skipped) before the run stops
    lr_schedule: str = "plateau"    # plateau | plateau_restart | cosine (see schedules.py)
    snapshot_cycles: int = 1        # cosine: number of cycles (and snapshots)
    loss_switch_epochs: tuple[int, ...] = ()  # plateau: epochs at which the next loss stage starts
    swa_epochs: int = 0             # average the weights of the last N epochs into <run_dir>/swa; 0 = off


class TrainingStopped(Exception):
    """The run stopped early on purpose; the message is one line for the user, `exit_code` the status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Trainer:
    """Owns the step functions and the epoch loop for one run directory."""

    def __init__(self, *, model: tf.Module, optimizer, loss_fn: Callable | Sequence[Callable], train_arrays,
                 val_arrays, config: LoopConfig, run_dir: str, export_config: dict | None = None,
                 hparams: dict | None = None, strategy: tf.distribute.Strategy | None = None,
                 resume_from: str | None = None, resume_checkpoint: str | None = None,
                 init_weights: str | None = None):
        """`model` and `optimizer` must have been created under `strategy.scope()`. `run_dir` is where this
        process writes; `resume_from` the run directory whose checkpoints it resumes (default: run_dir; a
        non-chief worker writes to a temporary directory but resumes from the chief's), `resume_checkpoint`
        the checkpoint there to continue from (checkpoints.resume_point picks it; None = a fresh start).
        `init_weights`: an export folder whose model weights a fresh run starts from (ignored on resume)."""
        self.model, self.optimizer, self.config = model, optimizer, config
        self.strategy = strategy or tf.distribute.get_strategy()
        # Loss stages: one loss, or one per snapshot cycle / per --loss_switch_epochs interval.
        self.loss_stages = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]
        self.run_dir, self.init_weights, self.resume_checkpoint = run_dir, init_weights, resume_checkpoint
        self.export_config = export_config or {}
        self.train_images, self.train_masks = (tf.constant(a) for a in train_arrays)
        self.val_images, self.val_masks = (tf.constant(a) for a in val_arrays)
        self.val_truth = val_arrays[1][..., 0] > 0.5
        self.display_indices = summaries.pick_display_indices(self.val_truth, config.summary_images)
        self.hparams = hparams

        # Batch-norm moving statistics: each replica updates its own copy; averaged after every step.
        self.moving_statistics = [v for v in model.non_trainable_variables if tf.as_dtype(v.dtype).is_floating]
        # Where an interrupted epoch stopped (steps done, running sums): the epoch resumes at that batch.
        # Outside the strategy's scope: collectives cannot broadcast a string (each worker writes the same
        # value anyway, from plain Python).
        self.partial_epoch = tf.Variable("", dtype=tf.string, trainable=False, name="partial_epoch")
        # Every other variable of the training state is created under the strategy's scope (mirrored on all
        # replicas), like the model and optimizer; the checkpoint tracking them too.
        with self.strategy.scope():
            # Optimizer slots exist before a restore, so a checkpoint's slots have somewhere to go.
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")  # epochs completed
            self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
            # Only with --swa_epochs, so checkpoints of other runs hold exactly what they held before.
            self.weight_average = swa.WeightAverage(model) if config.swa_epochs else None
            extra_state = {"swa": self.weight_average} if self.weight_average is not None else {}
            self.schedule = schedules.Schedule(
                config.lr_schedule, float(optimizer.learning_rate.numpy()), config.plateau_factor,
                config.plateau_patience, config.min_learning_rate, config.snapshot_cycles, config.epochs,
                pipeline.steps_per_epoch(int(self.train_images.shape[0]), config.batch_size))
            self.checkpoints = checkpoints.RunCheckpoints(
                run_dir, config.keep_checkpoints, restore_dir=resume_from, model=model, optimizer=optimizer,
                epoch=self.epoch, schedule=self.schedule, partial_epoch=self.partial_epoch,
                skipped_steps=self.skipped_steps, **extra_state)
        self._stop_signal = None
        self.summaries = Summaries(run_dir)
        # One compiled step per loss stage (a loss is part of the graph).
        self.train_steps = [tf.function(functools.partial(self._train_step, fn)) for fn in self.loss_stages]
        self.eval_steps = [tf.function(functools.partial(self._eval_step, fn)) for fn in self.loss_stages]
        self.stage = 0
        # Summary statistics are separate compiled functions around the step, so the step itself carries
        # no summary ops: they cost nothing on other steps and cannot change the training graph.
        self.snapshot = tf.function(self._snapshot)
        self.variable_statistics = tf.function(self._variable_statistics)

    # ---------------------------------------------------------------------------------- compiled steps

    def train_step(self, images, masks):
        return self.train_steps[self.stage](images, masks)

    def eval_step(self, images, masks):
        return self.eval_steps[self.stage](images, masks)

    def _replica_gradients(self, loss_fn, images, masks):
        """One replica's share of the batch (one device: all of it): forward in training mode (batch-norm
        statistics update), loss, gradients. Losses are divided by the GLOBAL batch size, so their sum over
        the replicas, and that of the gradients, is the mean over the global batch and its gradient."""
        global_batch = self.config.batch_size
        with tf.GradientTape() as tape:
            # Every output (mask logits; with deep supervision also side logits and the image-level logit):
            # the loss decides what it scores.
            model_outputs = model_lib.outputs_of(self.model, images, training=True)
            per_image_loss, terms = loss_fn(masks, model_outputs)
            loss = tf.nn.compute_average_loss(per_image_loss, global_batch_size=global_batch)
        gradients = tape.gradient(loss, self.model.trainable_variables)
        outputs = {"loss": loss}
        outputs.update({f"loss/{name}": tf.nn.compute_average_loss(term, global_batch_size=global_batch)
                        for name, term in terms.items()})
        return outputs, gradients

    def _gradients(self, loss_fn, images, masks):
        """The global batch's loss and gradients (reduced over replicas), optional clipping."""
        outputs, gradients = self.strategy.run(functools.partial(self._replica_gradients, loss_fn),
                                               args=(images, masks))
        distribute.average_moving_statistics(self.strategy, self.moving_statistics)
        # Explicit reductions; from here on every value is the same on every replica and every worker.
        outputs = distribute.sum_over_replicas(self.strategy, outputs)
        gradients = distribute.sum_over_replicas(self.strategy, gradients)
        if self.config.clip_norm > 0:
            gradients, gradient_norm = tf.clip_by_global_norm(gradients, self.config.clip_norm)
        else:
            gradient_norm = tf.linalg.global_norm(gradients)
        outputs = {"loss": outputs.pop("loss"), "gradient_norm": gradient_norm, **outputs}
        return outputs, gradients

    def _train_step(self, loss_fn, images, masks):
        # The forward pass itself moves the batch-norm statistics; a skipped step puts them back.
        moving_before = [tf.identity(v) for v in self.moving_statistics]
        outputs, gradients = self._gradients(loss_fn, images, masks)
        # A NaN/Inf loss or gradient must not reach the weights: such a step is skipped, not applied.
        finite = tf.math.is_finite(outputs["loss"]) & tf.math.is_finite(outputs["gradient_norm"])

        def apply():  # cross-replica context: one update, the same reduced gradients for every replica's copy
            self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
            return tf.constant(True)

        def skip():
            for variable, value in zip(self.moving_statistics, moving_before):
                variable.assign(value)
            return tf.constant(False)

        outputs["finite"] = tf.cond(finite, apply, skip)
        # The gradients are returned on every step, needed or not: with one graph for all steps, turning
        # summaries on cannot change the weights (a separate summary-step graph did, measured: its
        # different schedule changed the summation order of gradient aggregation).
        return outputs, gradients

    def _snapshot(self):
        return [tf.identity(v) for v in self.model.trainable_variables]

    def _variable_statistics(self, gradients, values_before):
        return summaries.variable_statistics(self.model.trainable_variables, gradients, values_before,
                                             self.model.non_trainable_variables)

    def _eval_step(self, loss_fn, images, masks):
        """{"probabilities": [B,101,101], "loss": [B]} and, with an image-level head, "has_salt": [B]."""
        model_outputs = model_lib.outputs_of(self.model, images, training=False)
        per_image_loss, _ = loss_fn(masks, model_outputs)
        results = {"probabilities": tf.sigmoid(model_outputs["mask"])[..., 0], "loss": per_image_loss}
        if "has_salt" in model_outputs:
            results["has_salt"] = tf.sigmoid(model_outputs["has_salt"])
        return results

    # ---------------------------------------------------------------------------------- evaluation

    def predict_validation(self) -> dict[str, np.ndarray]:
        """The eval step's outputs over the whole validation set: "probabilities" [N,101,101], "loss" [N] and,
        with an image-level head, "has_salt" [N]."""
        batches = [self.eval_step(images, masks) for images, masks in
                   pipeline.eval_dataset(self.val_images, self.val_masks, batch_size=self.config.eval_batch_size)]
        return {name: np.concatenate([batch[name].numpy() for batch in batches]) for name in batches[0]}

    def evaluate(self) -> tuple[dict, np.ndarray, np.ndarray]:
        """Validation results, plus the probabilities [N,101,101] and per-image scores [N] behind them."""
        outputs = self.predict_validation()
        probabilities, losses = outputs["probabilities"], outputs["loss"]
        predicted = probabilities > 0.5
        image_scores = metrics.image_scores(self.val_truth, predicted)
        threshold, threshold_metric = metrics.best_threshold(self.val_truth, probabilities)
        results = {
            "val_loss": float(losses.mean()),
            "val_metric": float(image_scores.mean()),
            "val_pixel_iou": metrics.pixel_iou(self.val_truth, predicted),
            "val_best_threshold": threshold,
            "val_metric_at_best_threshold": threshold_metric,
        }
        for group, score in summaries.coverage_group_scores(self.val_truth, image_scores).items():
            results[f"val_metric_{group}"] = score
        if "has_salt" in outputs:  # the image-level head: how well it tells salt from empty images
            has_salt = self.val_truth.any(axis=(1, 2))
            results["val_image_accuracy"] = float(np.mean((outputs["has_salt"] > 0.5) == has_salt))
            results["val_image_auc"] = metrics.roc_auc(has_salt, outputs["has_salt"])
        return results, probabilities, image_scores

    # ---------------------------------------------------------------------------------- epochs

    def train_epoch(self, epoch: int) -> dict:
        steps = pipeline.steps_per_epoch(int(self.train_images.shape[0]), self.config.batch_size)
        # A resumed epoch continues at the batch it stopped at, with the same batches (they depend on
        # seed and epoch only) and the sums of the steps already done.
        partial = json.loads(self.partial_epoch.numpy().decode() or '{"steps": 0, "sums": {}, "seconds": 0}')
        done, sums, seconds_before = partial["steps"], partial["sums"], partial["seconds"]
        finite_steps = partial.get("finite_steps", done)
        dataset = self.strategy.distribute_datasets_from_function(
            lambda input_context: pipeline.train_dataset(
                self.train_images, self.train_masks, batch_size=self.config.batch_size, seed=self.config.seed,
                epoch=epoch, augmentation=self.config.augmentation, start_step=done, input_context=input_context))
        global_step = self.global_step()
        every = self.config.summary_every_steps
        consecutive_bad = 0
        start = time.perf_counter()
        for step, (images, masks) in enumerate(dataset, start=done + 1):
            self._profile(global_step)
            learning_rate = self.schedule.step_learning_rate(global_step)
            if learning_rate is not None:
                self.optimizer.learning_rate.assign(learning_rate)
            if every and global_step % every == 0:
                values_before = self.snapshot()
                outputs, gradients = self.train_step(images, masks)
                self.summaries.step_statistics(
                    dict(outputs, learning_rate=self.optimizer.learning_rate),
                    self.variable_statistics(gradients, values_before),
                    self.model.trainable_variables, self.model.non_trainable_variables, global_step)
            else:
                outputs, _ = self.train_step(images, masks)
            global_step += 1
            if bool(outputs.pop("finite")):
                consecutive_bad = 0
                finite_steps += 1
                for name, value in outputs.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
            else:
                consecutive_bad += 1
                self.skipped_steps.assign_add(1)
                logging.warning("epoch %d step %d: non-finite loss or gradient (loss %s); step skipped, %d in a "
                                "row", epoch + 1, step, float(outputs["loss"]), consecutive_bad)
                if consecutive_bad >= self.config.max_bad_steps:
                    raise self._non_finite_stop(consecutive_bad, epoch, step)
            if self.config.progress_every and step % self.config.progress_every == 0 and step < steps:
                seen = (step - done) * self.config.batch_size
                logging.info("  epoch %d step %d/%d  loss %.4f  %.1f img/s", epoch + 1, step, steps,
                             sums.get("loss", math.nan) / max(finite_steps, 1), seen / (time.perf_counter() - start))
            if step < steps and self._stop_requested():
                self.partial_epoch.assign(json.dumps({
                    "steps": step, "sums": sums, "finite_steps": finite_steps,
                    "seconds": seconds_before + time.perf_counter() - start}))
                # Named in the run directory resumed from: a non-chief worker's own copy is temporary.
                path = os.path.join(self.checkpoints.restore_dir,
                                    os.path.basename(self.checkpoints.save(self.global_step())))
                self._stopped(f"at epoch {epoch + 1} step {step}/{steps}; checkpoint {path}")
        self.partial_epoch.assign("")
        results = {f"train_{name}": total / max(finite_steps, 1) for name, total in sums.items()}
        results["train_skipped_steps"] = steps - finite_steps
        results["train_seconds"] = seconds_before + time.perf_counter() - start
        results["train_images_per_second"] = (steps - done) * self.config.batch_size / (time.perf_counter() - start)
        return results

    def _non_finite_stop(self, count: int, epoch: int, step: int) -> TrainingStopped:
        """The stop after --max_bad_steps non-finite steps in a row, saying truthfully what is kept. Rerunning the
        same command would repeat the same steps: the way on is other settings, hence a new run directory."""
        latest = self.checkpoints.last.latest_checkpoint
        done = int(self.epoch.numpy())
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

    def global_step(self) -> int:
        """Training steps taken, skipped (non-finite) ones included: the x axis of every summary."""
        return int(self.optimizer.iterations.numpy()) + int(self.skipped_steps.numpy())

    def _stop_requested(self) -> bool:
        """A stop signal arrived here, or (multi-worker) on any worker: all workers stop at the same step.
        The agreed answer is returned, not the local flag: a signal handled during the vote counts at the
        next step, on every worker alike."""
        requested = distribute.any_worker(self.strategy, self._stop_signal is not None)
        if requested and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM  # another worker's signal
        return requested

    def _stopped(self, where: str) -> None:
        name = signal.Signals(self._stop_signal).name
        raise TrainingStopped(f"stopped by {name} {where}; run the same command to resume",
                              exit_code=128 + self._stop_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second signal: stop now, the last checkpoint stands
            raise KeyboardInterrupt
        self._stop_signal = signum
        logging.warning("%s received: finishing the current step, then writing a checkpoint",
                        signal.Signals(signum).name)

    def run(self) -> dict:
        """Trains from the latest checkpoint (or from scratch) to `epochs`; returns the final summary.
        SIGINT/SIGTERM finish the current step, write a checkpoint and raise TrainingStopped."""
        handlers = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            return self._run()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self._profile(None)
            self.summaries.close()

    def _run(self) -> dict:
        restored = self.resume_checkpoint
        if restored:
            self.checkpoints.restore(restored)
        first_epoch = int(self.epoch.numpy())
        # Rows of epochs after the checkpoint belong to work that is about to be redone.
        history = [row for row in records.read_metrics(self.run_dir).to_dict("records")
                   if row["epoch"] <= first_epoch]
        fingerprints = {epoch: value for epoch, value in records.read_fingerprints(self.run_dir).items()
                        if epoch <= first_epoch}
        if restored:
            logging.info("resumed from %s at epoch %d", restored, first_epoch)
        else:
            if self.init_weights:
                checkpoints.restore_exported_weights(self.init_weights, self.model)
                logging.info("started from the weights of %s", self.init_weights)
            # The starting state is checkpointed before any epoch writes its files: a run directory with
            # results always has a checkpoint to resume from (see the commit order below).
            self.checkpoints.save(self.global_step())
        if first_epoch == 0:
            if self.hparams is not None:
                self.summaries.hparams(self.hparams, run_name=os.path.basename(os.path.abspath(self.run_dir)))
            self._log_epoch_zero()
        run_start = time.perf_counter()
        for epoch in range(first_epoch, self.config.epochs):
            cycle = self.schedule.current_cycle(epoch)
            self.stage = self._loss_stage(epoch, cycle)
            first_step_lr = self.schedule.step_learning_rate(self.global_step())
            row = {"epoch": epoch + 1, "cycle": cycle, "loss_stage": self.stage,
                   "learning_rate": float(self.optimizer.learning_rate.numpy()) if first_step_lr is None
                   else first_step_lr}
            row.update(self.train_epoch(epoch))
            eval_start = time.perf_counter()
            results, probabilities, image_scores = self.evaluate()
            row.update(results)
            row["eval_seconds"] = time.perf_counter() - eval_start
            outcome = self.schedule.end_epoch(epoch + 1, row["val_metric"], self.optimizer.learning_rate)
            improved = outcome.improved
            self.epoch.assign(epoch + 1)
            if self.weight_average is not None and epoch + 1 > self.config.epochs - self.config.swa_epochs:
                self.weight_average.add(self.model)
            fingerprints[epoch + 1] = determinism.variable_fingerprints(self.model.variables)
            row["weights_sha256"] = determinism.combined_fingerprint(fingerprints[epoch + 1])
            # The epoch's files first, its checkpoint last: the checkpoint commits the epoch. A crash or a
            # failed write before it resumes from the previous checkpoint and redoes the epoch, rewriting
            # each file with the same content (the resume drops rows past the checkpoint, so metrics.csv
            # never holds an epoch twice); after it, every file of the epoch is in place.
            step = self.global_step()
            if improved:
                self.checkpoints.save_best(step)
                checkpoints.export(self.run_dir, self.model, dict(
                    self.export_config, epoch=epoch + 1, val_metric=row["val_metric"],
                    threshold=row["val_best_threshold"]))
            self._export_snapshot(outcome, cycle, epoch + 1, row)
            history.append(row)
            records.write_metrics(self.run_dir, history)
            records.write_fingerprints(self.run_dir, fingerprints)
            self._write_epoch_summaries(row, probabilities, image_scores)
            self.checkpoints.save(step)
            self._log_epoch(row, improved)
            if self._should_stop_early(epoch + 1):
                logging.info("early stop: no improvement for %d epochs", self.config.early_stop_patience)
                break
            if epoch + 1 < self.config.epochs and self._stop_requested():
                self._stopped(f"after epoch {epoch + 1}")
        summary = self._final_summary(history, time.perf_counter() - run_start)
        if self.weight_average is not None and int(self.weight_average.count.numpy()):
            summary.update(self._export_weight_average())
        return summary

    # ---------------------------------------------------------------------------------- edges

    def _loss_stage(self, epoch: int, cycle: int) -> int:
        """Which loss stage trains epoch `epoch` (0-based): the cycle's, or by --loss_switch_epochs."""
        if self.config.lr_schedule != "plateau":
            return min(cycle, len(self.loss_stages) - 1)
        return min(sum(epoch >= e for e in self.config.loss_switch_epochs), len(self.loss_stages) - 1)

    def _export_snapshot(self, outcome: schedules.EpochOutcome, cycle: int, epoch: int, row: dict) -> None:
        """plateau_restart: a cycle's snapshot is its best weights so far; cosine: the weights at its end."""
        config = dict(self.export_config, epoch=epoch, val_metric=row["val_metric"],
                      threshold=row["val_best_threshold"], cycle=cycle, loss_stage=self.stage)
        if self.config.lr_schedule == "plateau_restart" and outcome.improved_cycle:
            checkpoints.export_snapshot(self.run_dir, cycle, self.model, config)
        elif self.config.lr_schedule == "cosine" and outcome.finished_cycle is not None:
            checkpoints.export_snapshot(self.run_dir, outcome.finished_cycle, self.model, config)
        if outcome.finished_cycle is not None:
            logging.info("snapshot cycle %d ended at epoch %d", outcome.finished_cycle, epoch)

    def _export_weight_average(self) -> dict:
        """The mean of the averaged epochs' weights, with batch-norm statistics recomputed on the (unaugmented)
        training images, evaluated and exported to <run_dir>/swa; the model's own weights are left as they were.
        Done again by a rerun if a crash came between the last checkpoint and this export."""
        directory = os.path.join(self.run_dir, rundir.SWA_DIR)
        count = int(self.weight_average.count.numpy())
        if rundir.is_export(directory):
            config = checkpoints.read_export_config(directory)
            return {"swa_epochs_averaged": count, "swa_val_metric": config.get("val_metric")}
        with self.weight_average.applied(self.model):
            seen = swa.recompute_batch_norm(self.model, (images for images, _ in pipeline.eval_dataset(
                self.train_images, self.train_masks, batch_size=self.config.batch_size)))
            results, _, _ = self.evaluate()
            checkpoints.export_to(directory, self.model, dict(
                self.export_config, epoch=int(self.epoch.numpy()), val_metric=results["val_metric"],
                threshold=results["val_best_threshold"], swa_epochs_averaged=count))
        self.summaries.scalars(self.summaries.val, {"swa_metric": results["val_metric"]}, self.global_step())
        self.summaries.flush()
        logging.info("weight average of the last %d epochs (batch norm recomputed on %d images): val_metric %.4f "
                     "(%.4f at threshold %.2f); exported to %s", count, seen, results["val_metric"],
                     results["val_metric_at_best_threshold"], results["val_best_threshold"], directory)
        return {"swa_epochs_averaged": count, "swa_val_metric": results["val_metric"],
                "swa_val_metric_at_best_threshold": results["val_metric_at_best_threshold"]}

    def _should_stop_early(self, epochs_done: int) -> bool:
        patience = self.config.early_stop_patience
        return patience > 0 and epochs_done - int(self.schedule.best_epoch.numpy()) >= patience

    _profiling = False

    def _profile(self, global_step: int | None) -> None:
        """Starts/stops the TensorFlow profiler around --profile_steps (None: stop if running)."""
        if self.config.profile_steps is None:
            return
        start, stop = self.config.profile_steps
        if global_step == start and not self._profiling:
            tf.profiler.experimental.start(self.summaries.root)
            self._profiling = True
        elif self._profiling and (global_step is None or global_step >= stop):
            tf.profiler.experimental.stop()
            self._profiling = False
            logging.info("profile of steps %d-%d written to %s", start, stop - 1, self.summaries.root)

    def _log_epoch_zero(self) -> None:
        """The starting model's validation metric (untrained, or --init_checkpoint's): the baseline every epoch
        is compared with."""
        baseline, _, _ = self.evaluate()
        self.summaries.scalars(self.summaries.val, {"metric": baseline["val_metric"],
                                                    "loss": baseline["val_loss"]}, step=0)
        logging.info("epoch 0 (starting weights)  val_loss %.4f  val_metric %.4f", baseline["val_loss"],
                     baseline["val_metric"])

    def _write_epoch_summaries(self, row: dict, probabilities: np.ndarray, image_scores: np.ndarray) -> None:
        step = self.global_step()
        self.summaries.scalars(self.summaries.train, {
            "epoch_loss": row["train_loss"], "epoch_gradient_norm": row["train_gradient_norm"],
            "epoch_learning_rate": row["learning_rate"], "images_per_second": row["train_images_per_second"],
            "epoch": row["epoch"],
            **{f"epoch_{name[len('train_'):]}": v for name, v in row.items() if name.startswith("train_loss/")},
        }, step)
        self.summaries.scalars(self.summaries.val, {
            "loss": row["val_loss"], "metric": row["val_metric"], "pixel_iou": row["val_pixel_iou"],
            "best_threshold": row["val_best_threshold"],
            "metric_at_best_threshold": row["val_metric_at_best_threshold"],
            "best_metric": float(self.schedule.best.numpy()),
            **{f"image_head/{name[len('val_image_'):]}": v for name, v in row.items()
               if name.startswith("val_image_")},
            **{f"metric_by_coverage/{name[len('val_metric_'):]}": v for name, v in row.items()
               if name[len("val_metric_"):] in summaries.COVERAGE_GROUPS},
        }, step)
        self.summaries.text(self.summaries.train, "weights_sha256", row["weights_sha256"], step)
        self._write_image_summaries(probabilities, image_scores, step)
        self.summaries.flush()

    def _write_image_summaries(self, probabilities: np.ndarray, image_scores: np.ndarray, step: int) -> None:
        """Grids of validation images with the true (green) and predicted (red) outlines."""
        images = self.val_images.numpy()[..., 0]
        predicted = probabilities > 0.5

        def tiles(indices):
            return [summaries.overlay(images[i], self.val_truth[i], predicted[i]) for i in indices]

        if len(self.display_indices):
            self.summaries.image(self.summaries.val, "fixed_images", summaries.grid(tiles(self.display_indices)),
                                 step, "the same validation images every epoch; green = truth, red = prediction")
        if self.config.summary_worst_images:
            worst = np.argsort(image_scores, kind="stable")[:self.config.summary_worst_images]
            self.summaries.image(self.summaries.val, "worst_images", summaries.grid(tiles(worst)), step,
                                 "lowest competition score this epoch; green = truth, red = prediction")

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
            "epochs_completed": int(self.epoch.numpy()),
            "best_epoch": best.get("epoch"),
            "best_val_metric": best.get("val_metric"),
            "best_val_metric_at_best_threshold": best.get("val_metric_at_best_threshold"),
            "best_threshold": best.get("val_best_threshold"),
            "final_weights_sha256": history[-1]["weights_sha256"] if history else None,
            "wall_seconds_this_session": seconds,
            "train_seconds_total": float(sum(r["train_seconds"] + r["eval_seconds"] for r in history)),
        }
