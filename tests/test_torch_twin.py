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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
try:
    import torch_twin  # noqa: E402
finally:
    sys.path.pop(0)

# Small configs covering both upsampling cases ('valid' 50->101 and 12->25, 'same' 25->50, 6->12 and 3->6), one and
# two blocks, projections, an SE hidden width clamped to 1 (2 // 4 = 0 -> 1), another SE ratio, no SE, depth 5.
CONFIGS = [
    model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=1),
    model_lib.ModelConfig(base_width=2, depth=5, blocks_per_level=2, se_ratio=4),
    model_lib.ModelConfig(base_width=6, depth=3, blocks_per_level=1, se_ratio=2),
    model_lib.ModelConfig(base_width=4, depth=4, blocks_per_level=1, se=False),
]


def _keras_counts(model):
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    non_trainable = sum(int(np.prod(v.shape)) for v in model.non_trainable_variables if "float" in str(v.dtype))
    return {"trainable": trainable, "non_trainable": non_trainable, "total": trainable + non_trainable}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"w{c.base_width}d{c.depth}b{c.blocks_per_level}"
                         f"r{c.se_ratio}{'se' if c.se else 'nose'}")
def test_parameter_counts_match_salt_tf(config):
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


def test_rejects_configs_it_does_not_mirror():
    with pytest.raises(ValueError, match="se_type"):
        torch_twin.build_model(model_lib.ModelConfig(se_type="scse"))
    with pytest.raises(ValueError, match="hypercolumn"):
        torch_twin.build_model(model_lib.ModelConfig(hypercolumn=True))


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


@pytest.fixture(scope="module", autouse=True)
def command(request, tmp_path_factory, demo_dir):
    """The command test_command_reports_the_table checks, started when this module starts: its child processes are
    mostly single-threaded start-up, so it runs beside the in-process tests here. Yields (Future of the
    CompletedProcess, its --json path), or None when that test is not selected."""
    if not selected(request, "test_command_reports_the_table"):
        yield None
        return
    # The timing runs in the command's child processes only: in one process with TensorFlow loaded, creating a
    # torch optimizer crashed (segmentation fault, torch 2.14.1 + TF 2.21), and the command never mixes them.
    out = tmp_path_factory.mktemp("torch_twin") / "twin.json"
    twin = functools.partial(
        subprocess.run,
        [sys.executable, os.path.join(REPO_ROOT, "tools", "torch_twin.py"), f"--data_dir={demo_dir}",
         "--systems=tf,eager", "--base_width=2", "--depth=1", "--blocks_per_level=1", "--batch_size=2", "--steps=1",
         "--repeats=1", "--warmup=1", "--matmul_size=128", "--isa=0", f"--json={out}"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    with side_by_side({"twin": twin}) as futures:
        yield futures["twin"], out


def test_command_reports_the_table(command):
    future, out = command
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
