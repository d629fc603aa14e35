"""Smoke tests of the benchmark commands: they run and report every figure (no timing assertions)."""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_reports_every_figure(tmp_path, demo_dir):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "bench.py"), f"--data_dir={demo_dir}",
         "--base_width=4", "--depth=2", "--blocks_per_level=1", "--batch_size=8", "--steps=2", "--repeats=1",
         f"--json={out}"], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
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


def test_perf_variants_reports_each_variant(tmp_path, demo_dir):
    out = tmp_path / "variants.json"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "perf_variants.py"), f"--data_dir={demo_dir}",
         "--variants=baseline,keras_bn,steps_per_loop", "--base_width=4", "--depth=2", "--blocks_per_level=1",
         "--batch_size=4", "--steps=4", "--repeats=1", f"--json={out}"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())["results"]
    assert set(report) == {"baseline", "keras_bn", "steps_per_loop"}
    for name, value in report.items():
        assert value.get("images_per_second", 0) > 0, (name, value)
        assert name in result.stdout


def test_profile_step_lists_the_convolutions(demo_dir):
    # A child process: the profiler and determinism's thread settings want a fresh TensorFlow.
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "profile_step.py"), f"--data_dir={demo_dir}",
         "--base_width=4", "--depth=2", "--blocks_per_level=1", "--batch_size=4", "--steps=2", "--top=40"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    conv_rows = [r for r in rows if "Conv2D" in r[0]]
    assert conv_rows, result.stdout
    assert all(float(r[1]) > 0 for r in conv_rows)
