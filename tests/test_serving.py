"""The SavedModel for serving: loaded in a process that cannot import salt_tf, it gives the predict command's
probabilities (TTA, ensemble mean, stacked meta-model, depth input, padded deep-supervised models) and masks
at the run's threshold. And the quiet start: no CUDA lines on a machine without a GPU, real errors kept."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from salt_tf import (checkpoints, ensemble, exports, model as model_lib, pipeline, postprocess, rundir, serving,
                     tfstart, tta)
from salt_tf.data import kaggle
from train_helpers import REPO_ROOT, selected, side_by_side

S = 101
# Depth 1 (one pooling): the fewest layers, and what a SavedModel costs to write grows with them (7.0 -> 4.4 s for
# three padded deep-supervised models); nothing checked here depends on the depth.
TINY = dict(base_width=2, depth=1, blocks_per_level=1)
# Padded input (101 -> 104, reflect) and deep supervision (side logits + image head): the SavedModel must
# give the full-size mask logits of such a model too.
PADDED_DEEP = dict(TINY, input_size=104, deep_supervision=True)

# The loader: a fresh interpreter in tmp_path, salt_tf blocked (the package is installed in editable mode, so
# it would otherwise be importable from anywhere), plain TensorFlow only.
LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np

    class NoSaltTF:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "salt_tf":
                raise ModuleNotFoundError("salt_tf is blocked in this process")
            return None

    sys.meta_path[:] = [NoSaltTF()] + [f for f in sys.meta_path if "editable" not in type(f).__module__]
    try:
        import salt_tf
        blocked = False
    except ImportError:
        blocked = True
    import tensorflow as tf

    jobs = json.load(open("jobs.json"))
    out = {"blocked": blocked}
    for name, job in jobs.items():
        serve = tf.saved_model.load(job["path"]).signatures["serving_default"]
        kwargs = {"images": tf.constant(np.load(job["images"]))}
        if job.get("depths"):
            kwargs["depths"] = tf.constant(np.load(job["depths"]))
        result = serve(**kwargs)
        np.save(name + "_p.npy", result["probabilities"].numpy())
        np.save(name + "_m.npy", result["masks"].numpy())
        out[name] = {"masks_dtype": result["masks"].dtype.name, "p_dtype": result["probabilities"].dtype.name}
    print(json.dumps(out))
""")


def _images(n=5, seed=0):
    """uint8 [n,101,101] with structure (a gradient, a bright blob) and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:S, 0:S]
    base = 60 + 0.8 * xx + 0.3 * yy
    images = []
    for _ in range(n):
        cy, cx = rng.integers(10, 90, size=2)
        blob = 90 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 300.0)
        images.append(np.clip(base + blob + rng.normal(0, 20, size=(S, S)), 0, 255))
    return np.stack(images).astype(np.uint8)


def _write_export(folder, seed, threshold=0.5, use_depth=False, epoch=1, **config):
    """A tiny untrained model of `config` written as salt_tf exports it; returns the model."""
    keras.utils.set_random_seed(seed)
    model_config = model_lib.ModelConfig(**dict(config, input_channels=2 if use_depth else 1))
    model = model_lib.build_model(model_config)
    checkpoints.export_to(str(folder), model, {"model": dataclasses.asdict(model_config), "threshold": threshold,
                                               "use_depth": use_depth, "epoch": epoch, "val_metric": 0.5})
    return model


def _set_threshold(export_dir, threshold):
    """Sets the validation threshold of an export's model.json (chosen after seeing the model's outputs)."""
    path = os.path.join(export_dir, rundir.EXPORT_CONFIG)
    config = json.loads(open(path).read())
    config["threshold"] = float(threshold)
    with open(path, "w") as f:
        json.dump(config, f)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _tta_reference(model, x):
    """Identity + hflip, each view's probability un-flipped, averaged: NumPy, one model call per view (not
    predict's TTA function)."""
    plain = _sigmoid(model_lib.outputs_of(model, x, training=False)["mask"].numpy()[..., 0])
    flipped = _sigmoid(model_lib.outputs_of(model, x[:, :, ::-1].copy(), training=False)["mask"].numpy()[..., 0])
    return (plain + flipped[:, :, ::-1]) / 2


def _export(model_dir, output, *extra):
    status = serving.main(["serving", f"--model_dir={model_dir}", f"--output={output}", *extra])
    assert status == 0
    return output


def _load_elsewhere(tmp_path, jobs):
    """Runs LOADER in a fresh interpreter (cwd tmp_path, no PYTHONPATH, salt_tf blocked); returns
    {name: (probabilities, masks, dtypes)}."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    spec = {}
    for name, (path, images, depths) in jobs.items():
        np.save(work / f"{name}_images.npy", images)
        spec[name] = {"path": str(path), "images": f"{name}_images.npy"}
        if depths is not None:
            np.save(work / f"{name}_depths.npy", depths)
            spec[name]["depths"] = f"{name}_depths.npy"
    (work / "jobs.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", LOADER], cwd=work, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["blocked"], "the loader process could import salt_tf"
    return {name: (np.load(work / f"{name}_p.npy"), np.load(work / f"{name}_m.npy"), out[name]) for name in jobs}


def test_savedmodel_of_a_plain_model_and_a_depth_model_gives_predicts_probabilities(tmp_path):
    plain_run, depth_run = tmp_path / "plain_run", tmp_path / "depth_run"
    images = _images(5)
    model = _write_export(plain_run / "export", seed=1, **TINY)
    # A threshold inside this untrained model's range of probabilities, so the masks are neither all 0 nor all 1.
    threshold = float(np.round(np.median(_tta_reference(model, images[..., None] / np.float32(255.0))), 4))
    _set_threshold(plain_run / "export", threshold)
    _write_export(depth_run / "export", seed=2, threshold=0.52, use_depth=True, **TINY)
    depths = np.array([120.0, 480.0, 955.0, 51.0, 300.0], np.float32)
    _export(plain_run, tmp_path / "served" / "plain" / "1")
    _export(depth_run, tmp_path / "served" / "depth" / "1")

    three = np.repeat(images[..., None], 3, axis=-1)
    got = _load_elsewhere(tmp_path, {
        "gray": (tmp_path / "served" / "plain" / "1", images, None),
        "one": (tmp_path / "served" / "plain" / "1", images[..., None], None),
        "rgb": (tmp_path / "served" / "plain" / "1", three, None),
        "depth": (tmp_path / "served" / "depth" / "1", images, depths)})

    # The predict command's path: its loader, its input preparation, its TTA.
    ids = [f"i{k}" for k in range(len(images))]
    plain = exports.restore(exports.find_exports(str(plain_run))[0]).model
    no_depths = kaggle.depth_array({}, ids)
    expected = tta.predict_probabilities(plain, pipeline.model_inputs(ids, images, no_depths, False), batch_size=2)
    for name in ("gray", "one", "rgb"):
        probabilities, masks, dtypes = got[name]
        assert dtypes == {"masks_dtype": "uint8", "p_dtype": "float32"}
        assert probabilities.shape == masks.shape == (5, S, S)
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(masks, (probabilities > threshold).astype(np.uint8))
    # Independently of predict: image / 255 through the model, hflip un-flipped.
    np.testing.assert_allclose(got["gray"][0], _tta_reference(plain, images[..., None].astype(np.float32) / 255.0),
                               rtol=0, atol=1e-5)
    assert 0 < got["gray"][1].sum() < got["gray"][1].size

    with_depth = exports.restore(exports.find_exports(str(depth_run))[0]).model
    inputs = pipeline.model_inputs(ids, images, kaggle.depth_array(dict(zip(ids, depths)), ids), True)
    probabilities, masks, _ = got["depth"]
    np.testing.assert_allclose(probabilities, tta.predict_probabilities(with_depth, inputs), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(masks, (probabilities > 0.52).astype(np.uint8))
    info = json.loads((tmp_path / "served" / "depth" / "1" / serving.METADATA).read_text())
    assert info["inputs"] == ["images", "depths"] and info["threshold"] == 0.52


def test_savedmodel_of_a_snapshot_ensemble_averages_the_snapshots_with_tta(tmp_path):
    run = tmp_path / "run"
    models = [_write_export(run / "snapshots" / f"snapshot-{k}", seed=10 + k, epoch=k + 1, **PADDED_DEEP)
              for k in range(3)]
    images = _images(4, seed=3)
    x = images[..., None].astype(np.float32) / 255.0
    per_model = [_tta_reference(m, x) for m in models]
    entries = exports.find_exports(str(run))
    named = [{"name": e.name, "epoch": e.config.get("epoch")} for e in entries]
    stacker = ensemble.Stacker(weights=np.array([0.6, 1.3, -0.4]), bias=0.2, models=[e.name for e in entries])
    mean = np.mean(per_model, axis=0)
    stacked_reference = stacker.predict(per_model)
    # Thresholds inside the untrained models' ranges, so the masks are neither all 0 nor all 1.
    mean_threshold = float(np.round(np.median(mean), 4))
    stacked_threshold = float(np.round(np.median(stacked_reference), 4))

    # No ensemble.json: the mean, threshold 0.5. With one: its threshold (mean) or its meta-model (stacked).
    _export(run, tmp_path / "mean")
    ensemble.Ensemble(models=named, tta=["none", "hflip"], combine="mean",
                      postprocessing=postprocess.PostProcessing(threshold=mean_threshold)).save(str(run / "ensemble.json"))
    _export(run, tmp_path / "mean_json")
    stacked = ensemble.Ensemble(models=named, tta=["none", "hflip"], combine="stacked", stacker=stacker,
                                postprocessing=postprocess.PostProcessing(threshold=stacked_threshold))
    stacked.save(str(run / "ensemble.json"))
    _export(run, tmp_path / "stacked")

    got = _load_elsewhere(tmp_path, {name: (tmp_path / name, images, None)
                                     for name in ("mean", "mean_json", "stacked")})
    for name, reference, threshold in (("mean", mean, 0.5), ("mean_json", mean, mean_threshold),
                                       ("stacked", stacked_reference, stacked_threshold)):
        probabilities, masks, _ = got[name]
        np.testing.assert_allclose(probabilities, reference, rtol=0, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(masks, (probabilities > threshold).astype(np.uint8), err_msg=name)
        if name != "mean":
            assert 0 < masks.sum() < masks.size, name
    # The snapshots differ: a SavedModel of one of them would not pass.
    assert np.abs(per_model[0] - mean).max() > 1e-3


def test_serving_command_user_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    _write_export(run / "export", seed=1, **TINY)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = [
        ([f"--model_dir={tmp_path / 'missing'}", f"--output={tmp_path / 'o1'}"], "not found"),
        ([f"--model_dir={run}", f"--output={tmp_path / 'taken'}"], "exists and is not an empty folder"),
        ([f"--model_dir={run}"], "--output is required"),
        ([f"--model_dir={run}", f"--output={tmp_path / 'o2'}", "--tta=sideways"], "--tta=sideways"),
    ]
    for argv, expected in cases:
        assert serving.main(["serving", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------------------
# The serving graph at unit level (issue 38's mutants of serving): hand-made Keras models whose probabilities
# are known in closed form, the graph's function called in this process (no SavedModel written), NumPy float64
# references; then one SavedModel for the flags' precedence.

RAMP = np.broadcast_to(((np.arange(S) - 50) / 25.0)[None, :], (S, S))  # left to right: a flip that is not undone shows


class HandMade(keras.Model):
    """Mask logits gain * (image - 0.5) + ramp * RAMP + offset: no weights, any Keras model serves."""

    def __init__(self, gain, ramp, offset):
        super().__init__()
        self.gain, self.ramp, self.offset = float(gain), float(ramp), float(offset)

    def call(self, x, training=False):
        return self.gain * (x[..., :1] - 0.5) + (self.ramp * RAMP[None, :, :, None] + self.offset).astype(np.float32)


def _hand_made_probabilities(images, gain, ramp, offset, views):
    """NumPy float64: each view's logits of the flipped image, the probabilities un-flipped, averaged."""
    x = images.astype(np.float64) / 255.0
    per_view = []
    for view in views:
        flip = (lambda a: a[:, :, ::-1]) if view == "hflip" else (lambda a: a)
        per_view.append(flip(_sigmoid(gain * (flip(x) - 0.5) + ramp * RAMP + offset)))
    return np.mean(per_view, axis=0)


def _serve(models, views, threshold, chosen=None, images=None):
    """build_module of hand-made models, its serving function on `images`: (probabilities, masks) as NumPy."""
    entries = [exports.LoadedModel(f"m{k}", "unused", {}, model=model) for k, model in enumerate(models)]
    out = serving.build_module(entries, views, threshold, chosen).serve(images)
    return out["probabilities"].numpy(), out["masks"].numpy()


def test_serving_graph_averages_unflipped_views_and_models_and_stacks_clipped_logits():
    images = _images(3, seed=7)
    a, b = (1.5, 1.0, 0.0), (-2.0, 0.5, -0.4)  # (gain, ramp, offset)
    views = ("none", "hflip")
    pa, pb = (_hand_made_probabilities(images, *m, views) for m in (a, b))
    probabilities, masks = _serve([HandMade(*a), HandMade(*b)], views, 0.46, images=images)
    np.testing.assert_allclose(probabilities, (pa + pb) / 2, rtol=0, atol=1e-5)
    clear = np.abs((pa + pb) / 2 - 0.46) > 1e-5  # pixels the reference's float64 puts clearly on one side
    np.testing.assert_array_equal(masks[clear], ((pa + pb) / 2 > 0.46)[clear].astype(np.uint8))
    assert clear.mean() > 0.99 and 0 < masks.sum() < masks.size
    # One view: no flip averaged in.
    only, _ = _serve([HandMade(*a)], ("none",), 0.5, images=images)
    np.testing.assert_allclose(only, _hand_made_probabilities(images, *a, ("none",)), rtol=0, atol=1e-5)
    assert np.abs(only - pa).max() > 1e-2
    # Stacked, one model saturated (float32 sigmoid(40) == 1): its logit is that of 1 - CLIP, not infinite.
    stacker = ensemble.Stacker(weights=np.array([0.8, 0.5]), bias=-0.3, models=["m0", "m1"])
    chosen = ensemble.Ensemble(models=[{"name": "m0"}, {"name": "m1"}], tta=list(views), combine="stacked",
                               stacker=stacker, postprocessing=postprocess.PostProcessing(threshold=0.996))
    stacked, masks = _serve([HandMade(*a), HandMade(0, 0, 40)], views, 0.996, chosen, images=images)
    clip = ensemble.CLIP
    logit = lambda p: np.log(np.clip(p, clip, 1 - clip)) - np.log1p(-np.clip(p, clip, 1 - clip))  # noqa: E731
    reference = _sigmoid(0.8 * logit(pa) + 0.5 * logit(np.ones_like(pa)) - 0.3)
    np.testing.assert_allclose(stacked, reference, rtol=0, atol=1e-5)
    assert reference.max() < 0.9999 and 0 < masks.sum() < masks.size


def test_serving_masks_a_probability_exactly_at_the_threshold_as_no_salt():
    images = _images(2, seed=8)
    # Logits 0 everywhere: every probability is exactly 0.5 (float32), in each view and in the mean.
    probabilities, masks = _serve([HandMade(0, 0, 0)], ("none", "hflip"), 0.5, images=images)
    assert (probabilities == 0.5).all() and masks.sum() == 0
    _, masks = _serve([HandMade(0, 0, 0)], ("none", "hflip"), 0.4999, images=images)
    assert masks.min() == 1


def test_threshold_flag_overrides_ensemble_json_whose_tta_the_graph_uses(tmp_path):
    import tensorflow as tf

    run = tmp_path / "run"
    model = _write_export(run / "export", seed=4, threshold=0.3, **TINY)
    images = _images(3, seed=5)
    x = images[..., None].astype(np.float32) / 255.0
    no_tta = _sigmoid(model_lib.outputs_of(model, x, training=False)["mask"].numpy()[..., 0])
    threshold = float(np.round(np.quantile(no_tta, 0.3), 4))  # inside this untrained model's range
    entries = exports.find_exports(str(run))
    ensemble.Ensemble(models=[{"name": e.name, "epoch": e.config.get("epoch")} for e in entries], tta=["none"],
                      combine="mean", postprocessing=postprocess.PostProcessing(threshold=0.9)
                      ).save(str(run / "ensemble.json"))
    info = serving.export_savedmodel(str(run), str(tmp_path / "sm" / "1"), threshold=threshold)
    assert info["tta"] == ["none"] and info["threshold"] == threshold
    out = tf.saved_model.load(str(tmp_path / "sm" / "1")).signatures[serving.SIGNATURE](images=tf.constant(images))
    probabilities, masks = out["probabilities"].numpy(), out["masks"].numpy()
    np.testing.assert_allclose(probabilities, no_tta, rtol=0, atol=1e-5)
    clear = np.abs(no_tta - threshold) > 1e-5
    np.testing.assert_array_equal(masks[clear], (no_tta > threshold)[clear].astype(np.uint8))
    assert clear.mean() > 0.99 and 0 < masks.sum() < masks.size


# ---------------------------------------------------------------------------------------------------------
# The quiet start.

NO_CUDA = ("cuInit", "CUDA error", "Could not find cuda drivers")


def _quiet_env():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONPATH")}
    env["PYTHONPATH"] = REPO_ROOT
    return env


def test_startup_filter_drops_only_the_no_cuda_notices_and_info():
    banner = tfstart.ABSL_BANNER + "\n"
    text = ("a Python warning before any log line\n"
            + banner
            + "I0000 00:00:1795954306.722707    7824 port.cc:153] oneDNN custom operations are on.\n"
            + "I0000 00:00:1795954306.772146    7824 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
            + "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow\n"
            + "I0000 00:00:1795954306.723044    7824 cudart_stub.cc:31] Could not find cuda drivers on your "
              "machine, GPU will not be used.\n"
            + "E0000 00:00:1795954308.959927    7824 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA "
              "error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
            + "E0000 00:00:1795954309.000001    7824 dso_loader.cc:12] a real problem\n"
            + "  its second line\n"
            + "W0000 00:00:1795954309.000002    7824 x.cc:1] a warning\n"
            + "Traceback (most recent call last):\n")
    shown = tfstart.filter_startup_output(text, min_level=1, driver_present=False)
    assert shown == ("a Python warning before any log line\n" + banner + "E0000 00:00:1795954309.000001    7824 dso_loader.cc:12] a real problem\n"
                     "  its second line\nW0000 00:00:1795954309.000002    7824 x.cc:1] a warning\n"
                     "Traceback (most recent call last):\n")
    # With an NVIDIA driver a failing cuInit is a real error: kept.
    assert "failed call to cuInit" in tfstart.filter_startup_output(text, 1, driver_present=True)
    # Level 2 drops warnings too; nothing but INFO and the notices: no banner either.
    assert "a warning" not in tfstart.filter_startup_output(text, 2, False)
    assert tfstart.filter_startup_output(banner + text.split(banner)[1].split("E0000 00:00:1795954309")[0], 1,
                                         False) == ""
    # TF_CPP_MIN_LOG_LEVEL=0 keeps the INFO lines (with their continuation), still without the CUDA notices.
    everything = tfstart.filter_startup_output(text, 0, False)
    assert "To enable the following instructions" in everything and "cuInit" not in everything


QUIET_START_TEST = "test_commands_start_without_cuda_lines_on_a_cpu_machine"


@pytest.fixture(scope="module", autouse=True)
def quiet_start_commands(request, tmp_path_factory):
    """The commands test_commands_start_without_cuda_lines_on_a_cpu_machine checks, started when this module
    starts: three independent processes, mostly TensorFlow's single-threaded start-up, so they run side by side
    and beside the in-process tests here. Yields {name: Future of the CompletedProcess} (None with a driver, or
    when that test is not selected)."""
    if tfstart.nvidia_driver_present() or not selected(request, QUIET_START_TEST):
        yield None
        return
    work = tmp_path_factory.mktemp("quiet_start")
    commands = {
        "train_help": [sys.executable, "-m", "salt_tf.train", "--help"],
        # The README's demo command, cut to one short epoch: its whole output.
        "demo": [sys.executable, "-m", "salt_tf.train", "--flagfile=flags/demo.cfg", "--epochs=1", "--demo_images=48",
                 "--val_images=16", "--batch_size=8", "--base_width=2", "--depth=2", f"--model_dir={work / 'run'}",
                 f"--data_dir={work / 'data'}"],
        "start": [sys.executable, "-c", "from salt_tf import tfstart; print(tfstart.device_summary())"],
    }
    with side_by_side({name: functools.partial(subprocess.run, command, cwd=REPO_ROOT, env=_quiet_env(),
                                               capture_output=True, text=True, timeout=300)
                       for name, command in commands.items()}) as futures:
        yield futures


@pytest.mark.skipif(tfstart.nvidia_driver_present(), reason="the machine has an NVIDIA driver")
def test_commands_start_without_cuda_lines_on_a_cpu_machine(quiet_start_commands):
    train_help, demo, start = (quiet_start_commands[name].result() for name in ("train_help", "demo", "start"))
    output = train_help.stdout + train_help.stderr
    assert train_help.returncode in (0, 1), output[-2000:]  # absl's --help exits with status 1
    assert "--flagfile" in output and "--model_dir" in output
    assert not [line for line in output.splitlines() if any(n in line for n in NO_CUDA)], output[:3000]

    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, output[-3000:]
    assert not [line for line in output.splitlines() if any(n in line for n in NO_CUDA)], output[:3000]
    assert "devices: CPU:0" in output and "done: best val_metric" in output

    assert start.returncode == 0, start.stderr[-2000:]
    assert start.stdout.strip() == "devices: CPU:0 (no GPU: no NVIDIA driver on this machine)"
    assert not any(n in start.stdout + start.stderr for n in NO_CUDA), start.stderr
