"""Stochastic weight averaging (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima").

The trainable weights at the end of each of a run's last K epochs are summed into variables that live in the
training checkpoint (so a resumed run keeps its partial average); when the run ends, the model is set to their
mean, its batch-norm statistics are recomputed on the training images (an average of weights has no moving
statistics of its own: those of the last epoch belong to other weights), and the result is exported as one
ordinary model. One model, one forward pass per prediction, against a snapshot ensemble's K.

    average = WeightAverage(model)          # under the strategy's scope; checkpoint it with the run
    average.add(model)                      # at the end of each averaged epoch
    with average.applied(model):            # the model holds the mean weights inside the block
        recompute_batch_norm(model, batches)
        ...evaluate, export...
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import keras
import numpy as np
import tensorflow as tf


class WeightAverage(tf.Module):
    """Running sum (float64) of a model's trainable weights and the number of weights summed."""

    def __init__(self, model: keras.Model):
        super().__init__(name="swa")
        self.sums = [tf.Variable(tf.zeros(v.shape, tf.float64), trainable=False, name=f"sum{i}")
                     for i, v in enumerate(model.trainable_variables)]
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")

    def add(self, model: keras.Model) -> None:
        """Adds the model's current trainable weights to the average."""
        for total, variable in zip(self.sums, model.trainable_variables):
            total.assign_add(tf.cast(variable, tf.float64))
        self.count.assign_add(1)

    def reset(self) -> None:
        """Empties the average (a grown run: the sums belong to the averaging window of its old length)."""
        for total in self.sums:
            total.assign(tf.zeros_like(total))
        self.count.assign(0)

    def means(self) -> list[tf.Tensor]:
        count = tf.cast(self.count, tf.float64)
        return [total / count for total in self.sums]

    @contextlib.contextmanager
    def applied(self, model: keras.Model):
        """Inside the block the model holds the averaged weights (batch-norm statistics as they are: recompute
        them); on leaving, every variable of the model is back to its value before."""
        if int(self.count.numpy()) == 0:
            raise ValueError("no weights averaged yet")
        saved = [tf.identity(v) for v in model.variables]
        for variable, mean in zip(model.trainable_variables, self.means()):
            variable.assign(tf.cast(mean, variable.dtype))
        try:
            yield model
        finally:
            for variable, value in zip(model.variables, saved):
                variable.assign(value)


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)]


def recompute_batch_norm(model: keras.Model, batches: Iterable[tf.Tensor]) -> int:
    """Sets each batch-norm layer's moving mean and variance to the image-weighted mean of its batch statistics
    over `batches` (model inputs; training-mode forward passes, no weight changes), as torch.optim.swa_utils'
    update_bn does. Returns the number of images seen.

    Momentum 0 makes a training-mode pass leave exactly that batch's statistics in the moving variables, so
    they can be read after each batch; the momenta are restored afterwards. With --dropout the passes see
    dropped-out activations (and advance the dropout RNG counters), as update_bn's do.
    """
    layers = batch_norm_layers(model)
    momenta = [layer.momentum for layer in layers]
    sums = [[np.zeros(layer.moving_mean.shape, np.float64), np.zeros(layer.moving_variance.shape, np.float64)]
            for layer in layers]
    seen = 0
    try:
        for layer in layers:
            layer.momentum = 0.0
        forward = tf.function(lambda x: model(x, training=True))  # traced after the momenta changed
        for images in batches:
            forward(images)
            n = int(images.shape[0])
            for (mean_sum, variance_sum), layer in zip(sums, layers):
                mean_sum += n * layer.moving_mean.numpy().astype(np.float64)
                variance_sum += n * layer.moving_variance.numpy().astype(np.float64)
            seen += n
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if not seen:
        raise ValueError("recompute_batch_norm: no images")
    for (mean_sum, variance_sum), layer in zip(sums, layers):
        layer.moving_mean.assign((mean_sum / seen).astype(np.float32))
        layer.moving_variance.assign((variance_sum / seen).astype(np.float32))
    return seen
