"""Smoke tests of the benchmark commands: they run and report every figure (no timing assertions)."""

import functools
import json
import os
import re
import subprocess
import sys

import pytest

from train_helpers import selected, side_by_side

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def commands(request, tmp_path_factory, demo_dir):
    """bench.py, perf_variants.py, profile_step.py and model_summary.py, started together when the module starts:
    each runs its measuring children one after the other, and those are mostly single-threaded TensorFlow start-up
    and tracing, so the four commands (and this module's in-process test) share the 2 cores instead of waiting in
    turn. No figure is checked for speed. Returns {name: (Future of the CompletedProcess, its --json path or
    None)}; a test's .result() waits for its command."""
    out = tmp_path_factory.mktemp("tools")
    # bench.py times whole epochs and validations of its data: 48 images (39 training, 9 validation) report
    # every figure as 160 do, in 4 steps an epoch instead of 16.
    from salt_tf.data import synthetic

    small = str(out / "data48")
    synthetic.generate(small, num_images=48, seed=0)
    tool = lambda name: os.path.join(REPO_ROOT, "tools", name)  # noqa: E731
    model = ["--base_width=4", "--depth=2", "--blocks_per_level=1"]
    runs = {
        "bench": ([sys.executable, tool("bench.py"), f"--data_dir={small}", *model, "--batch_size=8", "--steps=2",
                   "--repeats=1", "--matmul_size=128", f"--json={out / 'bench.json'}"], out / "bench.json", 600),
        "perf_variants": ([sys.executable, tool("perf_variants.py"), f"--data_dir={demo_dir}",
                           "--variants=baseline,keras_bn,steps_per_loop", *model, "--batch_size=4", "--steps=4",
                           "--repeats=1", f"--json={out / 'variants.json'}"], out / "variants.json", 600),
        # A child process: the profiler and determinism's thread settings want a fresh TensorFlow.
        "profile_step": ([sys.executable, tool("profile_step.py"), f"--data_dir={demo_dir}", *model, "--batch_size=4",
                          "--steps=2", "--top=40"], None, 300),
        "model_summary": ([sys.executable, tool("model_summary.py"), *model, "--se_type=scse", "--nobench",
                           "--init_scale", "--batch_size=4"], None, 300),
    }
    tests = {"bench": "test_bench_reports_every_figure", "perf_variants": "test_perf_variants_reports_each_variant",
             "profile_step": "test_profile_step_lists_the_convolutions",
             "model_summary": "test_model_summary_init_scale_covers_every_block"}
    runs = {name: run for name, run in runs.items() if selected(request, tests[name])}  # those of the selected tests
    with side_by_side({name: functools.partial(subprocess.run, command, capture_output=True, text=True,
                                               timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
                       for name, (command, _, timeout) in runs.items()}) as futures:
        yield {name: (futures[name], json_path) for name, (_, json_path, _) in runs.items()}


def test_bench_reports_every_figure(commands):
    future, out = commands["bench"]
    result = future.result()
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["on"]["applied"]["inter_op_threads"] == 1 and "inter_op_threads" not in report["off"]["applied"]
    for name, value in report["table"].items():
        assert value == value and (value > 0 or "overhead" in name), name  # finite, positive rates
        assert name.split(" (")[0] in result.stdout


def test_bench_pipeline_reports(demo_dir, capsys):
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    try:
        import bench_pipeline
    finally:
        sys.path.pop(0)
    results = bench_pipeline.main([f"--data_dir={demo_dir}", "--repeats=1", "--batch_size=8"])
    assert results["images"] == 160 and results["pipeline_images_per_second"] > 0
    assert results["sweep_400_images_50_thresholds_seconds"] > 0
    assert "pipeline_images_per_second" in capsys.readouterr().out


def test_perf_variants_reports_each_variant(commands):
    future, out = commands["perf_variants"]
    result = future.result()
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())["results"]
    assert set(report) == {"baseline", "keras_bn", "steps_per_loop"}
    for name, value in report.items():
        assert value.get("images_per_second", 0) > 0, (name, value)
        assert name in result.stdout


def test_profile_step_lists_the_convolutions(commands):
    result = commands["profile_step"][0].result()
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    conv_rows = [r for r in rows if "Conv2D" in r[0]]
    assert conv_rows, result.stdout
    assert all(float(r[1]) > 0 for r in conv_rows)


def test_model_summary_init_scale_covers_every_block(commands):
    """--init_scale prints one finite, positive output std for each block of the summary table, in its order,
    and the loss's gradient norm."""
    result = commands["model_summary"][0].result()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("at initialisation"))
    table = lines[lines.index("-" * 52) + 1:]
    blocks = [line.split()[0] for line in table[:table.index("-" * 52)]]
    scales = [line.split() for line in lines[start + 1:start + 1 + len(blocks)]]
    assert [row[0] for row in scales] == blocks, result.stdout
    assert all(0 < float(row[-1]) < 100 for row in scales), result.stdout
    bce, norm = re.fullmatch(r"\s*BCE ([0-9.]+), gradient norm ([0-9.]+)", lines[start + 1 + len(blocks)]).groups()
    assert float(bce) > 0 and float(norm) > 0, result.stdout


def test_fused_adam_patch_follows_adam_and_moves_the_bits():
    """perf_variants' fused_adam (issue 39's experiment) is Adam: three steps on one variable within float32
    rounding of Adam in float64 NumPy (hand-written, independent of Keras and the kernel), and, as its docstring
    and docs/performance.md say, not bit-identical to Keras 3's Adam."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    import keras
    import numpy as np
    import perf_variants
    from keras.src.optimizers import adam

    rng = np.random.default_rng(0)
    start = rng.normal(size=(64,)).astype(np.float32)
    grads = [rng.normal(size=(64,)).astype(np.float32) for _ in range(3)]

    def run():
        variable = keras.Variable(start)
        optimizer = keras.optimizers.Adam(learning_rate=0.01)
        for g in grads:
            optimizer.apply_gradients([(g, variable)])
        return np.asarray(variable.numpy())

    keras_result = run()
    original = adam.Adam.update_step
    try:
        perf_variants.patch_fused_adam()
        fused_result = run()
    finally:
        adam.Adam.update_step = original
    x, m, v = start.astype(np.float64), np.zeros(64), np.zeros(64)
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        x = x - 0.01 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(fused_result, x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(keras_result, x, rtol=0, atol=1e-5)
    assert not np.array_equal(fused_result, keras_result)
