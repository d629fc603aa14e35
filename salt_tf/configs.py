"""The one place where parsed flags become config objects.

    flags (salt_tf/flags.py: definitions, defaults taken from the dataclasses, validators)
      -> model_config      model.ModelConfig         --base_width ... --pad_mode, --use_depth
      -> loss_config       losses.LossConfig         --loss, --loss_schedule, --focal_*, --*_loss_weight
      -> optimizer_config  schedules.OptimizerConfig --optimizer, --learning_rate, --momentum, ...
      -> loop_config       loop.LoopConfig           --epochs, --batch_size, ..., augmentation flags

A flag named like a field sets that field; the few that are spelled differently are converted here
(--use_depth -> input_channels, --profile_steps text -> a pair, --loss_switch_epochs text -> ints). The
train command and the tools call these; nothing else reads flags to build an object.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from salt_tf import flags as salt_flags
from salt_tf import loop, losses, pipeline, schedules
from salt_tf import model as model_lib

FLAGS = flags.FLAGS


def _same_named(config_class, flag_values: flags.FlagValues, skip=()) -> dict:
    """{field: flag value} for every field of `config_class` but `skip`, each from the flag of the same name
    (a field without one is an error here, not a silent default)."""
    return {field.name: flag_values[field.name].value for field in dataclasses.fields(config_class)
            if field.name not in skip}


def model_config(flag_values: flags.FlagValues = FLAGS) -> model_lib.ModelConfig:
    """The ModelConfig of the model flags (salt_flags.define_model_flags).

    Args:
      flag_values: parsed flags (default: absl's global FLAGS).

    Returns:
      The model's config; input_channels is 2 with --use_depth, else 1.
    """
    return model_lib.ModelConfig(input_channels=2 if flag_values.use_depth else 1,
                                 **_same_named(model_lib.ModelConfig, flag_values, skip=("input_channels",)))


def loss_config(flag_values: flags.FlagValues = FLAGS) -> losses.LossConfig:
    """The LossConfig of the loss flags (--loss, --loss_schedule, --focal_*, --side/image_loss_weight)."""
    return losses.LossConfig(**_same_named(losses.LossConfig, flag_values))


def optimizer_config(flag_values: flags.FlagValues = FLAGS) -> schedules.OptimizerConfig:
    """The OptimizerConfig of the optimizer flags (--optimizer, --learning_rate, --momentum, ...)."""
    return schedules.OptimizerConfig(**_same_named(schedules.OptimizerConfig, flag_values))


def augmentation(flag_values: flags.FlagValues = FLAGS) -> pipeline.Augmentation:
    """The training augmentation of --hflip, --translate, --zoom, --brightness, --contrast."""
    return pipeline.Augmentation(**_same_named(pipeline.Augmentation, flag_values))


def loop_config(flag_values: flags.FlagValues = FLAGS) -> loop.LoopConfig:
    """The LoopConfig of the loop flags (epochs, batch sizes, schedule, checkpoints, summaries, ...).

    Args:
      flag_values: parsed flags (default: absl's global FLAGS), every train flag defined.

    Returns:
      The loop's config, with the augmentation flags gathered in `augmentation`.
    """
    special = ("augmentation", "profile_steps", "loss_switch_epochs")
    return loop.LoopConfig(
        augmentation=augmentation(flag_values),
        profile_steps=salt_flags.parse_profile_steps(flag_values.profile_steps),
        loss_switch_epochs=tuple(int(e) for e in flag_values.loss_switch_epochs),
        **_same_named(loop.LoopConfig, flag_values, skip=special))
