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


def _write_tiny_export(folder):
    """An untrained model (width 4, depth 2, one block, hypercolumn) written as salt_tf exports one (as
    test_serving's _write_export)."""
    import dataclasses

    import keras

    from salt_tf import checkpoints, model as model_lib

    keras.utils.set_random_seed(0)
    config = model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=1, hypercolumn=True)
    checkpoints.export_to(folder, model_lib.build_model(config), {"model": dataclasses.asdict(config),
                                                                  "threshold": 0.5, "use_depth": False, "epoch": 1})


# profile_step's command lines a user can get wrong: {fixture name: the start of its one stderr line}.
PROFILE_ERRORS = {
    "profile_both": "error: flags train_flagfile=",
    "profile_missing_flagfile": "error: flag --train_flagfile=",
    "profile_no_export": "error: flag --model_dir=",
}


@pytest.fixture(scope="module")
def commands(request, tmp_path_factory, demo_dir):
    """bench.py, perf_variants.py, profile_step.py (its three modes and three command-line mistakes) and
    model_summary.py, started together when the module starts: each runs its measuring children one after the
    other, and those are mostly single-threaded TensorFlow start-up and tracing, so the commands (and this module's
    in-process tests) share the 2 cores instead of waiting in turn. No figure is checked for speed. Returns
    {name: (Future of the CompletedProcess, its --json path or None)}; a test's .result() waits for its command."""
    out = tmp_path_factory.mktemp("tools")
    # bench.py times whole epochs and validations of its data: 48 images (39 training, 9 validation) report
    # every figure as 160 do, in 4 steps an epoch instead of 16.
    from salt_tf.data import synthetic

    small = str(out / "data48")
    synthetic.generate(small, num_images=48, seed=0)
    tool = lambda name: os.path.join(REPO_ROOT, "tools", name)  # noqa: E731
    model = ["--base_width=4", "--depth=2", "--blocks_per_level=1"]
    # profile_step --train_flagfile: the recipe's model and loss flags (flags/recipe.cfg) at width 4, depth 2, one
    # block, batch 4; the command line's --depth=3 overrides the file's depth (test_profile_step_train_flagfile).
    flagfile = out / "tiny_recipe.cfg"
    flagfile.write_text("\n".join(["--base_width=4", "--depth=2", "--blocks_per_level=1", "--se", "--se_ratio=2",
                                   "--se_type=scse", "--hypercolumn", "--deep_supervision", "--side_loss_weight=0.1",
                                   "--image_loss_weight=0.05", "--loss=bce:1,lovasz_sym_elu:1", "--optimizer=adam",
                                   "--learning_rate=0.001", "--batch_size=4", "--seed=0", ""]))
    export = out / "export"  # profile_step --model_dir: an untrained tiny export (hypercolumn: resizes forward)
    if selected(request, "test_profile_step_model_dir_profiles_prediction"):
        _write_tiny_export(str(export))
    profile = [sys.executable, tool("profile_step.py"), f"--data_dir={demo_dir}"]
    empty = out / "empty"  # no export in it
    empty.mkdir()
    runs = {
        "bench": ([sys.executable, tool("bench.py"), f"--data_dir={small}", *model, "--batch_size=8", "--steps=2",
                   "--repeats=1", "--matmul_size=128", f"--json={out / 'bench.json'}"], out / "bench.json", 600),
        "perf_variants": ([sys.executable, tool("perf_variants.py"), f"--data_dir={demo_dir}",
                           "--variants=baseline,keras_bn,steps_per_loop", *model, "--batch_size=4", "--steps=4",
                           "--repeats=1", f"--json={out / 'variants.json'}"], out / "variants.json", 600),
        # A child process: the profiler and determinism's thread settings want a fresh TensorFlow.
        "profile_step": ([*profile, *model, "--batch_size=4", "--steps=2", "--top=40",
                          f"--json={out / 'profile.json'}"], out / "profile.json", 300),
        "profile_flagfile": ([*profile, f"--train_flagfile={flagfile}", "--depth=3", "--steps=2", "--by_name=6",
                              f"--json={out / 'profile_flagfile.json'}"], out / "profile_flagfile.json", 300),
        "profile_model_dir": ([*profile, f"--model_dir={export}", "--tta=hflip", "--steps=2", "--batch_size=4",
                               f"--json={out / 'profile_model_dir.json'}"], out / "profile_model_dir.json", 300),
        "profile_both": ([*profile, f"--train_flagfile={flagfile}", f"--model_dir={export}",
                          f"--json={out / 'both.json'}"], out / "both.json", 300),
        "profile_missing_flagfile": ([*profile, f"--train_flagfile={out / 'missing.cfg'}",
                                      f"--json={out / 'missing.json'}"], out / "missing.json", 300),
        "profile_no_export": ([*profile, f"--model_dir={empty}", f"--json={out / 'no_export.json'}"],
                              out / "no_export.json", 300),
        "model_summary": ([sys.executable, tool("model_summary.py"), *model, "--se_type=scse", "--nobench",
                           "--init_scale", "--batch_size=4"], None, 300),
    }
    tests = {"bench": "test_bench_reports_every_figure", "perf_variants": "test_perf_variants_reports_each_variant",
             "profile_step": "test_profile_step_lists_the_convolutions",
             "profile_flagfile": "test_profile_step_train_flagfile_counts_the_sorts_and_resizes",
             "profile_model_dir": "test_profile_step_model_dir_profiles_prediction",
             **{name: "test_profile_step_errors_are_one_line" for name in PROFILE_ERRORS},
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
    future, out = commands["profile_step"]
    result = future.result()
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    conv_rows = [r for r in rows if "Conv2D" in r[0]]
    assert conv_rows, result.stdout
    assert all(float(r[1]) > 0 for r in conv_rows)
    # The default step's loss is BCE + Dice: no Lovász sort (the flagfile's test counts them), no resize.
    report = json.loads(out.read_text())
    assert report["mode"] == "default" and report["batch_size"] == 4
    assert "TopKV2" not in report["counts"] and "ResizeBilinear" not in report["counts"], report["counts"]


def test_profile_step_train_flagfile_counts_the_sorts_and_resizes(commands):
    """--train_flagfile profiles the step the train command builds of the flagfile (the recipe's scSE, hypercolumn,
    deep supervision and bce + lovasz_sym_elu at depth 3, the command line's --depth over the file's 2). Op counts
    per step, by hand from salt_tf/model.py and salt_tf/losses.py:

      decoder levels 0, 1, 2 at 101, 50, 25 pixels; model._resize is a no-op at 101 already, so
      hypercolumn():   levels 1 and 2 resized to 101                                    2 ResizeBilinear
      SideOutputs:     the side logits of levels 1 and 2 resized to 101                   2 ResizeBilinear
      -> 4 ResizeBilinear forward and their 4 ResizeBilinearGrad (each feeds the loss)
      lovasz_symmetric: ONE _descending_order (one tf.math.top_k) per call; DeepSupervisionLoss calls the mask
      loss on the fused output and on each of the 3 side outputs                         4 TopKV2
      (4 distinct sort ops, each once a step), and 2 steps."""
    future, out = commands["profile_flagfile"]
    result = future.result()
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    steps, depth = 2, 3
    assert report["mode"] == "train_flagfile" and report["batch_size"] == 4 and report["model"]["depth"] == depth
    assert report["loss"].startswith("bce:1,lovasz_sym_elu:1") and report["applied"]["op_determinism"]
    counts = report["counts"]
    assert counts.get("TopKV2") == steps * (1 + depth), counts
    assert counts.get("ResizeBilinear") == counts.get("ResizeBilinearGrad") == steps * (2 * (depth - 1)), counts
    sorts = {name: n for name, n in report["name_counts"].items() if name.endswith(":TopKV2")}
    assert len(sorts) == 1 + depth and set(sorts.values()) == {steps}, sorts
    # --by_name=6: six "<op name>:<op type>  seconds" rows after the types, by decreasing time, no wrapper (the
    # function call "KernelAndDeviceFunc::Run", its executor's "Process", "EagerLocalExecute: __inference_...")
    lines = result.stdout.splitlines()
    start = lines.index("op names by time (top 6):") + 1
    rows = [re.fullmatch(r"  (\S+)  ([0-9.]+) s .*", line) for line in lines[start:]]
    assert len(rows) == 6 and all(rows), result.stdout
    names, times = [row[1] for row in rows], [float(row[2]) for row in rows]
    assert times == sorted(times, reverse=True) and all(name in report["name_seconds"] for name in names)
    assert not [name for name in names if name.rsplit(":", 1)[1] in ("Run", "Process") or "__inference" in name]


def test_profile_step_model_dir_profiles_prediction(commands):
    """--model_dir profiles predict submit's batch: inference only (no gradient: no *Grad* op, no weight gradient
    Conv2DBackpropFilter, nothing under gradient_tape/; the decoder's transposed convolution is a
    Conv2DBackpropInput forward), and tta.tta_function's flips for --tta=hflip (views none, hflip): the input's
    hflip view and its probability's un-flip, 2 ReverseV2 a call, 2 calls (the identity view flips nothing)."""
    future, out = commands["profile_model_dir"]
    result = future.result()
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "model_dir" and report["batch_size"] == 4 and report["views"] == ["none", "hflip"]
    counts = report["counts"]
    assert counts.get("ResizeBilinear") == 2 * 1  # the hypercolumn's level 1 (depth 2), one model call per call
    assert not [op for op in counts if "Grad" in op or "BackpropFilter" in op], counts
    assert not [name for name in report["name_counts"] if name.startswith("gradient_tape/")]
    assert counts.get("ReverseV2") == 2 * 2, counts


@pytest.mark.parametrize("name", PROFILE_ERRORS)
def test_profile_step_errors_are_one_line(commands, name):
    future, out = commands[name]
    result = future.result()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and not out.exists(), result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith(PROFILE_ERRORS[name]), result.stderr
    assert {"profile_both": "not both", "profile_missing_flagfile": "no such file",
            "profile_no_export": "no exported model"}[name] in lines[0]


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
