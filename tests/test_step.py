"""The TrainStep on its own (no run directory), checked against plain TensorFlow and NumPy written out here,
and the loop and checkpoint pieces it is driven by."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from salt_tf import checkpoints, loop, losses, model as model_lib, pipeline, step as step_lib

CONFIG = model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=1, se_ratio=2)
LEARNING_RATE = 0.1


def batch(size=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((size, 101, 101, 1), dtype=np.float32)
    masks = (rng.random((size, 101, 101, 1)) > 0.6).astype(np.float32)
    return images, masks


def twin_models():
    """Two models with the same initial weights (the same seed before each build)."""
    models = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        models.append(model_lib.build_model(CONFIG))
    for a, b in zip(models[0].variables, models[1].variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    return models


def numpy_bce_per_image(labels, logits):
    """Mean sigmoid cross-entropy per image, float64: max(z, 0) - z y + log(1 + exp(-|z|))."""
    z, y = logits.astype(np.float64).reshape(len(logits), -1), labels.astype(np.float64).reshape(len(labels), -1)
    return (np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))).mean(axis=1)


def reference_step(model, images, masks, clip_norm=0.0):
    """A plain GradientTape step written out here: mean BCE over every pixel of the batch, gradients, optional
    clipping to a global norm (computed in NumPy), w <- w - lr * g. Returns (loss, gradient norm)."""
    with tf.GradientTape() as tape:
        logits = model(tf.constant(images), training=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.constant(masks), logits=logits))
    gradients = [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]
    norm = float(np.sqrt(sum(np.sum(g * g) for g in gradients)))
    scale = min(1.0, clip_norm / norm) if clip_norm > 0 else 1.0
    for variable, gradient in zip(model.trainable_variables, gradients):
        variable.assign(variable.numpy() - LEARNING_RATE * (gradient * scale).astype(np.float32))
    return float(loss), norm


@pytest.mark.parametrize("clip_norm", [0.0, 0.05])
def test_one_train_step_equals_a_plain_gradient_tape_step(clip_norm, tmp_path, monkeypatch):
    """Float tolerance, not bit equality: the reference sums the loss over all pixels at once (the step: per
    image, then over the batch), so the last bits of loss and gradients may differ. Built and run in an empty
    directory, which stays empty: the step writes no file."""
    monkeypatch.chdir(tmp_path)
    images, masks = batch()
    mine, reference = twin_models()
    step = step_lib.TrainStep(mine, keras.optimizers.SGD(LEARNING_RATE), losses.CombinedLoss("bce:1"),
                              batch_size=len(images), clip_norm=clip_norm)
    outputs, gradients = step.train_step(tf.constant(images), tf.constant(masks))
    loss, norm = reference_step(reference, images, masks, clip_norm)
    assert bool(outputs["finite"]) and int(step.optimizer.iterations) == 1
    assert float(outputs["loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(outputs["loss/bce"]) == pytest.approx(loss, rel=1e-5)
    assert float(outputs["gradient_norm"]) == pytest.approx(norm, rel=1e-4)
    if clip_norm:
        assert norm > clip_norm  # the clipping really acted
        assert float(tf.linalg.global_norm(gradients)) == pytest.approx(clip_norm, rel=1e-4)
    moved = 0
    initial = twin_models()[0].trainable_variables
    for a, b, before in zip(mine.trainable_variables, reference.trainable_variables, initial):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)
        moved += not np.array_equal(a.numpy(), before.numpy())
    assert moved > len(mine.trainable_variables) // 2  # the update was applied, not skipped
    # Batch-norm moving statistics: the forward pass in training mode moved them in both.
    for a, b in zip(mine.non_trainable_variables, reference.non_trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)
    assert os.listdir(tmp_path) == []


def test_eval_step_equals_numpy_on_the_model_logits():
    images, masks = batch(size=3, seed=1)
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(CONFIG)
    step = step_lib.TrainStep(model, keras.optimizers.SGD(LEARNING_RATE), losses.CombinedLoss("bce:1"),
                              batch_size=3)
    results = step.eval_step(tf.constant(images), tf.constant(masks))
    logits = model(tf.constant(images), training=False).numpy()[..., 0].astype(np.float64)
    np.testing.assert_allclose(results["loss"].numpy(), numpy_bce_per_image(masks[..., 0], logits), rtol=1e-5)
    np.testing.assert_allclose(results["probabilities"].numpy(), 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-7)
    assert "has_salt" not in results and int(step.optimizer.iterations) == 0  # evaluation trains nothing


def test_loss_stages_are_separate_steps():
    """Stage 1 trains with its own loss: its outputs name that loss's terms, and its loss is the Dice term."""
    images, masks = batch(seed=2)
    keras.utils.set_random_seed(0)
    step = step_lib.TrainStep(model_lib.build_model(CONFIG), keras.optimizers.SGD(0.0),
                              [losses.CombinedLoss("bce:1"), losses.CombinedLoss("dice:2")], batch_size=4)
    first, _ = step.train_step(tf.constant(images), tf.constant(masks), stage=0)
    second, _ = step.train_step(tf.constant(images), tf.constant(masks), stage=1)
    assert set(first) == {"loss", "gradient_norm", "loss/bce", "finite"}
    assert set(second) == {"loss", "gradient_norm", "loss/dice", "finite"}
    assert float(second["loss"]) == pytest.approx(2 * float(second["loss/dice"]), rel=1e-6)


def test_trainer_without_a_run_directory_writes_nothing(tmp_path, monkeypatch):
    """The loop runs on a TrainStep with no checkpoints and no summaries: an epoch trains every batch of the
    epoch (steps = images // batch) and evaluates, and no file appears."""
    monkeypatch.chdir(tmp_path)
    images, masks = batch(size=20, seed=3)
    keras.utils.set_random_seed(0)
    step = step_lib.TrainStep(model_lib.build_model(CONFIG), keras.optimizers.Adam(1e-3),
                              losses.CombinedLoss("bce:1"), batch_size=8)
    config = loop.LoopConfig(epochs=1, batch_size=8, eval_batch_size=8, augmentation=pipeline.Augmentation(),
                             profile_steps=(0, 1))
    trainer = loop.Trainer(step, config, (images[4:], masks[4:]), loop.Validation(images[:4], masks[:4], 8))
    summary = trainer.run()
    assert summary["epochs_completed"] == 1 and int(step.optimizer.iterations) == 16 // 8
    assert len(trainer.history.rows) == 1 and 0 <= trainer.history.rows[0]["val_metric"] <= 1
    assert os.listdir(tmp_path) == []


def test_trainer_refuses_a_batch_size_other_than_the_steps():
    keras.utils.set_random_seed(0)
    step = step_lib.TrainStep(model_lib.build_model(CONFIG), keras.optimizers.SGD(0.1),
                              losses.CombinedLoss("bce:1"), batch_size=8)
    images, masks = batch(size=8)
    with pytest.raises(ValueError, match="batch_size=16 but the TrainStep's is 8"):
        loop.Trainer(step, loop.LoopConfig(batch_size=16), (images, masks), loop.Validation(images, masks, 8))


# ---------------------------------------------------------------------------------- partial-epoch state


def test_partial_epoch_reads_the_format_of_older_checkpoints(tmp_path):
    """A checkpoint as written before checkpoints.PartialEpoch existed (and before "finite_steps"): a plain
    string variable named partial_epoch holding JSON. RunCheckpoints restores it and reads the progress; what
    it writes back uses the same key and JSON."""
    old = tf.train.Checkpoint(partial_epoch=tf.Variable(json.dumps({"steps": 3, "sums": {"loss": 1.5},
                                                                   "seconds": 2.0})),
                              epoch=tf.Variable(4, dtype=tf.int64))
    path = old.write(str(tmp_path / "old" / "step-7"))
    epoch = tf.Variable(0, dtype=tf.int64)
    run = checkpoints.RunCheckpoints(str(tmp_path / "new"), keep=2, epoch=epoch)
    assert run.partial_epoch.read() == checkpoints.EpochProgress()  # a fresh epoch before any restore
    run.checkpoint.read(path).assert_existing_objects_matched()
    assert int(epoch.numpy()) == 4
    assert run.partial_epoch.read() == checkpoints.EpochProgress(steps=3, sums={"loss": 1.5}, finite_steps=3,
                                                                 seconds=2.0)
    run.partial_epoch.write(checkpoints.EpochProgress(steps=5, sums={"loss": 2.0}, finite_steps=4, seconds=1.0))
    saved = run.save(9)
    reader = tf.train.load_checkpoint(saved)
    assert json.loads(reader.get_tensor("partial_epoch/.ATTRIBUTES/VARIABLE_VALUE")) == {
        "steps": 5, "sums": {"loss": 2.0}, "finite_steps": 4, "seconds": 1.0}
    run.partial_epoch.clear()
    assert run.partial_epoch.read() == checkpoints.EpochProgress()


def test_run_checkpoints_refuse_a_strategy_scope(tmp_path):
    """The string variable cannot be mirrored (collectives do not broadcast strings): one clear error."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        with pytest.raises(RuntimeError, match="outside strategy.scope"):
            checkpoints.RunCheckpoints(str(tmp_path), keep=1)
