"""Stochastic weight averaging: the mean of the weights, batch-norm statistics recomputed, and the loop's export,
against NumPy float64 references and the run's own epoch checkpoints."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from salt_tf import checkpoints, rundir, swa
from salt_tf import model as model_lib
from salt_tf.data import kaggle


def _model(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return model_lib.build_model(model_lib.ModelConfig(**dict(dict(base_width=2, depth=1, blocks_per_level=1),
                                                               **kwargs)))


def test_average_is_the_float64_mean_and_leaving_restores_every_variable():
    model = _model()
    average = swa.WeightAverage(model)
    states = []
    rng = np.random.default_rng(0)
    for _ in range(3):
        for v in model.trainable_variables:
            v.assign(rng.normal(size=v.shape).astype(np.float32))
        states.append([v.numpy().astype(np.float64) for v in model.trainable_variables])
        average.add(model)
    last = [v.numpy().copy() for v in model.variables]
    with average.applied(model):
        for v, *values in zip(model.trainable_variables, *states):
            np.testing.assert_allclose(v.numpy(), np.mean(values, axis=0), rtol=1e-6, atol=1e-7)
    for v, before in zip(model.variables, last):
        np.testing.assert_array_equal(v.numpy(), before)
    with pytest.raises(ValueError, match="no weights"):
        with swa.WeightAverage(model).applied(model):
            pass


def test_recompute_batch_norm_matches_numpy_batch_statistics():
    """The first batch norm (encoder/level0/block0/bn1) normalises the stem's output, which no batch norm
    precedes: its recomputed statistics must be the image-weighted mean over batches of each batch's mean and
    biased variance of that output, computed here in float64. Momenta are restored afterwards."""
    model = _model(seed=1)
    rng = np.random.default_rng(2)
    batches = [tf.constant(rng.normal(size=(n, 101, 101, 1)).astype(np.float32)) for n in (4, 4, 2)]
    stem_out = [model.encoder.stem(x).numpy().astype(np.float64) for x in batches]
    means = [o.mean(axis=(0, 1, 2)) for o in stem_out]
    variances = [o.var(axis=(0, 1, 2)) for o in stem_out]
    weights = np.array([4, 4, 2], np.float64) / 10
    layer = model.encoder.level0.block0.bn1
    momenta = [l.momentum for l in swa.batch_norm_layers(model)]
    assert len(momenta) == 2 * 3 + 1  # 3 blocks x 2 + head
    seen = swa.recompute_batch_norm(model, batches)
    assert seen == 10
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.tensordot(weights, means, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), np.tensordot(weights, variances, 1), rtol=1e-4,
                               atol=1e-5)
    assert [l.momentum for l in swa.batch_norm_layers(model)] == momenta


def test_loop_exports_the_mean_of_the_last_epochs(tmp_path, demo_dir):
    """A 3-epoch run with --swa_epochs=2 keeps its last two epoch checkpoints (keep_checkpoints=2): the swa/
    export's trainable weights are the mean of the model weights stored in those two checkpoints, and its
    recorded val_metric is that of the averaged model."""
    from salt_tf import loop, losses, pipeline, step as step_lib

    data = kaggle.load_labelled(demo_dir)
    images, masks = pipeline.to_arrays(data, use_depth=False)
    keras.utils.set_random_seed(0)
    config = model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=1)
    run_dir = str(tmp_path / "run")
    step = step_lib.TrainStep(model_lib.build_model(config), keras.optimizers.Adam(1e-3),
                              losses.CombinedLoss("bce:1"), batch_size=16)
    trainer = loop.run_dir_trainer(
        step, loop.LoopConfig(epochs=3, batch_size=16, eval_batch_size=32, seed=0,
                              augmentation=pipeline.Augmentation(), swa_epochs=2, keep_checkpoints=2,
                              summary_every_steps=0),
        (images[32:96], masks[32:96]), (images[:32], masks[:32]), run_dir,
        export_config={"model": {"base_width": 4, "depth": 2, "blocks_per_level": 1}})
    summary = trainer.run()
    assert summary["swa_epochs_averaged"] == 2
    paths = list(tf.train.get_checkpoint_state(os.path.join(run_dir, "checkpoints")).all_model_checkpoint_paths)  # oldest first
    assert len(paths) == 2
    swa_dir = os.path.join(run_dir, rundir.SWA_DIR)

    def trainable_weights_of(path):  # a fresh model restored from a checkpoint file
        fresh = model_lib.build_model(config)
        tf.train.Checkpoint(model=fresh).read(path).expect_partial()
        return [v.numpy().astype(np.float64) for v in fresh.trainable_variables]

    epochs = [trainable_weights_of(p) for p in paths]
    exported = trainable_weights_of(os.path.join(swa_dir, rundir.EXPORT_WEIGHTS))
    assert len(exported) > 10
    for got, *per_epoch in zip(exported, *epochs):
        np.testing.assert_allclose(got, np.mean(per_epoch, axis=0), rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(*epochs))  # the two epochs really differ
    config_json = checkpoints.read_export_config(swa_dir)
    assert config_json["swa_epochs_averaged"] == 2
    assert config_json["val_metric"] == summary["swa_val_metric"]
    # The run's own model keeps the last epoch's weights: the swa export is separate.
    for variable, value in zip(step.model.trainable_variables, epochs[-1]):
        np.testing.assert_array_equal(variable.numpy(), value.astype(np.float32))
