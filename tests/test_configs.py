"""Flags -> config objects (salt_tf.configs): the defaults agree, and every flag lands in its field."""

import dataclasses

import pytest
from absl import flags
from absl.testing import flagsaver

from salt_tf import configs, flags as salt_flags, loop, losses, pipeline, schedules
from salt_tf import model as model_lib

FLAGS = flags.FLAGS
REQUIRED = ["train", "--dataset=demo", "--data_dir=unused"]  # not config fields; the validators want them

# A non-default value for every field of every config, as a flag would spell it, and the field's value then.
# A new field must be added here: test_every_field_is_covered fails until it is.
NON_DEFAULT = {
    model_lib.ModelConfig: {
        "base_width": ("--base_width=8", 8), "depth": ("--depth=3", 3), "blocks_per_level": ("--blocks_per_level=1", 1),
        "se": ("--nose", False), "se_ratio": ("--se_ratio=2", 2), "dropout": ("--dropout=0.25", 0.25),
        "input_channels": ("--use_depth", 2), "se_type": ("--se_type=scse", "scse"),
        "hypercolumn": ("--hypercolumn", True), "deep_supervision": ("--deep_supervision", True),
        "input_size": ("--input_size=128", 128), "pad_mode": ("--pad_mode=edge", "edge"),
    },
    losses.LossConfig: {
        "loss": ("--loss=bce:1,lovasz_elu:1", "bce:1,lovasz_elu:1"),
        "loss_schedule": ("--loss_schedule=bce:1;dice:1", "bce:1;dice:1"),
        "focal_gamma": ("--focal_gamma=1.5", 1.5), "focal_alpha": ("--focal_alpha=0.5", 0.5),
        "side_loss_weight": ("--side_loss_weight=0.2", 0.2), "image_loss_weight": ("--image_loss_weight=0.1", 0.1),
    },
    schedules.OptimizerConfig: {
        "optimizer": ("--optimizer=sgd", "sgd"), "learning_rate": ("--learning_rate=0.01", 0.01),
        "momentum": ("--momentum=0.5", 0.5), "nesterov": ("--nesterov", True),
        "weight_decay": ("--weight_decay=0.001", 0.001),
    },
    pipeline.Augmentation: {
        "hflip": ("--nohflip", False), "translate": ("--translate=7", 7), "zoom": ("--zoom=1.2", 1.2),
        "brightness": ("--brightness=0.1", 0.1), "contrast": ("--contrast=0.2", 0.2),
    },
    loop.LoopConfig: {
        "epochs": ("--epochs=12", 12), "batch_size": ("--batch_size=16", 16),
        "eval_batch_size": ("--eval_batch_size=8", 8), "seed": ("--seed=3", 3),
        "augmentation": ("--translate=7", pipeline.Augmentation(translate=7)),
        "clip_norm": ("--clip_norm=1.5", 1.5), "plateau_factor": ("--plateau_factor=0.5", 0.5),
        "plateau_patience": ("--plateau_patience=2", 2), "min_learning_rate": ("--min_learning_rate=0.0001", 1e-4),
        "early_stop_patience": ("--early_stop_patience=3", 3), "keep_checkpoints": ("--keep_checkpoints=5", 5),
        "progress_every": ("--progress_every=0", 0), "summary_every_steps": ("--summary_every_steps=7", 7),
        "summary_images": ("--summary_images=2", 2), "summary_worst_images": ("--summary_worst_images=0", 0),
        "profile_steps": ("--profile_steps=20,25", (20, 25)), "max_bad_steps": ("--max_bad_steps=4", 4),
        "lr_schedule": ("--lr_schedule=plateau_restart", "plateau_restart"),
        "snapshot_cycles": ("--snapshot_cycles=2", 2),
        "loss_switch_epochs": ("--loss_switch_epochs=5", (5,)), "swa_epochs": ("--swa_epochs=2", 2),
    },
}
# Flags a value needs beside its own to pass the cross-flag validators (none of them a field of that config).
COMPANIONS = {"--loss_switch_epochs=5": ["--loss_schedule=bce:1;dice:1"]}
BUILDERS = {model_lib.ModelConfig: configs.model_config, losses.LossConfig: configs.loss_config,
            schedules.OptimizerConfig: configs.optimizer_config, pipeline.Augmentation: configs.augmentation,
            loop.LoopConfig: configs.loop_config}


@pytest.fixture(autouse=True)
def fresh_flags():
    salt_flags.define_flags()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        yield


def test_every_field_is_covered():
    for config_class, values in NON_DEFAULT.items():
        assert set(values) == {f.name for f in dataclasses.fields(config_class)}, config_class.__name__


@pytest.mark.parametrize("config_class", list(BUILDERS), ids=lambda c: c.__name__)
def test_default_flags_build_the_dataclass_defaults(config_class):
    FLAGS(REQUIRED)
    assert BUILDERS[config_class]() == config_class()
    # And flag by flag, where the flag has the field's name: the same default value.
    for field in dataclasses.fields(config_class):
        if field.name not in FLAGS:
            continue
        default = FLAGS[field.name].default
        if field.name == "profile_steps":
            default = salt_flags.parse_profile_steps(default)
        if field.name == "loss_switch_epochs":
            default = tuple(int(e) for e in default)
        assert default == field.default, field.name


@pytest.mark.parametrize("config_class", list(BUILDERS), ids=lambda c: c.__name__)
def test_each_flag_lands_in_its_field(config_class):
    defaults = config_class()
    for name, (flag, value) in NON_DEFAULT[config_class].items():
        assert getattr(defaults, name) != value, name  # the table really changes the field
        FLAGS.unparse_flags()
        FLAGS(REQUIRED + COMPANIONS.get(flag, []) + [flag])
        assert BUILDERS[config_class]() == dataclasses.replace(defaults, **{name: value}), flag


def test_loss_config_builds_the_stages_and_deep_supervision():
    FLAGS(REQUIRED + ["--loss_schedule=focal:1,dice:1;bce:1", "--focal_gamma=1.5", "--side_loss_weight=0.3"])
    config = configs.loss_config()
    plain = losses.build_losses(config)
    assert plain == [losses.CombinedLoss("focal:1,dice:1", focal_gamma=1.5),
                     losses.CombinedLoss("bce:1", focal_gamma=1.5)]
    deep = losses.build_losses(config, deep_supervision=True)
    assert deep == [losses.DeepSupervisionLoss(fn, 0.3, 0.05) for fn in plain]


def test_build_optimizer_follows_the_config():
    adam = schedules.build_optimizer(schedules.OptimizerConfig(learning_rate=0.01))
    assert type(adam).__name__ == "Adam" and float(adam.learning_rate.numpy()) == pytest.approx(0.01)
    sgd = schedules.build_optimizer(schedules.OptimizerConfig(optimizer="sgd", momentum=0.5, nesterov=True,
                                                              weight_decay=1e-3))
    assert type(sgd).__name__ == "SGD" and (sgd.momentum, sgd.nesterov) == (0.5, True)
    assert sgd.weight_decay == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        schedules.build_optimizer(schedules.OptimizerConfig(optimizer="rmsprop"))
