"""The train step: forward, loss, gradients, clip, apply, as compiled functions. Read it top to bottom.

    train_step (one tf.function per loss stage, cross-replica context)
        strategy.run(replica step)   each replica: forward in training mode, loss / GLOBAL batch, gradients
        average_moving_statistics    batch-norm moving statistics: mean over replicas
        sum_over_replicas            losses and gradients: the explicit all-reduce
        clip, NaN guard, apply       on the reduced values, the same on every replica (and worker)
    eval_step                        forward in inference mode: probabilities and per-image loss
    snapshot, variable_statistics    compiled apart from the step, called around it on summary steps

A `TrainStep` holds a model, an optimizer, the loss stages, a strategy, the global batch size and the clip
norm, nothing else: no run directory, no files, no epochs. `loop.Trainer` calls it once per batch; tools
(bench, perf_variants, profile_step) and tests build one directly.

One code path serves one device and many: `strategy` is `tf.distribute.get_strategy()` (the default, one
device) unless train.py created another (distribute.py); with one replica `strategy.run` just calls the
function and the reductions add no op, so the default run is the plain single-device step.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import tensorflow as tf

from salt_tf import distribute, summaries
from salt_tf import model as model_lib


class TrainStep:
    """The compiled train and eval steps of one model, optimizer and loss (or loss stages)."""

    def __init__(self, model: tf.Module, optimizer, loss_fn: Callable | Sequence[Callable], *, batch_size: int,
                 clip_norm: float = 0.0, strategy: tf.distribute.Strategy | None = None):
        """Builds the optimizer's slots and the step functions (traced at their first call).

        Args:
          model: the network, created under `strategy.scope()`; `model_lib.outputs_of` gives its outputs.
          optimizer: a Keras optimizer, created under `strategy.scope()`.
          loss_fn: a loss `(masks, outputs) -> (per-image loss [B], {name: per-image term [B]})`, or a
            sequence of them: the loss stages (one per snapshot cycle or --loss_switch_epochs interval).
          batch_size: the GLOBAL batch size; every replica's loss is divided by it.
          clip_norm: clip the gradients to this global norm; 0 = no clipping.
          strategy: the tf.distribute strategy (default: the current one, one device).
        """
        self.model, self.optimizer = model, optimizer
        self.strategy = strategy or tf.distribute.get_strategy()
        self.loss_stages = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]
        self.batch_size, self.clip_norm = batch_size, clip_norm
        # Batch-norm moving statistics: each replica updates its own copy; averaged after every step.
        self.moving_statistics = [v for v in model.non_trainable_variables if tf.as_dtype(v.dtype).is_floating]
        with self.strategy.scope():
            # Optimizer slots exist before a restore, so a checkpoint's slots have somewhere to go.
            self.optimizer.build(self.model.trainable_variables)
        # One compiled step per loss stage (a loss is part of the graph).
        self._train_steps = [tf.function(self.step_function(stage)) for stage in range(len(self.loss_stages))]
        self._eval_steps = [tf.function(functools.partial(self._eval_step, fn)) for fn in self.loss_stages]
        # Summary statistics are separate compiled functions around the step, so the step itself carries
        # no summary ops: they cost nothing on other steps and cannot change the training graph.
        self.snapshot = tf.function(self._snapshot)
        self.variable_statistics = tf.function(self._variable_statistics)

    def train_step(self, images, masks, stage: int = 0) -> tuple[dict, list]:
        """One optimizer step on a global batch (a distributed value under a multi-replica strategy).

        Args:
          images: [B, 101, 101, C] float32 images.
          masks: [B, 101, 101, 1] 0/1 masks.
          stage: the loss stage to train with.

        Returns:
          ({"loss", "gradient_norm", "loss/<term>"...: scalars, "finite": bool}, the reduced gradients, one per
          trainable variable). A step whose loss or gradient is not finite is skipped: nothing is applied.
        """
        return self._train_steps[stage](images, masks)

    def eval_step(self, images, masks, stage: int = 0) -> dict:
        """Inference on one batch (not distributed).

        Returns:
          {"probabilities": [B, 101, 101], "loss": [B]} and, with an image-level head, "has_salt": [B].
        """
        return self._eval_steps[stage](images, masks)

    def step_function(self, stage: int = 0) -> Callable:
        """The uncompiled train step of a loss stage, `(images, masks) -> (outputs, gradients)`, for callers that
        compile it themselves (inside a loop of steps, or with XLA: tools/perf_variants.py)."""
        return functools.partial(self._train_step, self.loss_stages[stage])

    def replica_gradients(self, images, masks, stage: int = 0) -> tuple[dict, list]:
        """One replica's share of a step without applying it, uncompiled: ({"loss", "loss/<term>"...}, gradients),
        the losses divided by the global batch size. For tests that compare replicas with one device."""
        return self._replica_gradients(self.loss_stages[stage], images, masks)

    # ------------------------------------------------------------------------------- inside the graph

    def _replica_gradients(self, loss_fn, images, masks):
        """One replica's share of the batch (one device: all of it): forward in training mode (batch-norm
        statistics update), loss, gradients. Losses are divided by the GLOBAL batch size, so their sum over
        the replicas, and that of the gradients, is the mean over the global batch and its gradient."""
        global_batch = self.batch_size
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
        if self.clip_norm > 0:
            gradients, gradient_norm = tf.clip_by_global_norm(gradients, self.clip_norm)
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
        # different schedule changed the summation order of gradient aggregation, TensorFlow's AddN).
        return outputs, gradients

    def _eval_step(self, loss_fn, images, masks):
        """{"probabilities": [B,101,101], "loss": [B]} and, with an image-level head, "has_salt": [B]."""
        model_outputs = model_lib.outputs_of(self.model, images, training=False)
        per_image_loss, _ = loss_fn(masks, model_outputs)
        results = {"probabilities": tf.sigmoid(model_outputs["mask"])[..., 0], "loss": per_image_loss}
        if "has_salt" in model_outputs:
            results["has_salt"] = tf.sigmoid(model_outputs["has_salt"])
        return results

    # ------------------------------------------------------------------------------- summary statistics

    def _snapshot(self):
        """The trainable variables' values before a summary step (for the update ratios)."""
        return [tf.identity(v) for v in self.model.trainable_variables]

    def _variable_statistics(self, gradients, values_before):
        """Per-variable statistics of the step just taken (summaries.variable_statistics)."""
        return summaries.variable_statistics(self.model.trainable_variables, gradients, values_before,
                                             self.model.non_trainable_variables)
