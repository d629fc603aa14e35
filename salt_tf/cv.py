"""Cross-validation: K fold runs of one recipe, their out-of-fold (OOF) score, comparisons, pseudo-labels.

    python -m salt_tf.cv train --flagfile=F --parent=P --folds=K [--parallel=N] [train flags ...]
    python -m salt_tf.cv collect --parent=P [--tta=hflip] [--data_dir=DIR]
    python -m salt_tf.cv compare P1 P2
    python -m salt_tf.cv pseudo --model_dir=<run | export | P> --images=DIR --output=NEW [--min_confidence=0.9]

`train` trains fold k of K into P/fold-k (`python -m salt_tf.train ... --folds=K --fold=k --model_dir=P/fold-k`,
one process per fold, one after another or --parallel=N at a time), skipping finished folds and resuming
unfinished ones, then runs `collect`. `collect` predicts each labelled image with the models of the fold that
validated on it (with TTA), writes P/oof.npz (their mean, and each model's prediction and the image head where
they apply) and P/oof.json and prints the OOF table (metric at 0.5 and at the cross-validated threshold, per
coverage group, bootstrap intervals). `compare` puts two CV parents side by side image by image (mean
difference, paired-bootstrap interval). `pseudo` predicts unlabelled images with a
run, an export or all fold models of P (the mean of the folds) and writes the confident ones as a labelled
folder for `train --extra_data_dir`. The fold ensemble's submission and its evaluation on the OOF predictions
are salt_tf.predict's (`--model_dir=P`).

A fold run is an ordinary run directory: on a cluster, run one job per fold with the train command itself,
then `collect`. Files: salt_tf.oof (oof.npz, oof.json), salt_tf.pseudo (the pseudo-label folder and rule); the
fold runs of a parent are found by salt_tf.rundir (`fold_runs`), their models by salt_tf.exports. The command
line is salt_tf.cli's (a Program of subcommands; `cv train` passes the arguments it does not define on to the
train command). Exit status: 0 done, 1 a fold's training failed or a write failed, 2 a bad flag, path or data
(one line, nothing written), 130/143 stopped by a signal (the running folds checkpoint; rerun to resume).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

import numpy as np
from absl import flags

from salt_tf import cli, exports, oof, pseudo, rundir, tta
from salt_tf.data import kaggle

DEFAULT_TTA = "hflip"
DEFAULT_BATCH_SIZE = 64


class CVError(ValueError):
    """A bad flag, path or fold layout; the command prints it as one line and exits 2."""


def _say(message: str = "") -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The models. TensorFlow is imported only when a subcommand predicts (exports.restore), so --help is instant.


def predicted_members(entries: Sequence[exports.LoadedModel], ids: Sequence[str], images: np.ndarray,
                      depths: dict[str, float] | None, views: Sequence[str], batch_size: int):
    """The TTA probabilities of the ensemble's members (exports.members: each model of a run or of one fold;
    a CV parent's positions or folds) and their image head.

    Args:
        entries: the path's models (exports.find_exports), restored here.
        ids, images: the images (uint8 [N,101,101]) and their ids.
        depths: {id: z} for models trained with --use_depth (None otherwise).
        views: the test-time augmentation views (tta.parse_tta).
        batch_size: images per model call.

    Returns:
        (one float32 [N,101,101] per member, in order; the head's salt probability [N] combined as the members
        are, or None when the models have no image head): exports.predict_members.
    """
    for entry in entries:
        exports.restore(entry)
    return exports.predict_members(entries, ids, images, kaggle.depth_array(depths or {}, ids), views, batch_size)


def predicted_mean(entries: Sequence[exports.LoadedModel], ids: Sequence[str], images: np.ndarray,
                   depths: dict[str, float] | None, views: Sequence[str], batch_size: int) -> np.ndarray:
    """The mean TTA probabilities [N,101,101] float32 of the models of one path (a run: its snapshots, else its
    export/; an export folder; a CV parent: every fold weighing the same, exports.members); arguments as
    predicted_members."""
    members, _ = predicted_members(entries, ids, images, depths, views, batch_size)
    return np.mean(members, axis=0)


# ---------------------------------------------------------------------------------------------------------
# Flags: each subcommand has a FlagValues of its own (salt_tf.cli); its --help lists only its flags.


def _define_parent(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("parent", None, "The CV parent folder: fold k's run directory is <parent>/fold-k.",
                        flag_values=flag_values)


def _define_prediction_flags(flag_values: flags.FlagValues) -> None:
    """--tta and --batch_size of the subcommands that predict (collect, pseudo)."""
    flags.DEFINE_string("tta", DEFAULT_TTA, "Test-time augmentation: 'none', or views averaged with the identity "
                        "from hflip,vflip.", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Images per model call.", lower_bound=1,
                         flag_values=flag_values)


def define_train_flags(flag_values: flags.FlagValues) -> None:
    """The flags of `cv train` itself (every other argument is the folds' train command's)."""
    _define_parent(flag_values)
    flags.DEFINE_integer("parallel", 1, "Folds trained at the same time (each its own process and threads; on a "
                         "machine with few cores, 1).", lower_bound=1, flag_values=flag_values)


def define_collect_flags(flag_values: flags.FlagValues) -> None:
    """The flags of `cv collect`."""
    _define_parent(flag_values)
    flags.DEFINE_string("data_dir", None, "The labelled folder the folds trained on, if it moved (default: the "
                        "folds' own, rundir.data_dir).", flag_values=flag_values)
    _define_prediction_flags(flag_values)


def define_compare_flags(flag_values: flags.FlagValues) -> None:
    """`cv compare` has no flags: two CV parents."""


def define_pseudo_flags(flag_values: flags.FlagValues) -> None:
    """The flags of `cv pseudo` (the model, the images, the rule, the output)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("model_dir", None, "A run directory (its snapshots, else its export/), an export folder, "
                        "or a CV parent (the mean of its fold models).", **fv)
    flags.DEFINE_string("images", None, "Folder of unlabelled 101x101 PNG images, e.g. <data>/test/images.", **fv)
    flags.DEFINE_string("output", None, "The labelled folder to write (new; Kaggle layout + confidence.csv).", **fv)
    flags.DEFINE_enum("confidence", "band", list(pseudo.RULES), "band: 1 - the share of pixels with probability "
                      "inside --band (the first-place TGS team's rule); margin: the mean of |2p - 1|.", **fv)
    flags.DEFINE_float("min_confidence", pseudo.DEFAULT_MIN_CONFIDENCE, "Keep an image whose confidence is at "
                       "least this (0.9 with band: at most 10% of its pixels uncertain).", lower_bound=0.0,
                       upper_bound=1.0, **fv)
    flags.DEFINE_list("band", [str(v) for v in pseudo.DEFAULT_BAND], "LOW,HIGH: the uncertain probabilities of "
                      "--confidence=band.", **fv)
    flags.DEFINE_float("threshold", 0.5, "The pseudo-label: pixels with probability above this.", lower_bound=0.0,
                       upper_bound=0.999, **fv)
    flags.DEFINE_string("depths", None, "depths.csv (id,z) of the images, for --use_depth models and the "
                        "folder's depths.csv (default: <images>/../../depths.csv if it exists).", **fv)
    _define_prediction_flags(flag_values)


def _require(flag_values: flags.FlagValues, *names: str) -> None:
    """CVError (one line) naming the first of `names` that is not given."""
    for name in names:
        if not flag_values[name].value:
            raise CVError(f"--{name} is required (--help lists the flags)")


# ---------------------------------------------------------------------------------------------------------
# cv train: plan the folds, run them, collect.


def train_flags():
    """salt_tf.flags with the train command's flags defined, TensorFlow started first (tfstart: no CUDA noise)."""
    from salt_tf import tfstart

    tfstart.import_tensorflow()
    from salt_tf import flags as salt_flags

    salt_flags.define_flags()
    return salt_flags


def check_train_arguments(train_args: Sequence[str]) -> None:
    """Refuses --model_dir and --fold among the train command's arguments: cv train sets them for each fold.

    Raises:
        CVError: one line naming the flag.
    """
    for arg in train_args:
        name = arg[2:].partition("=")[0] if arg.startswith("--") else ""
        if name in ("model_dir", "fold"):
            raise CVError(f"--{name}: cv train sets --fold=k and --model_dir=<parent>/fold-k for each fold itself; "
                          f"drop --{name}")


FOLD_FIELD = "{fold}"


def fold_arguments(train_args: Sequence[str], parent: str, fold: int) -> list[str]:
    """The train command's arguments for fold `fold`: the user's, each `{fold}` in them replaced by k (a
    per-fold path, e.g. --extra_data_dir=pl/fold-{fold} for leak-free pseudo-labels or
    --init_checkpoint=round1/fold-{fold} to fine-tune each fold from its own earlier model), then --fold and
    --model_dir (after the user's: absl lets the later value win)."""
    return [*(arg.replace(FOLD_FIELD, str(fold)) for arg in train_args), f"--fold={fold}",
            f"--model_dir={rundir.fold_dir(parent, fold)}"]


def fold_status(run_dir: str, changes: dict | None) -> str:
    """'new' (no run yet), 'finished' (its last start finished and --epochs did not grow) or 'resume'.

    Args:
        run_dir: the fold's run directory.
        changes: train.check_resume_flags' result for it (None: no run there).
    """
    if changes is None:
        return "new"
    path = os.path.join(run_dir, rundir.RECORD_FILE)
    done = rundir.finished(rundir.read_json(path) if os.path.isfile(path) else {})
    return "finished" if done and "epochs" not in changes else "resume"


def plan_folds(parent: str, train_args: Sequence[str]) -> tuple[int, dict[int, str]]:
    """Checks the train flags of every fold in this process, before any fold starts (train.parse_train_argv, then
    train.check_resume_flags on each fold's directory), and says what each fold needs.

    Returns:
        (K, {k: fold_status}).

    Raises:
        flags.Error (one line): a bad flag.
        CVError: no --folds=K with K >= 2, or a fold directory holding a run of other flags (ResumeError's line).
    """
    from absl.testing import flagsaver

    train_flags()
    from salt_tf import checkpoints, train

    plan = {}
    with flagsaver.flagsaver():  # leaves absl's global FLAGS as they were (tests call this in-process)
        folds, k = None, 0
        while folds is None or k < folds:
            flags.FLAGS.unparse_flags()
            try:
                train.parse_train_argv(["train", *fold_arguments(train_args, parent, k)])
            except flags.Error:
                _require_folds()  # a missing --folds first: without it the other flags' checks mislead
                raise
            folds = flags.FLAGS.folds
            _require_folds()
            if k == 0:
                _check_whole_kfold()
            fold_run = rundir.fold_dir(parent, k)
            try:
                plan[k] = fold_status(fold_run, train.check_resume_flags(fold_run))
            except checkpoints.ResumeError as e:
                raise CVError(str(e)) from None
            k += 1
    return folds, plan


@dataclasses.dataclass(frozen=True)
class FoldBudget:
    """What one K-fold of a train command line costs, from its parsed flags (fold_budget)."""
    folds: int          # K
    epochs: int         # per fold
    gflop: float        # forward GFLOP per image (model.forward_flops_per_image)
    data_dir: str       # the labelled folder
    models: int         # the models each fold leaves for prediction: its snapshots, else its export/


def fold_budget(train_args: Sequence[str]) -> FoldBudget:
    """Parses fold 0's train command line (every check of the flags alone, as plan_folds does) and returns what
    each fold trains and leaves.

    Raises:
        flags.Error (one line): a bad flag.
        CVError: no --folds=K with K >= 2.
    """
    from absl.testing import flagsaver

    train_flags()
    from salt_tf import configs, model, train

    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        train.parse_train_argv(["train", *fold_arguments(train_args, "parent", 0)])
        f = flags.FLAGS
        if f.folds < 2:
            raise CVError(f"a K-fold needs --folds=K with K >= 2 (got --folds={f.folds})")
        snapshots = f.snapshot_cycles if f.lr_schedule == "cosine" else 0
        return FoldBudget(folds=f.folds, epochs=f.epochs, data_dir=f.data_dir, models=max(1, snapshots),
                          gflop=model.forward_flops_per_image(configs.model_config(f)) / 1e9)


def _require_folds() -> None:
    """Raises CVError unless the parsed (or half-parsed: absl sets every value before it validates) train flags
    give --folds=K with K >= 2."""
    folds = flags.FLAGS["folds"].value
    if not folds or folds < 2:
        raise CVError(f"cv train needs --folds=K with K >= 2 (got --folds={folds}), e.g. --folds=5")


def _check_whole_kfold() -> None:
    """Every fold of the K-fold the parsed train flags describe validates on at least one image and trains on
    at least one batch (splits.check_folds), before the first fold starts; the labelled images are counted in
    train.csv (each fold checks its own split again, with --nostrict's skipped images left out).

    Raises:
        CVError: one line naming --folds (or --batch_size) and the fix.
    """
    from salt_tf.data import kaggle, splits

    f = flags.FLAGS
    train_csv = os.path.join(f.data_dir, kaggle.TRAIN_FILE)
    if f.dataset == "demo" and not os.path.isfile(train_csv):
        images = f.demo_images
    else:
        images = len(kaggle.read_train_csv(f.data_dir))
    try:
        splits.check_folds(images, f.folds, f.batch_size)
    except kaggle.DataError as e:
        raise CVError(f"{e}; no fold was started") from None


class _Stopped(Exception):
    """SIGTERM reached cv train: the running folds are stopped (they checkpoint) and it exits 143."""


def _package_root() -> str:
    import salt_tf

    return os.path.dirname(os.path.dirname(os.path.abspath(salt_tf.__file__)))


def _start(name: str, command: list[str], out, lock: threading.Lock):
    """Starts one command in its own session (a terminal's Ctrl-C reaches only cv, which forwards one SIGTERM),
    with this salt_tf first on its path, and a thread copying its output to `out` as '[name] line'."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH"))
                                                      if p))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               env=env, start_new_session=True)

    def pump():
        for line in process.stdout:
            with lock:
                out.write(f"[{name}] {line}")
                out.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return process, thread


def run_processes(commands: dict[str, list[str]], parallel: int, out=None) -> dict[str, int]:
    """Runs the commands `parallel` at a time, in order, their output prefixed by their names.

    Returns:
        {name: exit status}. On Ctrl-C or SIGTERM every running command gets one SIGTERM (a training checkpoints
        and exits) and is waited for; then KeyboardInterrupt or _Stopped is raised.
    """
    out = out or sys.stdout
    lock, pending, running, codes = threading.Lock(), list(commands.items()), {}, {}
    previous = _raise_on_sigterm()
    _hear_sigint()
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, command = pending.pop(0)
                running[name] = _start(name, command, out, lock)
            time.sleep(0.1)
            for name, (process, thread) in list(running.items()):
                if process.poll() is not None:
                    thread.join()
                    codes[name] = process.returncode
                    del running[name]
    except (KeyboardInterrupt, _Stopped):
        # One SIGTERM each: a training finishes its step and checkpoints (a second signal would stop it at once).
        for process, _ in running.values():
            process.send_signal(signal.SIGTERM)
        for process, thread in running.values():
            process.wait()
            thread.join()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return codes


def _hear_sigint() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt even where the process inherited SIGINT ignored: a shell starts
    a script's background jobs so (`cv train ... &` in a script), and `kill -INT` should then stop the folds
    as it stops `python -m salt_tf.train`, which installs its own handler (stop_signals)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _raise_on_sigterm():
    """Makes SIGTERM raise _Stopped in the main thread (returns the previous handler; None off the main thread,
    where Python cannot set handlers)."""
    def on_term(signum, frame):
        raise _Stopped()

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, on_term)


def run_train(fv: flags.FlagValues, train_args: list[str]) -> int:
    """`cv train`: plan, train the unfinished folds, then collect.

    Args:
        fv: the parsed flags of define_train_flags.
        train_args: every other argument, for the folds' train command (salt_tf.cli passes them on).

    Returns:
        0, or 1 when a fold's training failed (one line naming it).
    """
    _require(fv, "parent")
    check_train_arguments(train_args)
    parent = fv.parent
    folds, plan = plan_folds(parent, train_args)
    _say(f"cv train: {folds} folds into {parent}: " + ", ".join(f"fold-{k} {s}" for k, s in plan.items()))
    commands = {f"fold-{k}": [sys.executable, "-m", "salt_tf.train", *fold_arguments(train_args, parent, k)]
                for k, status in plan.items() if status != "finished"}
    started = time.time()
    codes = run_processes(commands, fv.parallel)
    failed = {name: code for name, code in codes.items() if code}
    if failed:
        cli.error(", ".join(f"{n} stopped with exit status {c}" for n, c in failed.items()) + "; its lines above "
                  "say why; rerun the same command to resume (finished folds are skipped)")
        return 1
    if commands:
        _say(f"cv train: {len(commands)} fold(s) trained in {time.time() - started:.0f} s")
    return collect(parent, tta.parse_tta(DEFAULT_TTA), DEFAULT_BATCH_SIZE)


def train_flags_help() -> str:
    """What `cv train --help` shows after its own flags: the train command's flags, which it passes on."""
    salt_flags = train_flags()
    return ("Every other argument goes to each fold's `python -m salt_tf.train` (--flagfile=F, --folds=K and any "
            "train flag below); cv sets --fold and --model_dir, and replaces {fold} in any argument by the fold's "
            "number k (e.g. --extra_data_dir=pl/fold-{fold}).\n\n" + flags.FLAGS.module_help(salt_flags.__name__))


# ---------------------------------------------------------------------------------------------------------
# cv collect.


def labelled_data(runs: dict[int, str], data_dir: str | None):
    """(the labelled set of the folds' split.csv, {k: fold k's validation ids}); the data must be what the folds
    trained on (their labelled fingerprint)."""
    from salt_tf.data import splits

    split = {k: splits.read_split(os.path.join(d, rundir.SPLIT_FILE)) for k, d in runs.items()}
    folder = data_dir or rundir.data_dir(runs[0])
    data = kaggle.load_labelled(folder, list(split[0]["id"]))
    fingerprint = kaggle.fingerprint(folder, list(data.ids))
    for d in runs.values():
        # Extra training data (--extra_data_dir) may differ between folds; the labelled set may not.
        recorded = rundir.fold_record(d).get("data") or {}
        if recorded.get("labelled_fingerprint", recorded.get("fingerprint")) != fingerprint:
            raise CVError(f"{folder}: not the labelled images {d} trained on (data fingerprint differs); pass "
                          "--data_dir=<the folds' labelled folder>")
    return data, {k: list(s.loc[s["role"] == "val", "id"]) for k, s in split.items()}


def collect(parent: str, views: Sequence[str], batch_size: int, data_dir: str | None = None) -> int:
    """`cv collect`: the OOF probabilities of every labelled image, oof.npz, oof.json and the table.

    Args:
        parent: the CV parent, every fold finished (rundir.fold_runs).
        views: the TTA views.
        batch_size: images per model call.
        data_dir: the labelled folder, if not the folds' own.

    Returns:
        0.
    """
    runs = rundir.fold_runs(parent)
    entries = exports.find_exports(parent)  # every fold's models, named as predict names them (oof.json)
    data, val_ids = labelled_data(runs, data_dir)
    fold = oof.fold_of_images(list(data.ids), val_ids)
    predicted = predict_out_of_fold(entries, data, fold, views, batch_size)
    scored = oof.score(data.masks, predicted["probabilities"].astype(np.float32))
    oof.save(os.path.join(parent, rundir.OOF_FILE),
             {"ids": np.asarray(data.ids, dtype=str), "masks": data.masks.astype(np.uint8), "fold": fold,
              **predicted, **scored})
    summary = oof.summary(data.masks, scored, fold, views, [e.info() for e in entries])
    rundir.write_json(os.path.join(parent, rundir.OOF_SUMMARY), summary)
    _say(oof.format_summary(summary))
    stored = "the fold mean"
    if "member_probabilities" in predicted:
        stored += f", each of the {len(predicted['member_probabilities'])} model(s) of the fold"
    if "has_salt" in predicted:
        stored += ", the image head"
    _say(f"wrote {os.path.join(parent, rundir.OOF_FILE)} ({stored}) and {rundir.OOF_SUMMARY}")
    return 0


def predict_out_of_fold(entries: Sequence[exports.LoadedModel], data, fold: np.ndarray, views: Sequence[str],
                        batch_size: int) -> dict:
    """Each labelled image predicted by the models of the fold that validated on it (with TTA), as oof.npz
    stores it; float16 halves the file (every score is computed from the stored values).

    Args:
        entries: the CV parent's models (exports.find_exports).
        data: the labelled images (kaggle.LabelledSet).
        fold: fold [N] of each image (oof.fold_of_images).
        views, batch_size: as predicted_members.

    Returns:
        {"probabilities": the fold mean [N,101,101] float16; when every fold has S models,
        "member_probabilities" [S,N,101,101] float16 ([k]: the fold's k-th model, exports.positions); when its
        models have the image head, "has_salt" [N] float32 (the mean of the fold's models' heads)}.
    """
    positions, shape, depths = exports.positions(entries), data.masks.shape, dict(zip(data.ids, data.depths))
    probabilities, heads = np.zeros(shape, np.float16), np.full(len(data.ids), np.nan, np.float32)
    per_model = None if positions is None else np.zeros((len(positions),) + shape, np.float16)
    for k, indices in exports.fold_models(entries).items():
        started, rows, own = time.time(), np.flatnonzero(fold == k), [entries[i] for i in indices]
        members, head = predicted_members(own, data.ids[rows], data.images[rows], depths, views, batch_size)
        probabilities[rows] = np.mean(members, axis=0)
        if per_model is not None:  # one fold's members are its models, in order
            per_model[:, rows] = np.stack(members)
        if head is not None:
            heads[rows] = head
        _say(f"fold-{k}: {len(rows)} validation images, {len(own)} model(s) ({', '.join(e.name for e in own)}), "
             f"{time.time() - started:.1f} s")
    return {"probabilities": probabilities, **_optional_arrays(entries, per_model, heads)}


def _optional_arrays(entries: Sequence[exports.LoadedModel], per_model: np.ndarray | None,
                     heads: np.ndarray) -> dict:
    """oof.npz's member_probabilities and has_salt where they apply; a printed line for each that cannot."""
    arrays = {}
    if per_model is not None:
        arrays["member_probabilities"] = per_model
    else:
        counts = ", ".join(f"fold-{k} {len(i)}" for k, i in exports.fold_models(entries).items())
        _say(f"no per-model out-of-fold predictions stored: the folds have different numbers of models ({counts}); "
             "predict evaluate will evaluate their mean only")
    if not np.isnan(heads).any():
        arrays["has_salt"] = heads
    elif not np.isnan(heads).all():
        _say("no image-head probabilities stored: only some folds' models have the image head "
             "(--deep_supervision); predict evaluate will not gate on it")
    return arrays


def run_collect(fv: flags.FlagValues) -> int:
    """`cv collect --parent=P [--tta] [--data_dir] [--batch_size]` (collect)."""
    _require(fv, "parent")
    return collect(fv.parent, tta.parse_tta(fv.tta), fv.batch_size, fv.data_dir)


# ---------------------------------------------------------------------------------------------------------
# cv compare.


def run_compare(fv: flags.FlagValues, parent_a: str, parent_b: str) -> int:
    """`cv compare A B`: B - A image by image on the OOF scores; returns 0."""
    a, b = (oof.load(os.path.join(p, rundir.OOF_FILE)) for p in (parent_a, parent_b))
    _say(oof.format_comparison(oof.compare(a, b), parent_a, parent_b))
    return 0


# ---------------------------------------------------------------------------------------------------------
# cv pseudo.


def _band(values: Sequence[str]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in values)
    except ValueError:
        low = high = -1.0
    if not 0.0 <= low < high <= 1.0:
        raise CVError(f"--band={','.join(values)}: give LOW,HIGH with 0 <= LOW < HIGH <= 1, e.g. 0.2,0.8")
    return low, high


def run_pseudo(fv: flags.FlagValues) -> int:
    """`cv pseudo`: predict, choose the confident images, write the labelled folder.

    Args:
        fv: the parsed flags of define_pseudo_flags.

    Returns:
        0 (a warning when no image was kept).
    """
    _require(fv, "model_dir", "images", "output")
    band, views = _band(fv.band), tta.parse_tta(fv.tta)
    pseudo.check_output(fv.output)
    entries = exports.find_exports(fv.model_dir)
    ids, images, _ = kaggle.read_image_folder(fv.images)
    depths = kaggle.image_folder_depths(fv.images, fv.depths, required=False)  # copied for the kept ids
    started = time.time()
    p = predicted_mean(entries, ids, images, depths, views, fv.batch_size)
    seconds = time.time() - started
    masks = p > fv.threshold
    frame = pseudo.table(ids, pseudo.confidence(p, fv.confidence, band), masks, fv.min_confidence)
    paths = {os.path.splitext(n)[0]: os.path.join(fv.images, n) for n in os.listdir(fv.images)
             if n.lower().endswith(".png")}
    pseudo.write_folder(fv.output, frame, paths, masks, depths)
    kept = frame[frame["kept"]]
    _say(f"pseudo: {len(ids)} images predicted by {len(entries)} model(s) of {fv.model_dir} in {seconds:.1f} s "
         f"(tta {'+'.join(views)}); kept {len(kept)} ({len(kept) / len(ids):.0%}) with {fv.confidence} confidence "
         f">= {fv.min_confidence}, {int((kept['salt_pixels'] > 0).sum())} of them with salt; wrote {fv.output}")
    if kept.empty:
        print(f"warning: no image passed --min_confidence={fv.min_confidence}; {fv.output} has no labelled image "
              "(see its confidence.csv)", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The command line.

TRAIN_HELP = """\
Trains fold k of --folds=K into <parent>/fold-k with `python -m salt_tf.train` (one process per fold, --parallel
at a time, output prefixed [fold-k]; `{fold}` in any train argument becomes k, e.g.
--extra_data_dir=pl/fold-{fold}), after checking every fold's flags; skips finished folds, resumes the
others, then runs collect. A failed fold: exit 1, naming it. Ctrl-C or SIGTERM: every running fold writes a
checkpoint and stops; exit 130 or 143; the same command resumes."""

COLLECT_HELP = """\
Predicts each labelled image with the models of the one fold that validated on it (with TTA), writes
<parent>/oof.npz (ids, the fold mean's probabilities, truth, folds, per-image scores; when every fold has the
same number of models also each model's probabilities, member_probabilities, and with the image head its
probability, has_salt: what `predict evaluate --model_dir=<parent>` stacks and gates on) and
<parent>/oof.json (the table's numbers, the TTA, the fold models) and prints the OOF table: the metric at 0.5
and at a threshold cross-validated over the images, per coverage group, with bootstrap intervals."""

COMPARE_HELP = """\
B - A of the per-image out-of-fold scores of two CV parents (at the cv threshold and at 0.5), with a paired
bootstrap 95% interval over the images and the difference per coverage group. Both oof.npz files must hold
the same ids."""

PSEUDO_HELP = """\
Predicts every PNG of --images with the models of --model_dir (a CV parent: the mean of its folds, each fold
the mean of its own models), keeps the images whose --confidence reaches --min_confidence and writes them with
their masks (probability > --threshold) as a new labelled folder in the Kaggle layout, plus confidence.csv."""

PROGRAM = cli.Program(
    module="salt_tf.cv",
    overview=__doc__.split("\n\n")[0],
    commands=(
        cli.Subcommand("train", "train the K folds of a flagfile into one parent folder, then collect",
                       "--flagfile=F --parent=P --folds=K [--parallel=N] [train flags ...]", define_train_flags,
                       run_train, description=TRAIN_HELP, passes_on=train_flags_help),
        cli.Subcommand("collect", "the out-of-fold predictions and score of a parent's finished folds",
                       "--parent=P [--tta=hflip] [--data_dir=DIR]", define_collect_flags, run_collect,
                       description=COLLECT_HELP),
        cli.Subcommand("compare", "two cross-validation parents image by image: mean difference, interval",
                       "A B", define_compare_flags, run_compare, arguments=("A", "B"), description=COMPARE_HELP),
        cli.Subcommand("pseudo", "pseudo-labels: the confident predictions of unlabelled images as a labelled "
                                 "folder",
                       "--model_dir=<run | export | P> --images=DIR --output=NEW [--flag=value ...]",
                       define_pseudo_flags, run_pseudo, description=PSEUDO_HELP),
    ),
    user_errors=(CVError, oof.OOFError, kaggle.DataError, rundir.RunDirError, exports.ExportError),
    writes=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (salt_tf.cli); returns the exit status (module docstring). A signal stops the running
    folds (each writes a checkpoint first) and exits 130 (Ctrl-C) or 143 (SIGTERM) with one line."""
    try:
        return cli.main(PROGRAM, sys.argv if argv is None else argv)
    except KeyboardInterrupt:
        print("stopped: Ctrl-C; the running folds wrote a checkpoint; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    except _Stopped:
        print("stopped: SIGTERM; the running folds wrote a checkpoint; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 143


if __name__ == "__main__":
    sys.exit(main())
