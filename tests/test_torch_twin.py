"""The PyTorch twin of tools/torch_twin.py against salt_tf's model: parameters, output shape, the function computed
with the same weights, and the loss against a float64 NumPy reference. Skipped when torch is not installed."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch twin needs PyTorch: pip install -e '.[torch]'")

import keras  # noqa: E402

from salt_tf import model as model_lib  # noqa: E402
from train_helpers import selected, side_by_side  # noqa: E402

from tool_modules import import_tool  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch_twin = import_tool("torch_twin")


# Small configs covering both upsampling cases ('valid' 50->101 and 12->25, 'same' 25->50, 6->12 and 3->6), one and
# two blocks, projections, an SE hidden width clamped to 1 (2 // 4 = 0 -> 1), another SE ratio, no SE, depth 5.
CONFIGS = [
    model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=1),
    model_lib.ModelConfig(base_width=2, depth=5, blocks_per_level=2, se_ratio=4),
    model_lib.ModelConfig(base_width=6, depth=3, blocks_per_level=1, se_ratio=2),
    model_lib.ModelConfig(base_width=4, depth=4, blocks_per_level=1, se=False),
    # The recipe's components (flags/recipe.cfg: scSE, hypercolumn, deep supervision) at a small width, and
    # variants: scSE with another ratio and the hypercolumn at depth 2; deep supervision without any gate at depth 5.
    model_lib.ModelConfig(base_width=4, depth=4, blocks_per_level=2, se_type="scse", hypercolumn=True,
                          deep_supervision=True),
    model_lib.ModelConfig(base_width=3, depth=2, blocks_per_level=1, se_type="scse", se_ratio=2, hypercolumn=True),
    model_lib.ModelConfig(base_width=2, depth=5, blocks_per_level=1, se=False, deep_supervision=True),
]


def _keras_counts(model):
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    non_trainable = sum(int(np.prod(v.shape)) for v in model.non_trainable_variables if "float" in str(v.dtype))
    return {"trainable": trainable, "non_trainable": non_trainable, "total": trainable + non_trainable}


def _config_id(c):
    return (f"w{c.base_width}d{c.depth}b{c.blocks_per_level}r{c.se_ratio}{c.se_type if c.se else 'nose'}"
            f"{'-hc' if c.hypercolumn else ''}{'-ds' if c.deep_supervision else ''}")


def _assert_same_tensors(config):
    """The twin of `config` has salt_tf's parameter counts, and tensor by tensor the same names and sizes."""
    keras.utils.set_random_seed(0)
    tf_model = model_lib.build_model(config)
    twin = torch_twin.build_model(config)
    counts = torch_twin.parameter_count(twin)
    assert counts == _keras_counts(tf_model)  # trainable with trainable, BN statistics with BN statistics
    assert counts["total"] == model_lib.count_params(tf_model)
    # Tensor by tensor: every Keras variable has the twin tensor of the same size, and none is left over.
    keras_sizes = sorted((torch_twin.torch_name(v.path), int(np.prod(v.shape))) for v in tf_model.weights
                         if "float" in str(v.dtype))
    twin_sizes = sorted((name, t.numel()) for name, t in twin.state_dict().items() if t.is_floating_point())
    assert keras_sizes == twin_sizes


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_parameter_counts_match_salt_tf(config):
    _assert_same_tensors(config)


def test_default_model_parameter_count():
    # The default model: 4.33 M parameters in docs/performance.md; the twin's count equals salt_tf's.
    keras.utils.set_random_seed(0)
    assert torch_twin.parameter_count(torch_twin.build_model())["total"] == model_lib.count_params(
        model_lib.build_model(model_lib.ModelConfig()))


def test_same_weights_same_output_shape_and_values():
    """With the Keras weights copied in, the twin computes salt_tf's function on a 101x101 batch (training mode:
    batch statistics; and evaluation mode after one training forward moved the moving statistics)."""
    config = model_lib.ModelConfig(base_width=4, depth=4, blocks_per_level=2, se_ratio=2)
    keras.utils.set_random_seed(1)
    tf_model = model_lib.build_model(config)
    twin = torch_twin.build_model(config)
    torch_twin.load_keras_weights(twin, {v.path: v.numpy() for v in tf_model.weights if "float" in str(v.dtype)})
    rng = np.random.default_rng(0)
    images = rng.random((3, 101, 101, 1), dtype=np.float32)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    expected = tf_model(images, training=True).numpy()
    twin.train()
    with torch.no_grad():
        got = twin(x).numpy().transpose(0, 2, 3, 1)
    assert expected.shape == got.shape == (3, 101, 101, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    # Moving statistics after that training forward agree to within the biased/unbiased variance update (n = 3 *
    # 101 * 101 pixels at level 0), so evaluation outputs agree closely too.
    twin.eval()
    with torch.no_grad():
        got_eval = twin(x).numpy().transpose(0, 2, 3, 1)
    expected_eval = tf_model(images, training=False).numpy()
    np.testing.assert_allclose(got_eval, expected_eval, rtol=1e-2, atol=1e-2 * np.abs(expected_eval).max())


def test_rejects_configs_it_does_not_mirror(recipe):
    with pytest.raises(ValueError, match="dropout"):
        torch_twin.build_model(model_lib.ModelConfig(dropout=0.1))
    with pytest.raises(ValueError, match="input_size"):
        torch_twin.build_model(model_lib.ModelConfig(input_size=128))
    configs, _ = recipe
    for change, match in [({"precision": "mixed_bfloat16"}, "float32"),
                          ({"optimizer": dict(configs["optimizer"], optimizer="sgd")}, "Adam"),
                          ({"optimizer": dict(configs["optimizer"], weight_decay=1e-4)}, "weight decay"),
                          ({"loss": dict(configs["loss"], terms=[["focal", 1.0]])}, "focal")]:
        with pytest.raises(ValueError, match=match):
            torch_twin.twin_recipe(dict(configs, **change))


@pytest.fixture(scope="module")
def recipe():
    """flags/recipe.cfg as the tool reads it (``config_child``: the train command's flags and config builders), and
    the project's loss built from the same parsed flags as train.py builds it (``losses.build_losses``)."""
    from absl import flags
    from absl.testing import flagsaver

    from salt_tf import configs, flags as salt_flags, losses

    salt_flags.define_flags()
    args = torch_twin.parse_args([f"--flagfile={os.path.join(REPO_ROOT, 'flags', 'recipe.cfg')}"])
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        recipe_configs = torch_twin.config_child(args)
        loss = losses.build_losses(configs.loss_config(), configs.model_config().deep_supervision)[0]
    return recipe_configs, loss


def test_recipe_flagfile_is_mirrored(recipe):
    """The recipe has what the tests below cover (scSE, hypercolumn, deep supervision, symmetric Lovász), and its
    full-width twin has salt_tf's tensors, name by name."""
    configs, loss = recipe
    model = configs["model"]
    assert model["se"] and model["se_type"] == "scse" and model["hypercolumn"] and model["deep_supervision"]
    assert "lovasz_sym_elu" in dict(configs["loss"]["terms"]) and configs["loss"]["side_weight"] > 0
    assert configs["loss"]["image_weight"] > 0 and type(loss).__name__ == "DeepSupervisionLoss"
    twin = torch_twin.twin_recipe(configs)
    assert twin["config"] == torch_twin.twin_config(model_lib.ModelConfig(**model))
    assert twin["learning_rate"] == configs["optimizer"]["learning_rate"] and configs["batch_size"] == 32
    _assert_same_tensors(model_lib.ModelConfig(**model))


@pytest.mark.parametrize("size", [50, 25, 12, 6, 3])
def test_resize_is_tf_image_resize(size):
    """The twin's upsampling is salt_tf's: tf.image.resize bilinear (half-pixel centres, edges clamped)."""
    import tensorflow as tf

    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    expected = tf.image.resize(x, (101, 101), method="bilinear").numpy()
    got = torch_twin.resize(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 101).numpy().transpose(0, 2, 3, 1)
    # Each output is a convex combination of 4 inputs (|x| < 6): float32 rounding is below 1e-5.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_recipe_same_weights_same_outputs(recipe):
    """With the Keras weights copied in, the recipe's twin (at width 4) computes every output of salt_tf's model:
    the fused mask logits, each side output's and the image head's, training mode (batch statistics)."""
    configs, _ = recipe
    config = model_lib.ModelConfig(**dict(configs["model"], base_width=4))
    keras.utils.set_random_seed(2)
    tf_model = model_lib.build_model(config)
    twin = torch_twin.build_model(config)
    torch_twin.load_keras_weights(twin, {v.path: v.numpy() for v in tf_model.weights if "float" in str(v.dtype)})
    images = np.random.default_rng(1).random((3, 101, 101, 1), dtype=np.float32)
    expected = tf_model(images, training=True, all_outputs=True)
    with torch.no_grad():
        got = twin.outputs(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    pairs = [("mask", got["mask"], expected["mask"]), ("has_salt", got["has_salt"][:, None], expected["has_salt"])]
    assert len(got["sides"]) == len(expected["sides"]) == config.depth
    pairs += [(f"side {i}", g, e) for i, (g, e) in enumerate(zip(got["sides"], expected["sides"]))]
    for name, g, e in pairs:
        g = g.numpy().transpose(0, 2, 3, 1) if g.ndim == 4 else g.numpy()[:, 0]
        e = e.numpy()
        assert g.shape == e.shape, name
        # Measured (width 4, seeds 1-3): the float32 twin is within 7e-6 of the output's scale of itself in float64,
        # TensorFlow's float32 forward 2e-5 to 3.2e-4 from that float64 twin (its rounding on these small training
        # batches: batch statistics of 3 x 6 x 6 pixels at the bottleneck). 1e-3 leaves a 3x margin and still
        # catches a change of function (dropping the spatial gate moves the outputs by their own size).
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-3 * np.abs(e).max(), err_msg=name)


def _loss_batch(depth: int = 4, size: int = 9):
    """Masks and logits (NHWC, float32) of 6 images: salt, empty, full, and three with ties: errors 1 - z (2y - 1)
    equal between salt and background pixels (z = +-0.5, +-1.5 exactly in float32, so the tie is exact in both
    frameworks and the sort's tie order decides the gradient); large logits in image 2 (flat relu, saturated BCE)."""
    rng = np.random.default_rng(7)
    masks = np.zeros((6, size, size, 1), np.float32)
    masks[0, 2:6, 3:8] = 1.0
    masks[2] = 1.0
    masks[3] = (rng.random((size, size, 1)) < 0.5)
    masks[5, :2] = 1.0  # a thin strip of salt
    def logits():
        z = (3.0 * rng.normal(size=masks.shape)).astype(np.float32)
        z[2] *= 10.0
        for i in (3, 4, 5):  # y = 1, z = 0.5 and y = 0, z = -0.5 both have error 0.5 (1.5: error -0.5)
            z[i] = np.where(masks[i] > 0.5, 1.0, -1.0) * rng.choice([0.5, 1.5, -0.5], size=(size, size, 1))
        return z
    outputs = {"mask": logits(), "sides": tuple(logits() for _ in range(depth)),
               "has_salt": np.array([2.0, -1.0, 0.0, 3.0, 0.5, -4.0], np.float32)}
    return masks, outputs


def _project_loss_and_gradients(loss_fn, masks, outputs):
    """salt_tf's batch loss (the step's mean of the per-image loss), per-image losses and gradients w.r.t. every
    logit, in TensorFlow (float32)."""
    import tensorflow as tf

    tensors = {k: tf.constant(v) if k != "sides" else tuple(tf.constant(s) for s in v) for k, v in outputs.items()}
    flat = [tensors["mask"], *tensors.get("sides", ()), *([tensors["has_salt"]] if "has_salt" in tensors else [])]
    with tf.GradientTape() as tape:
        tape.watch(flat)
        per_image, _ = loss_fn(tf.constant(masks), tensors if "sides" in tensors else tensors["mask"])
        loss = tf.reduce_mean(per_image)
    return float(loss), per_image.numpy(), [g.numpy() for g in tape.gradient(loss, flat)]


def _twin_loss_and_gradients(twin_loss, masks, outputs):
    """The twin's batch loss, per-image losses and gradients in float64 (NCHW tensors, NHWC gradients back)."""
    nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)  # noqa: E731
    tensors = {"mask": nchw(outputs["mask"])}
    if "sides" in outputs:
        tensors["sides"] = tuple(nchw(s) for s in outputs["sides"])
        tensors["has_salt"] = torch.tensor(outputs["has_salt"], dtype=torch.float64, requires_grad=True)
    flat = [tensors["mask"], *tensors.get("sides", ()), *([tensors["has_salt"]] if "has_salt" in tensors else [])]
    y = torch.from_numpy(masks.transpose(0, 3, 1, 2).copy())
    loss = twin_loss(tensors, y)
    loss.backward()
    grads = [t.grad.numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.grad.numpy() for t in flat]
    return loss.item(), twin_loss.per_image(tensors, y).detach().numpy(), grads


def _assert_same_loss(project, twin):
    (value, per_image, grads), (twin_value, twin_per_image, twin_grads) = project, twin
    # The project computes in float32 (losses cast to it), the twin here in float64: relative 1e-5 is float32's
    # accumulated rounding over 81-pixel sums; gradients are compared at 1e-5 of their largest entry.
    assert twin_value == pytest.approx(value, rel=1e-5)
    np.testing.assert_allclose(twin_per_image, per_image, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(twin_grads)
    for i, (g, t) in enumerate(zip(grads, twin_grads)):
        np.testing.assert_allclose(t, g, rtol=1e-4, atol=1e-5 * np.abs(g).max(), err_msg=f"gradient {i}")


def test_recipe_loss_and_gradients_match_salt_tf(recipe):
    """The recipe's loss (fused output, side outputs on images with salt only, image head) and its gradient w.r.t.
    every logit: the twin in float64 against the project's loss built from flags/recipe.cfg."""
    configs, project_loss = recipe
    twin_loss = torch_twin.twin_recipe(configs)["loss"]
    masks, outputs = _loss_batch(depth=configs["model"]["depth"])
    errors = 1.0 - outputs["mask"][3] * (2.0 * masks[3] - 1.0)  # the tie case really ties salt and background
    assert np.isin(errors[masks[3] > 0.5], errors[masks[3] < 0.5]).any()
    project = _project_loss_and_gradients(project_loss, masks, outputs)
    _assert_same_loss(project, _twin_loss_and_gradients(twin_loss, masks, outputs))
    # The empty images' side outputs get no gradient (deep supervision scores sides on images with salt only).
    for side_gradient in project[2][1:-1]:
        assert not side_gradient[[1, 4]].any() and side_gradient[[0, 2, 3, 5]].any()


@pytest.mark.parametrize("name", list(torch_twin.LOSS_TERMS))
def test_loss_terms_match_salt_tf(name):
    """Each term the twin mirrors, alone and weighted with BCE, against losses.CombinedLoss on the same batch."""
    from salt_tf import losses

    masks, outputs = _loss_batch()
    for terms in ([(name, 1.0)], [("bce", 0.5), (name, 2.0)] if name != "bce" else [(name, 3.0)]):
        mask_only = {"mask": outputs["mask"]}
        project = _project_loss_and_gradients(losses.CombinedLoss(terms), masks, mask_only)
        _assert_same_loss(project, _twin_loss_and_gradients(torch_twin.TwinLoss(terms), masks, mask_only))


def _reference_loss(logits, masks):
    """BCE (pixel mean per image) + Dice (smooth 1) per image, batch mean, in float64 NumPy."""
    z = logits.reshape(len(logits), -1).astype(np.float64)
    y = masks.reshape(len(masks), -1).astype(np.float64)
    bce = (np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))).mean(axis=1)
    p = 1.0 / (1.0 + np.exp(-z))
    dice = 1.0 - (2.0 * (p * y).sum(axis=1) + 1.0) / (p.sum(axis=1) + y.sum(axis=1) + 1.0)
    return float((bce + dice).mean())


def test_loss_matches_float64_reference_and_salt_tf():
    logits = np.array([[[0.0, 2.0, -3.0], [8.0, -0.5, 1.5]],     # image with salt
                       [[-4.0, -1.0, 0.25], [-20.0, 3.0, -2.0]],  # empty mask
                       [[30.0, 1.0, -1.0], [0.5, 0.5, -7.0]]], np.float32)[..., None]
    masks = np.array([[[0, 1, 0], [1, 0, 1]], [[0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]]], np.float32)[..., None]
    got = torch_twin.bce_dice_loss(torch.from_numpy(logits), torch.from_numpy(masks)).item()
    reference = _reference_loss(logits, masks)
    assert reference == pytest.approx(1.2209627, abs=1e-6)  # the reference checked by a per-pixel log(sigmoid) sum
    assert got == pytest.approx(reference, rel=1e-6)
    from salt_tf import losses

    project = float(np.mean(losses.CombinedLoss("bce:1,dice:1")(masks, logits)[0].numpy()))
    assert got == pytest.approx(project, rel=1e-6)


COMMAND_TESTS = ("test_command_reports_the_table", "test_recipe_command_reports_the_table",
                 "test_missing_flagfile_is_one_error_line")


@pytest.fixture(scope="module", autouse=True)
def command(request, tmp_path_factory, demo_dir):
    """The commands the command tests check, started when this module starts: their child processes are mostly
    single-threaded start-up, so they run beside the in-process tests here. Yields {test name: (Future of the
    CompletedProcess, its --json path)} for the selected ones."""
    # The timing runs in the command's child processes only: in one process with TensorFlow loaded, creating a
    # torch optimizer crashed (segmentation fault, torch 2.14.1 + TF 2.21), and the command never mixes them.
    out = tmp_path_factory.mktemp("torch_twin")
    tiny = ["--systems=tf,eager", "--steps=1", "--repeats=1", "--warmup=1", "--matmul_size=128", "--isa=0"]
    argv = {"test_command_reports_the_table": ["--base_width=2", "--depth=1", "--blocks_per_level=1",
                                               "--batch_size=2", *tiny],
            # The recipe's flagfile at width 2, depth 2, one block, batch 4 (a batch with and without salt).
            "test_recipe_command_reports_the_table": [f"--flagfile={os.path.join(REPO_ROOT, 'flags', 'recipe.cfg')}",
                                                      "--base_width=2", "--depth=2", "--blocks_per_level=1",
                                                      "--batch_size=4", *tiny],
            "test_missing_flagfile_is_one_error_line": [f"--flagfile={out / 'missing.cfg'}", *tiny]}
    calls = {}
    for name, args in argv.items():
        if selected(request, name):
            calls[name] = functools.partial(
                subprocess.run, [sys.executable, os.path.join(REPO_ROOT, "tools", "torch_twin.py"),
                                 f"--data_dir={demo_dir}", *args, f"--json={out / name}.json"],
                capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    with side_by_side(calls) as futures:
        yield {name: (future, out / f"{name}.json") for name, future in futures.items()}


def test_command_reports_the_table(command):
    future, out = command["test_command_reports_the_table"]
    result = future.result()
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    rows = {row["key"]: row for row in report["table"]}
    assert rows["tf"]["ratio_to_project_step"] == 1.0 and rows["eager"]["images_per_second"] > 0
    assert report["results"]["tf"]["parameters"] == report["results"]["eager"]["parameters"]
    assert report["results"]["tf"]["applied"]["inter_op_threads"] == 1
    assert np.isfinite(report["results"]["eager"]["final_loss"])
    assert report["results"]["eager"]["threads"] == {"intra_op_threads": os.cpu_count() or 2, "inter_op_threads": 1}
    assert all(v > 0 for v in report["matmul_gflops_per_second"].values())
    assert "PyTorch twin, eager" in result.stdout and report["cpu"]["model_name"]


def test_recipe_command_reports_the_table(command):
    """--flagfile=flags/recipe.cfg: the tf child times the train command's recipe step (its loss, the deterministic
    setting), the twin the same model (equal parameter count) and loss; the tool's shape flags override the file's."""
    future, out = command["test_recipe_command_reports_the_table"]
    result = future.result()
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    tf_result, eager = report["results"]["tf"], report["results"]["eager"]
    assert tf_result["images_per_second"] > 0 and eager["images_per_second"] > 0
    assert tf_result["loss"].startswith("DeepSupervisionLoss(CombinedLoss('bce:1,lovasz_sym_elu:1'")
    assert tf_result["applied"]["inter_op_threads"] == 1
    model = report["flagfile_configs"]["model"]
    assert (model["base_width"], model["depth"], model["blocks_per_level"]) == (2, 2, 1)
    assert model["se_type"] == "scse" and model["hypercolumn"] and model["deep_supervision"]
    assert report["flagfile_configs"]["batch_size"] == report["args"]["batch_size"] == 4
    assert tf_result["parameters"] == eager["parameters"] and np.isfinite(eager["final_loss"])
    assert "recipe.cfg" in result.stdout and "lovasz_sym_elu" in result.stdout


def test_missing_flagfile_is_one_error_line(command):
    future, out = command["test_missing_flagfile_is_one_error_line"]
    result = future.result()
    assert result.returncode == 2 and not out.exists()
    assert result.stderr.strip().splitlines() == [
        f"error: --flagfile={out.parent / 'missing.cfg'}: no such file; give a train flagfile such as flags/recipe.cfg"]
