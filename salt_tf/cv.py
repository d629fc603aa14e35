"""Cross-validation: K fold runs of one recipe, their out-of-fold (OOF) score, comparisons, pseudo-labels.

    python -m salt_tf.cv train --flagfile=F --parent=P --folds=K [--parallel=N] [train flags ...]
    python -m salt_tf.cv collect --parent=P [--tta=hflip] [--data_dir=DIR]
    python -m salt_tf.cv compare P1 P2
    python -m salt_tf.cv pseudo --model_dir=<run | export | P> --images=DIR --output=NEW [--min_confidence=0.9]

`train` trains fold k of K into P/fold-k (`python -m salt_tf.train ... --folds=K --fold=k --model_dir=P/fold-k`,
one process per fold, one after another or --parallel=N at a time), skipping finished folds and resuming
unfinished ones, then runs `collect`. `collect` predicts each labelled image with the fold model that validated
on it (with TTA) and writes P/oof.npz and P/oof.json and prints the OOF table (metric at 0.5 and at the
cross-validated threshold, per coverage group, bootstrap intervals). `compare` puts two CV parents side by
side image by image (mean difference, paired-bootstrap interval). `pseudo` predicts unlabelled images with a
run, an export or all fold models of P (their mean) and writes the confident ones as a labelled folder for
`train --extra_data_dir`.

A fold run is an ordinary run directory: on a cluster, run one job per fold with the train command itself,
then `collect`. Files: salt_tf.oof (oof.npz, oof.json), salt_tf.pseudo (the pseudo-label folder and rule).
Exit status: 0 done, 1 a fold's training failed or a write failed, 2 a bad flag, path or data (one line,
nothing written), 130/143 stopped by a signal (the running folds checkpoint; rerun to resume).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np
from absl import flags

from salt_tf import oof, pseudo, rundir
from salt_tf.data import kaggle


class CVError(ValueError):
    """A bad flag, path or fold layout; main() prints it as one line and exits 2."""


def _say(message: str = "") -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The models. TensorFlow is imported only when a subcommand predicts (tta, exports), so --help is instant.


def parse_tta(text: str) -> tuple[str, ...]:
    """--tta text -> the views (tta.parse_tta)."""
    from salt_tf import tta

    return tta.parse_tta(text)


def read_depths(path: str) -> dict[str, float]:
    """{id: z} of a --depths CSV."""
    return kaggle.read_depths(path, missing_hint="pass --depths=<depths.csv> for a --use_depth model")


def model_probabilities(path: str, ids: Sequence[str], images: np.ndarray, depths: dict[str, float] | None,
                        views: Sequence[str], batch_size: int) -> tuple[np.ndarray, list[str]]:
    """The mean TTA probabilities [N,101,101] of the models `path` stands for (a run: its snapshots, else its
    export/; or one export folder), and their names.

    Args:
        path: a run directory or export folder.
        ids, images: the images (uint8 [N,101,101]) and their ids.
        depths: {id: z} for models trained with --use_depth (None otherwise).
        views: the test-time augmentation views (parse_tta).
        batch_size: images per model call.

    Returns:
        (probabilities float32 [N,101,101], model names such as "export" or "snapshots/snapshot-2").
    """
    from salt_tf import exports, pipeline, tta

    entries = exports.load_models(path)
    known = kaggle.depth_array(depths or {}, ids)
    inputs, probabilities = {}, []
    for entry in entries:
        if entry.use_depth not in inputs:
            inputs[entry.use_depth] = pipeline.model_inputs(ids, images, known, entry.use_depth)
        probabilities.append(tta.predict_probabilities(entry.model, inputs[entry.use_depth], batch_size, views))
    return np.mean(probabilities, axis=0), [entry.name for entry in entries]


def user_errors() -> tuple[type, ...]:
    """The exceptions that mean a bad flag, path or data: one line, exit status 2."""
    errors = (flags.Error, CVError, oof.OOFError, kaggle.DataError, rundir.RunDirError)
    exports = sys.modules.get("salt_tf.exports")  # ExportError: only once a model was looked for
    errors += (exports.ExportError,) if exports else ()
    # train.check_resume_flags' ResumeError can only have been raised once checkpoints (TensorFlow) is imported.
    checkpoints = sys.modules.get("salt_tf.checkpoints")
    return errors + ((checkpoints.ResumeError,) if checkpoints else ())


# ---------------------------------------------------------------------------------------------------------
# Flags: each subcommand has its own registry (its --help lists only its flags).

TRAIN_FLAGS = flags.FlagValues()
COLLECT_FLAGS = flags.FlagValues()
COMPARE_FLAGS = flags.FlagValues()
PSEUDO_FLAGS = flags.FlagValues()


def _define_flags() -> None:
    """Registers every subcommand's flags (idempotent)."""
    if "parent" in TRAIN_FLAGS:
        return
    parent_help = "The CV parent folder: fold k's run directory is <parent>/fold-k."
    flags.DEFINE_string("parent", None, parent_help, flag_values=TRAIN_FLAGS)
    flags.DEFINE_integer("parallel", 1, "Folds trained at the same time (each its own process and threads; on a "
                         "machine with few cores, 1).", lower_bound=1, flag_values=TRAIN_FLAGS)
    flags.DEFINE_string("parent", None, parent_help, flag_values=COLLECT_FLAGS)
    flags.DEFINE_string("data_dir", None, "The labelled folder the folds trained on, if it moved (default: the "
                        "folds' own, rundir.data_dir).", flag_values=COLLECT_FLAGS)
    _define_pseudo_flags()
    for registry in (COLLECT_FLAGS, PSEUDO_FLAGS):
        flags.DEFINE_string("tta", "hflip", "Test-time augmentation: 'none', or views averaged with the identity "
                            "from hflip,vflip.", flag_values=registry)
        flags.DEFINE_integer("batch_size", 64, "Images per model call.", lower_bound=1, flag_values=registry)


def _define_pseudo_flags() -> None:
    """The flags of cv pseudo (the model, the images, the rule, the output)."""
    flags.DEFINE_string("model_dir", None, "A run directory (its snapshots, else its export/), an export folder, "
                        "or a CV parent (the mean of its fold models).", flag_values=PSEUDO_FLAGS)
    flags.DEFINE_string("images", None, "Folder of unlabelled 101x101 PNG images, e.g. <data>/test/images.",
                        flag_values=PSEUDO_FLAGS)
    flags.DEFINE_string("output", None, "The labelled folder to write (new; Kaggle layout + confidence.csv).",
                        flag_values=PSEUDO_FLAGS)
    flags.DEFINE_enum("confidence", "band", list(pseudo.RULES), "band: 1 - the share of pixels with probability "
                      "inside --band (the first-place TGS team's rule); margin: the mean of |2p - 1|.",
                      flag_values=PSEUDO_FLAGS)
    flags.DEFINE_float("min_confidence", pseudo.DEFAULT_MIN_CONFIDENCE, "Keep an image whose confidence is at "
                       "least this (0.9 with band: at most 10% of its pixels uncertain).", lower_bound=0.0,
                       upper_bound=1.0, flag_values=PSEUDO_FLAGS)
    flags.DEFINE_list("band", [str(v) for v in pseudo.DEFAULT_BAND], "LOW,HIGH: the uncertain probabilities of "
                      "--confidence=band.", flag_values=PSEUDO_FLAGS)
    flags.DEFINE_float("threshold", 0.5, "The pseudo-label: pixels with probability above this.", lower_bound=0.0,
                       upper_bound=0.999, flag_values=PSEUDO_FLAGS)
    flags.DEFINE_string("depths", None, "depths.csv (id,z) of the images, for --use_depth models and the "
                        "folder's depths.csv (default: <images>/../../depths.csv if it exists).",
                        flag_values=PSEUDO_FLAGS)


def _parse(registry: flags.FlagValues, args: Sequence[str], required: Sequence[str] = ()) -> list[str]:
    """Parses `args` into `registry`; returns the positional arguments. A missing required flag: CVError."""
    registry.unparse_flags()
    positional = registry(["cv", *args])[1:]
    for name in required:
        if not registry[name].value:
            raise CVError(f"--{name} is required (--help lists the flags)")
    return positional


# ---------------------------------------------------------------------------------------------------------
# cv train: plan the folds, run them, collect.


def _train_flags():
    """salt_tf.flags with the train command's flags defined, TensorFlow started first (tfstart: no CUDA noise)."""
    from salt_tf import tfstart

    tfstart.import_tensorflow()
    from salt_tf import flags as salt_flags

    salt_flags.define_flags()
    return salt_flags


def split_arguments(args: Sequence[str], own: Sequence[str]) -> tuple[list[str], list[str]]:
    """(cv train's own --NAME=VALUE arguments, the train command's arguments), in their order.

    Raises:
        CVError: an own flag without '=', or --model_dir/--fold, which cv train sets for each fold itself.
    """
    mine, theirs = [], []
    for arg in args:
        name = arg[2:].partition("=")[0] if arg.startswith("--") else ""
        if name in own:
            if "=" not in arg:
                raise CVError(f"give --{name}=VALUE (one argument)")
            mine.append(arg)
        elif name in ("model_dir", "fold"):
            raise CVError(f"--{name}: cv train sets --fold=k and --model_dir=<parent>/fold-k for each fold itself; "
                          f"drop --{name}")
        else:
            theirs.append(arg)
    return mine, theirs


def fold_arguments(train_args: Sequence[str], parent: str, fold: int) -> list[str]:
    """The train command's arguments for fold `fold` (after the user's: absl lets the later value win)."""
    return [*train_args, f"--fold={fold}", f"--model_dir={rundir.fold_dir(parent, fold)}"]


def fold_status(run_dir: str, changes: dict | None) -> str:
    """'new' (no run yet), 'finished' (its last start finished and --epochs did not grow) or 'resume'.

    Args:
        run_dir: the fold's run directory.
        changes: train.check_resume_flags' result for it (None: no run there).
    """
    if changes is None:
        return "new"
    path = os.path.join(run_dir, rundir.RECORD_FILE)
    done = finished(rundir.read_json(path) if os.path.isfile(path) else {})
    return "finished" if done and "epochs" not in changes else "resume"


def finished(record: dict) -> bool:
    """Whether a run's record.json says its last session finished (train writes "started" at every start and
    "finished" at the end; timestamps of one format compare as text)."""
    started, ended = record.get("started"), record.get("finished")
    return bool(started and ended and ended >= started)


def plan_folds(parent: str, train_args: Sequence[str]) -> tuple[int, dict[int, str]]:
    """Checks the train flags of every fold in this process, before any fold starts (train.parse_train_argv, then
    train.check_resume_flags on each fold's directory), and says what each fold needs.

    Returns:
        (K, {k: fold_status}).

    Raises:
        flags.Error or ResumeError (one line): a bad flag, or a fold directory holding a run of other flags.
        CVError: no --folds=K with K >= 2.
    """
    from absl.testing import flagsaver

    _train_flags()
    from salt_tf import train

    plan = {}
    with flagsaver.flagsaver():  # leaves absl's global FLAGS as they were (tests call this in-process)
        folds, k = None, 0
        while folds is None or k < folds:
            flags.FLAGS.unparse_flags()
            train.parse_train_argv(["train", *fold_arguments(train_args, parent, k)])
            folds = flags.FLAGS.folds
            if folds < 2:
                raise CVError(f"cv train needs --folds=K with K >= 2 (got --folds={folds})")
            fold_run = rundir.fold_dir(parent, k)
            plan[k] = fold_status(fold_run, train.check_resume_flags(fold_run))
            k += 1
    return folds, plan


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


def _raise_on_sigterm():
    """Makes SIGTERM raise _Stopped in the main thread (returns the previous handler; None off the main thread,
    where Python cannot set handlers)."""
    def on_term(signum, frame):
        raise _Stopped()

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, on_term)


def run_train(args: Sequence[str]) -> int:
    """cv train: plan, train the unfinished folds, then collect."""
    own, train_args = split_arguments(args, ("parent", "parallel"))
    _parse(TRAIN_FLAGS, own, required=("parent",))
    parent, parallel = TRAIN_FLAGS.parent, TRAIN_FLAGS.parallel
    folds, plan = plan_folds(parent, train_args)
    _say(f"cv train: {folds} folds into {parent}: " + ", ".join(f"fold-{k} {s}" for k, s in plan.items()))
    commands = {f"fold-{k}": [sys.executable, "-m", "salt_tf.train", *fold_arguments(train_args, parent, k)]
                for k, status in plan.items() if status != "finished"}
    started = time.time()
    codes = run_processes(commands, parallel)
    failed = {name: code for name, code in codes.items() if code}
    if failed:
        print("error: " + ", ".join(f"{n} stopped with exit status {c}" for n, c in failed.items()) + "; its "
              "lines above say why; rerun the same command to resume (finished folds are skipped)",
              file=sys.stderr, flush=True)
        return 1
    if commands:
        _say(f"cv train: {len(commands)} fold(s) trained in {time.time() - started:.0f} s")
    return collect(parent, parse_tta(COLLECT_FLAGS["tta"].default), COLLECT_FLAGS["batch_size"].default)


# ---------------------------------------------------------------------------------------------------------
# cv collect.


def _fold_record(run_dir: str) -> dict:
    path = os.path.join(run_dir, rundir.RECORD_FILE)
    if not os.path.isfile(path):
        raise CVError(f"{run_dir}: no {rundir.RECORD_FILE}; its training has not started; train it first")
    return rundir.read_json(path)


def fold_runs(parent: str) -> dict[int, str]:
    """{k: run directory} of the K folds of `parent`, each a finished fold run of the same K-fold.

    Raises:
        CVError: no such folder, a fold missing or unfinished, or folds of different K (one line with the fix).
    """
    runs = rundir.fold_dirs(parent)
    if not runs:
        pattern = os.path.join(parent, rundir.FOLD_PREFIX)
        raise CVError(f"--parent={parent}: no fold-k run directories; train them with python -m salt_tf.cv train, "
                      f"or python -m salt_tf.train --folds=K --fold=k --model_dir={pattern}k")
    records = {k: _fold_record(d) for k, d in runs.items()}
    counts = {k: (r.get("split") or {}).get("folds") for k, r in records.items()}
    for k, count in counts.items():
        if not count:
            raise CVError(f"{runs[k]}: not a fold run (record.json has no --folds); train it with --folds=K --fold={k}")
    folds = counts[min(counts)]
    if set(counts.values()) != {folds} or set(runs) != set(range(folds)):
        missing = sorted(set(range(folds)) - set(runs))
        raise CVError(f"{parent}: fold runs of {sorted(set(counts.values()))} folds in all, folds present "
                      f"{sorted(runs)}{f', missing fold-{missing[0]}' if missing else ''}; train fold 0..K-1 of one "
                      "--folds=K")
    for k, record in records.items():
        if not finished(record):
            raise CVError(f"{runs[k]}: its training has not finished; rerun python -m salt_tf.cv train (or the fold's "
                          "train command) to finish it")
    return runs


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
        recorded = _fold_record(d).get("data") or {}
        if recorded.get("labelled_fingerprint", recorded.get("fingerprint")) != fingerprint:
            raise CVError(f"{folder}: not the labelled images {d} trained on (data fingerprint differs); pass "
                          "--data_dir=<the folds' labelled folder>")
    return data, {k: list(s.loc[s["role"] == "val", "id"]) for k, s in split.items()}


def collect(parent: str, tta: Sequence[str], batch_size: int, data_dir: str | None = None) -> int:
    """cv collect: the OOF probabilities of every labelled image, oof.npz, oof.json and the table."""
    runs = fold_runs(parent)
    data, val_ids = labelled_data(runs, data_dir)
    fold = oof.fold_of_images(list(data.ids), val_ids)
    depths = dict(zip(data.ids, data.depths))
    # float16 halves the file; every score below is computed from the stored values.
    probabilities = np.zeros(data.masks.shape, np.float16)
    for k, run_dir in runs.items():
        started, rows = time.time(), np.flatnonzero(fold == k)
        p, names = model_probabilities(run_dir, data.ids[rows], data.images[rows], depths, tta, batch_size)
        probabilities[rows] = p
        _say(f"fold-{k}: {len(rows)} validation images, {len(names)} model(s) ({', '.join(names)}), "
             f"{time.time() - started:.1f} s")
    scored = oof.score(data.masks, probabilities.astype(np.float32))
    oof.save(os.path.join(parent, rundir.OOF_FILE),
             {"ids": np.asarray(data.ids, dtype=str), "probabilities": probabilities,
              "masks": data.masks.astype(np.uint8), "fold": fold, **scored})
    summary = oof.summary(data.masks, scored, fold, tta)
    rundir.write_json(os.path.join(parent, rundir.OOF_SUMMARY), summary)
    _say(oof.format_summary(summary))
    _say(f"wrote {os.path.join(parent, rundir.OOF_FILE)} and {rundir.OOF_SUMMARY}")
    return 0


def run_collect(args: Sequence[str]) -> int:
    """cv collect --parent=P [--tta] [--data_dir] [--batch_size]."""
    _parse(COLLECT_FLAGS, args, required=("parent",))
    return collect(COLLECT_FLAGS.parent, parse_tta(COLLECT_FLAGS.tta), COLLECT_FLAGS.batch_size,
                   COLLECT_FLAGS.data_dir)


# ---------------------------------------------------------------------------------------------------------
# cv compare.


def run_compare(args: Sequence[str]) -> int:
    """cv compare P1 P2: B - A image by image on the OOF scores."""
    parents = _parse(COMPARE_FLAGS, args)
    if len(parents) != 2:
        raise CVError(f"compare takes two CV parents (A B), got {len(parents)}: {' '.join(parents)}")
    a, b = (oof.load(os.path.join(p, rundir.OOF_FILE)) for p in parents)
    _say(oof.format_comparison(oof.compare(a, b), *parents))
    return 0


# ---------------------------------------------------------------------------------------------------------
# cv pseudo.


def _members(model_dir: str) -> list[str]:
    """The paths whose models are averaged: a CV parent's fold runs (each the mean of its own models, so every
    fold weighs the same), else the one path."""
    if rundir.is_cv_parent(model_dir):
        return list(fold_runs(model_dir).values())
    return [model_dir]


def _band(values: Sequence[str]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in values)
    except ValueError:
        low = high = -1.0
    if not 0.0 <= low < high <= 1.0:
        raise CVError(f"--band={','.join(values)}: give LOW,HIGH with 0 <= LOW < HIGH <= 1, e.g. 0.2,0.8")
    return low, high


def _image_depths(images: str, given: str | None) -> dict[str, float] | None:
    """The depths file of the images: --depths, else <images>/../../depths.csv when it exists, else None."""
    path = given or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(images))), "depths.csv")
    return read_depths(path) if given or os.path.isfile(path) else None


def run_pseudo(args: Sequence[str]) -> int:
    """cv pseudo: predict, choose the confident images, write the labelled folder."""
    fv = PSEUDO_FLAGS
    _parse(fv, args, required=("model_dir", "images", "output"))
    band, tta = _band(fv.band), parse_tta(fv.tta)
    pseudo.check_output(fv.output)
    members = _members(fv.model_dir)
    ids, images, _ = kaggle.read_image_folder(fv.images)
    depths = _image_depths(fv.images, fv.depths)
    started = time.time()
    p = np.mean([model_probabilities(m, ids, images, depths, tta, fv.batch_size)[0] for m in members], axis=0)
    seconds = time.time() - started
    masks = p > fv.threshold
    frame = pseudo.table(ids, pseudo.confidence(p, fv.confidence, band), masks, fv.min_confidence)
    paths = {os.path.splitext(n)[0]: os.path.join(fv.images, n) for n in os.listdir(fv.images)
             if n.lower().endswith(".png")}
    pseudo.write_folder(fv.output, frame, paths, masks, depths)
    kept = frame[frame["kept"]]
    _say(f"pseudo: {len(ids)} images predicted by {len(members)} member(s) of {fv.model_dir} in {seconds:.1f} s "
         f"(tta {'+'.join(tta)}); kept {len(kept)} ({len(kept) / len(ids):.0%}) with {fv.confidence} confidence >= "
         f"{fv.min_confidence}, {int((kept['salt_pixels'] > 0).sum())} of them with salt; wrote {fv.output}")
    if kept.empty:
        print(f"warning: no image passed --min_confidence={fv.min_confidence}; {fv.output} has no labelled image "
              "(see its confidence.csv)", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The command line.

COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], flags.FlagValues, str]] = {
    "train": (run_train, TRAIN_FLAGS, "--flagfile=F --parent=P --folds=K [--parallel=N] [train flags ...]"),
    "collect": (run_collect, COLLECT_FLAGS, "--parent=P [--tta=hflip] [--data_dir=DIR]"),
    "compare": (run_compare, COMPARE_FLAGS, "P1 P2"),
    "pseudo": (run_pseudo, PSEUDO_FLAGS, "--model_dir=<run | export | P> --images=DIR --output=NEW [...]"),
}


def help_text(command: str | None) -> str:
    """The module's usage (no command) or a subcommand's: its line, its flags, for train also the train flags."""
    if command is None:
        return "\n\n".join(__doc__.split("\n\n")[:3]) + "\n\n`python -m salt_tf.cv COMMAND --help` lists its flags."
    run, registry, usage = COMMANDS[command]
    text = f"python -m salt_tf.cv {command} {usage}\n\n{registry.get_help(include_special_flags=False) or '(no flags)'}"
    if command == "train":
        salt_flags = _train_flags()
        text += ("\n\nEvery other argument goes to each fold's `python -m salt_tf.train` (--flagfile=F, --folds=K "
                 "and any train flag below); cv sets --fold and --model_dir.\n\n" +
                 flags.FLAGS.module_help(salt_flags.__name__))
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (module docstring)."""
    argv = list(sys.argv if argv is None else argv)
    _define_flags()
    command = argv[1] if len(argv) > 1 else None
    if command in (None, "--help", "-h", "--helpfull"):
        _say(help_text(None))
        return 0 if command else 2
    try:
        if command not in COMMANDS:
            raise CVError(f"unknown command {command!r}: one of {', '.join(COMMANDS)} (--help)")
        if any(a in ("--help", "-h", "--helpfull") for a in argv[2:]):
            _say(help_text(command))
            return 0
        return COMMANDS[command][0](argv[2:])
    except KeyboardInterrupt:
        print("stopped: Ctrl-C; the running folds wrote a checkpoint; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    except _Stopped:
        print("stopped: SIGTERM; the running folds wrote a checkpoint; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 143
    except Exception as e:  # noqa: BLE001 -- sorted below: a user's error is one line, anything else a traceback
        if isinstance(e, user_errors()):
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        if isinstance(e, OSError):
            print(f"error: cannot write {e.filename or ''}: {e.strerror or e}; check the folder's permissions and "
                  "free space", file=sys.stderr, flush=True)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
