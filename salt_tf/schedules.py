"""The optimizer, learning-rate schedules and snapshot cycles, with the schedules' state in variables
(checkpointed, so a resumed run continues the schedule exactly).

    plateau          the seed recipe: LR x factor when the validation metric has not improved for
                     `patience` epochs, down to a floor
    plateau_restart  the seed's snapshot ensemble: when the metric plateaus, the cycle ends (its best
                     weights are its snapshot), the LR goes back to its initial value and training continues
                     from the current weights
    cosine           Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for free": M cycles of cosine
                     annealing from the initial LR to 0 over the run, a snapshot at the end of each cycle
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

MODES = ("plateau", "plateau_restart", "cosine")
OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer of a run. Every field is the train flag of the same name (configs.optimizer_config),
    whose default is the field's default here."""
    optimizer: str = "adam"         # adam | sgd (with momentum)
    learning_rate: float = 1e-3     # the initial learning rate (the schedule moves it)
    momentum: float = 0.9           # sgd
    nesterov: bool = False          # sgd
    weight_decay: float = 0.0       # decoupled (AdamW / SGDW style); 0 = off


def build_optimizer(config: OptimizerConfig):
    """The Keras optimizer of `config`; create it under the strategy's scope.

    Args:
      config: the optimizer settings.

    Returns:
      keras.optimizers.Adam or SGD; with weight decay, the kernels only are decayed.
    """
    import keras

    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    common = dict(learning_rate=config.learning_rate, weight_decay=config.weight_decay or None)
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(**common)
    else:
        optimizer = keras.optimizers.SGD(momentum=config.momentum, nesterov=config.nesterov, **common)
    if config.weight_decay:
        # Decay the kernels only: shrinking biases and batch-norm scales regularizes nothing.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


@dataclasses.dataclass(frozen=True)
class EpochOutcome:
    improved: bool          # best validation metric of the run so far
    improved_cycle: bool    # best of the current snapshot cycle so far (plateau_restart)
    finished_cycle: int | None  # index of the snapshot cycle that ended with this epoch, if any


def cosine_learning_rate(initial: float, step: int, steps_per_cycle: int) -> float:
    """Huang et al. eq. 2: lr0 / 2 * (cos(pi * (step mod cycle) / cycle) + 1), step counted from 0."""
    return initial / 2 * (math.cos(math.pi * (step % steps_per_cycle) / steps_per_cycle) + 1)


class Schedule(tf.Module):
    def __init__(self, mode: str, initial_learning_rate: float, factor: float = 0.7, patience: int = 5,
                 min_learning_rate: float = 1e-5, cycles: int = 1, epochs: int = 1, steps_per_epoch: int = 1):
        super().__init__(name="schedule")
        assert mode in MODES, mode
        self.mode, self.initial_learning_rate = mode, initial_learning_rate
        self.factor, self.patience, self.min_learning_rate = factor, patience, min_learning_rate
        self.epochs_per_cycle = max(1, epochs // max(cycles, 1)) if mode == "cosine" else None
        self.steps_per_epoch = steps_per_epoch
        self.best = tf.Variable(-math.inf, dtype=tf.float64, trainable=False, name="best")
        self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_epoch")
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="wait")
        self.cycle = tf.Variable(0, dtype=tf.int64, trainable=False, name="cycle")
        self.cycle_best = tf.Variable(-math.inf, dtype=tf.float64, trainable=False, name="cycle_best")

    def current_cycle(self, epoch: int) -> int:
        """The snapshot cycle epoch `epoch` (0-based) belongs to; 0 without snapshots."""
        if self.mode == "cosine":
            return epoch // self.epochs_per_cycle
        return int(self.cycle.numpy())

    def step_learning_rate(self, global_step: int) -> float | None:
        """The LR for a step when the schedule sets it per step (cosine), else None."""
        if self.mode != "cosine":
            return None
        return cosine_learning_rate(self.initial_learning_rate, global_step,
                                    self.epochs_per_cycle * self.steps_per_epoch)

    def end_epoch(self, epoch: int, metric: float, learning_rate: tf.Variable) -> EpochOutcome:
        """Records the validation metric of epoch `epoch` (1-based) and moves the schedule on."""
        improved = metric > self.best.numpy()
        if improved:
            self.best.assign(metric)
            self.best_epoch.assign(epoch)
        if self.mode == "cosine":
            finished = epoch % self.epochs_per_cycle == 0
            return EpochOutcome(improved, False, epoch // self.epochs_per_cycle - 1 if finished else None)
        if self.mode == "plateau":
            self.wait.assign(0 if improved else self.wait + 1)
            if self.wait.numpy() >= self.patience:
                learning_rate.assign(max(float(learning_rate.numpy()) * self.factor, self.min_learning_rate))
                self.wait.assign(0)
            return EpochOutcome(improved, False, None)
        # plateau_restart
        improved_cycle = metric > self.cycle_best.numpy()
        if improved_cycle:
            self.cycle_best.assign(metric)
        self.wait.assign(0 if improved_cycle else self.wait + 1)
        if self.wait.numpy() >= self.patience:
            finished = int(self.cycle.numpy())
            self.cycle.assign_add(1)
            self.cycle_best.assign(-math.inf)
            self.wait.assign(0)
            learning_rate.assign(self.initial_learning_rate)
            return EpochOutcome(improved, improved_cycle, finished)
        return EpochOutcome(improved, improved_cycle, None)
