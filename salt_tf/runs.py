"""Experiment tracking without a service: the run directories are the database.

    python -m salt_tf.runs list LOG_ROOT [--sort=best_val_metric|date|name|epochs|wall] [--where FLAG=VALUE ...]
                                         [--csv]
    python -m salt_tf.runs diff RUN_A RUN_B [--plot=ab.png]
    python -m salt_tf.runs reproduce RUN [--into=DIR]
    python -m salt_tf.runs release RUN|CV_PARENT --into=models/NAME [--model=swa] [--max_mb=25] [--float16]
                                         [--replace]

`list` tables every run under a folder with only the flags that differ between them; `diff` puts two runs
side by side (flags, code, data, environment, weights, metric curves); `reproduce` re-runs a run from its
flags.cfg in a fresh process and says whether the weights came out bit-identical, and if not, why identity
could not be expected; `release` copies a finished run's model (or a CV parent's fold ensemble) with its record,
model card and SHA-256 sums into a folder of its own (salt_tf.release), the form in which a trained model is
shared. Exit status: 0 done / PASS, 1 reproduction FAIL, 2 unusable path or arguments.

This module is the command (absl subcommands, salt_tf.cli) and the reproduction; loading runs and rendering
the list and the diff are salt_tf.run_table's, the chart of `diff --plot` salt_tf.curve_plot's. It reads run
records only (salt_tf.rundir, salt_tf.records and the data fingerprint); it never imports the training code, so
listing a hundred runs costs no TensorFlow start-up, and it keeps working on runs made by older versions of
the code.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from typing import Iterable

import pandas as pd
from absl import flags

from salt_tf import cli, records, release, rundir
from salt_tf.curve_plot import plot_curves
from salt_tf.run_table import (IGNORED_FLAGS, SORT_KEYS, Run, RunError, describe_weights, diff_runs, differences,
                               differing_flags, find_runs, load_run, parse_where, render_diff, render_table,
                               run_progress, select_runs, short, sort_runs, table_rows, weights_comparison)

# ------------------------------------------------------------------------------------------------ list


def define_list_flags(flag_values: flags.FlagValues) -> None:
    """The flags of `runs list`."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum("sort", "best_val_metric", SORT_KEYS, "best_val_metric, epochs, wall: largest first; date: "
                      "oldest first; name: A-Z.", **fv)
    flags.DEFINE_multi_string("where", [], "FLAG=VALUE: keep the runs whose flag has this value (repeatable; "
                              "1e-2 and 0.01, 1 and true match).", **fv)
    flags.DEFINE_boolean("csv", False, "CSV on stdout (raw numbers, for pandas) instead of the table.", **fv)


def command_list(fv: flags.FlagValues, root: str) -> int:
    """`runs list LOG_ROOT`: one line per run under `root`, the flags that differ between them as columns.

    Args:
        fv: the parsed flags of define_list_flags.
        root: the folder searched at any depth (run_table.find_runs).

    Returns:
        0 (an unusable folder or --where raises RunError).
    """
    runs = [load_run(p, name=os.path.relpath(p, root)) for p in find_runs(root)]
    runs = sort_runs(select_runs(runs, parse_where(fv.where)), fv.sort)
    flag_names = differing_flags(runs)
    rows = table_rows(runs, flag_names)
    columns = ["name", "started", "best_val_metric", "best_epoch", "epochs_completed", "train_seconds_total",
               *flag_names]
    if fv.csv:
        pd.DataFrame(rows, columns=columns).to_csv(sys.stdout, index=False)
    elif not runs:
        print(f"no salt_tf runs under {root}" + (" matching --where" if fv.where else ""), file=sys.stderr)
    else:
        sys.stdout.write(render_table(rows, columns))
    return 0


# ------------------------------------------------------------------------------------------------ diff


def define_diff_flags(flag_values: flags.FlagValues) -> None:
    """The flags of `runs diff`."""
    flags.DEFINE_string("plot", None, "Also draw val_metric and train_loss vs epoch of both runs into this PNG.",
                        flag_values=flag_values)


def command_diff(fv: flags.FlagValues, run_a: str, run_b: str) -> int:
    """`runs diff RUN_A RUN_B`: the two runs side by side (run_table.render_diff), with --plot a chart.

    Args:
        fv: the parsed flags of define_diff_flags.
        run_a, run_b: the run directories.

    Returns:
        0 (an unusable run directory or plot path raises RunError).
    """
    a, b = load_run(run_a), load_run(run_b)
    d = diff_runs(a, b)
    sys.stdout.write(render_diff(d, a, b))
    if fv.plot:
        if not d["curves"]:
            print(f"no plot: neither run has a finished epoch (no {rundir.METRICS_FILE})")
        else:
            renderer = plot_curves(d["curves"], (a.name, b.name), fv.plot)
            print(f"plot: {fv.plot} ({renderer})")
    return 0


# ------------------------------------------------------------------------------------------------ reproduce


def reproduce_dir(path: str) -> str:
    """<path>-reproduce-<n> next to the run, n the first number not taken."""
    base = os.path.normpath(path)
    n = 1
    while os.path.exists(f"{base}-reproduce-{n}"):
        n += 1
    return f"{base}-reproduce-{n}"


def data_dir_for(run: Run) -> tuple[str, bool]:
    """(data folder the reproduction must read, whether --data_dir has to be passed to get it).

    The folder follows rundir's one rule (rundir.data_dir; it need not exist: the demo set is regenerated).
    flags.cfg's --data_dir, read from here, may name another folder (a relative one, the run started
    elsewhere) or none: then the reproduction passes --data_dir.

    Raises:
        RunError: the run records no data folder.
    """
    try:
        folder = rundir.resolve_data_dir(run.flags, run.record, run.path)
    except rundir.RunDirError as e:
        raise RunError(str(e)) from None
    flag = run.flags.get("data_dir")
    return folder, not flag or os.path.normpath(os.path.abspath(flag)) != folder


def current_data_fingerprint(data_dir: str) -> str:
    """The fingerprint train.py would record for this folder now (all ids of train.csv)."""
    from salt_tf.data import kaggle

    return kaggle.fingerprint(data_dir, kaggle.train_ids(data_dir))


def flags_vs_record(run: Run) -> list[str]:
    """Where flags.cfg contradicts what the run itself recorded, i.e. flags.cfg was edited afterwards.

    The flags the record witnesses: the initial learning rate (epoch 1 of metrics.csv), seed and determinism
    (record.json), data folder and validation size (record.json); in runs that record the flags they wrote
    (record.json's "flags", issue 38) every other flag too but --model_dir (a moved run is no edit). In older
    runs a change to any other flag shows up only as diverging weights.
    """
    problems = []
    flags, rows = run.flags, run.metrics

    def check(name, recorded, where, same):
        value = flags.get(name)
        try:
            agrees = value is None or recorded is None or same(value, recorded)
        except ValueError:  # not even a number any more
            agrees = False
        if not agrees:
            shown = f"{recorded:.6g}" if isinstance(recorded, float) else recorded
            problems.append(f"--{name}={value}, but {where} says {shown}")

    if not rows.empty and "learning_rate" in rows and (rows["epoch"] == 1).any():
        first_lr = float(rows.loc[rows["epoch"] == 1, "learning_rate"].iloc[0])
        check("learning_rate", first_lr, f"{rundir.METRICS_FILE} (epoch 1 trained at it)",
              lambda v, r: math.isclose(float(v), r, rel_tol=1e-6))  # the LR variable is float32
    applied = run.record.get("determinism") or {}
    check("seed", applied.get("seed"), f"{rundir.RECORD_FILE}", lambda v, r: int(v) == int(r))
    check("deterministic", applied.get("deterministic"), f"{rundir.RECORD_FILE}",
          lambda v, r: (v == "true") == bool(r))
    check("val_images", run.data.get("val_images"), f"{rundir.RECORD_FILE}", lambda v, r: int(v) == int(r))
    data_dir = flags.get("data_dir")
    if data_dir and os.path.isabs(data_dir):
        check("data_dir", run.data.get("dir"), f"{rundir.RECORD_FILE}",
              lambda v, r: os.path.normpath(v) == os.path.normpath(r))
    written = run.record.get("flags") or {}  # every other flag, where the run recorded what it wrote
    named = {problem.split("=")[0][2:] for problem in problems} | {"model_dir", "data_dir"}
    problems += [f"--{name}={flags.get(name, '(none)')}, but {rundir.RECORD_FILE} says {written.get(name, '(none)')}"
                 for name in sorted(set(flags) | set(written)) if written and name not in named and
                 flags.get(name) != written.get(name)]
    return problems


def code_problem(recorded: dict, now: dict) -> str | None:
    if recorded.get("commit") != now.get("commit"):
        return f"code differs: commit {short(recorded.get('commit'))} -> {short(now.get('commit'))}"
    if recorded.get("diff") != now.get("diff"):
        return f"code differs: same commit {short(now.get('commit'))}, but the uncommitted diff is not the same"
    return None


def init_checkpoint_problem(recorded: dict | None) -> str | None:
    """Whether the weights a run started from (--init_checkpoint) are still there, unchanged."""
    if not recorded:
        return None
    path = recorded.get("path")
    now = records.files_sha256(path, rundir.EXPORT_WEIGHTS) if path else None
    if now is None:
        return f"init checkpoint {path} is gone: the reproduction cannot start from the same weights"
    if now != recorded.get("weights_sha256"):
        return (f"init checkpoint {path} changed: weights recorded {short(recorded.get('weights_sha256'))}, "
                f"now {short(now)}")
    return None


def check_before(run: Run) -> dict:
    """What can be known before spending the compute: code, data and flags as they are now vs the record."""
    data_dir, override = data_dir_for(run)
    recorded = run.data.get("fingerprint")
    problems = []
    try:
        now = current_data_fingerprint(data_dir)
    except (OSError, ValueError) as e:  # kaggle.DataError is a ValueError
        if run.flags.get("dataset") != "demo":  # e's own fix names train's --data_dir, which reproduce has not
            flagfile = os.path.join(run.path, rundir.FLAGS_FILE)
            raise RunError(f"{run.path}: its data folder is not usable now ({str(e).split('; ')[0]}); put the data "
                           f"back at {data_dir}, or, if it moved, resume the run once from the new place (python -m "
                           f"salt_tf.train --flagfile={flagfile} --model_dir={run.path} --data_dir=<new folder>: a "
                           "resume follows moved data and records it), then reproduce") from None
        now = None  # the demo set is regenerated by the run itself; its fingerprint is compared after
    if now is not None and now != recorded:
        problems.append(f"data fingerprint differs: recorded {short(recorded)}, now {short(now)} ({data_dir})")
    code = code_problem(run.code, records.code_version())
    if code:
        problems.append(code)
    init = init_checkpoint_problem(run.record.get("init_checkpoint"))
    if init:
        problems.append(init)
    flag_problems = flags_vs_record(run)
    if flag_problems:
        problems.append(f"flags.cfg disagrees with the run's own record: {'; '.join(flag_problems)}")
    return {"data_dir": data_dir, "override_data_dir": override, "data_fingerprint": now, "problems": problems}


# The flags reproduce_schedule may set, so compare_reproduction does not count them as differences.
SCHEDULE_FLAGS = ("epochs", "snapshot_cycles", "swa_epochs")


def reproduce_schedule(run_flags: dict[str, str], epochs: int) -> dict[str, int]:
    """The schedule flags that train the run's first `epochs` epochs as the run trained them. --epochs=epochs,
    except that a cosine schedule's --epochs sets its cycle length: a reproduction then trains whole cycles of
    the run's length, to the end of the cycle epoch `epochs` is in (a cosine run is its first k cycles, bit
    for bit; flags.growth_refusals). --swa_epochs, which changes no trained weight, at most the epochs run."""
    schedule = {"epochs": epochs}
    if run_flags.get("lr_schedule") == "cosine":
        per_cycle = int(run_flags["epochs"]) // int(run_flags["snapshot_cycles"])
        cycles = -(-epochs // per_cycle)
        schedule = {"epochs": cycles * per_cycle, "snapshot_cycles": cycles}
    if int(run_flags.get("swa_epochs", 0)) > schedule["epochs"]:
        schedule["swa_epochs"] = schedule["epochs"]
    return schedule


def reproduce_command(run: Run, target: str, epochs: int, before: dict) -> list[str]:
    # absl applies flags in order, so these overrides win over the values inside the flagfile.
    command = [sys.executable, "-m", "salt_tf.train", f"--flagfile={os.path.join(run.path, rundir.FLAGS_FILE)}",
               f"--model_dir={target}"]
    command += [f"--{name}={value}" for name, value in reproduce_schedule(run.flags, epochs).items()]
    if before["override_data_dir"]:
        command.append(f"--data_dir={before['data_dir']}")
    init = run.record.get("init_checkpoint")
    if init and init.get("path"):
        # The folder the run started from, absolute: a relative flag may point elsewhere from here.
        command.append(f"--init_checkpoint={init['path']}")
    return command


def compare_reproduction(a: Run, b: Run, overridden: Iterable[str]) -> dict:
    """The original and its reproduction, after the fact."""
    def split_text(run):
        path = os.path.join(run.path, rundir.SPLIT_FILE)
        return open(path, encoding="utf-8").read() if os.path.isfile(path) else None

    skip = set(IGNORED_FLAGS) | set(overridden)
    problems = []
    code = code_problem(a.code, b.code)
    if code:
        problems.append(code)
    if a.data.get("fingerprint") != b.data.get("fingerprint"):
        problems.append(f"data fingerprint differs: recorded {short(a.data.get('fingerprint'))}, reproduction "
                        f"read {short(b.data.get('fingerprint'))} ({b.data.get('dir')})")
    if split_text(a) != split_text(b):
        problems.append(f"the validation split differs ({rundir.SPLIT_FILE})")
    flags = differences(a.flags, b.flags, sorted((set(a.flags) | set(b.flags)) - skip))
    if flags:
        problems.append("flags differ: " + ", ".join(f"{k}: {va} -> {vb}" for k, (va, vb) in flags.items()))
    return {"problems": problems, "environment": differences(a.environment, b.environment),
            "weights": weights_comparison(a.path, b.path)}


def _stream(command: list[str], out) -> int:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in process.stdout:
        out.write("  | " + line)
        out.flush()
    return process.wait()


def _dedupe(items: list[str]) -> list[str]:
    seen, kept = set(), []
    for item in items:
        key = item.split(":")[0]  # the same kind of problem seen before and after: say it once
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept


def reproduce(path: str, into: str | None = None, out=None) -> int:
    """Re-runs the run at `path` from its flags.cfg in a fresh process and compares it bit for bit.

    Args:
        path: the run directory.
        into: the run directory of the copy (default reproduce_dir(path)); must not exist, or be empty.
        out: where the report and the training's output go (default stdout).

    Returns:
        0 PASS (bit-identical, nothing that forbids identity), 1 FAIL (the report says why).

    Raises:
        RunError: the run cannot be reproduced (no record, no finished epoch, a used --into), one line.
    """
    out = out or sys.stdout
    run = load_run(path)
    if not run.data or not run.code:
        raise RunError(f"{path}: {rundir.RECORD_FILE} has no code or data section; nothing to compare against")
    epochs = run_progress(run)["epochs_completed"]
    if not epochs:
        raise RunError(f"{path}: no finished epoch to reproduce")
    target = into or reproduce_dir(path)
    if os.path.exists(target) and os.listdir(target):
        raise RunError(f"{target}: exists and is not empty; a reproduction must start from scratch")
    print(f"reproducing {path} ({epochs} epoch{'s' * (epochs != 1)}) into {target}", file=out)
    before = _report_before(run, out)
    schedule = reproduce_schedule(run.flags, epochs)
    if schedule["epochs"] != epochs:
        print(f"note: a cosine schedule's cycle length is its --epochs: the reproduction trains whole cycles, to "
              f"epoch {schedule['epochs']}, and compares epochs 1..{epochs}", file=out)
    command = reproduce_command(run, target, epochs, before)
    print("running: " + " ".join(shlex.quote(c) for c in command), file=out)
    out.flush()
    status = _stream(command, out)
    if status != 0:
        print(f"FAIL: the reproduction run exited with status {status} (its output is above)", file=out)
        return 1
    return _verdict(run, load_run(target), epochs, before, out)


def _report_before(run: Run, out) -> dict:
    """check_before, printed: each problem, or that code, data and flags agree; a --data_dir passed on."""
    before = check_before(run)
    for problem in before["problems"]:
        print(f"before: {problem}", file=out)
    if not before["problems"]:
        print(f"before: code, data (fingerprint {short(before['data_fingerprint'])}) and flags agree with "
              "the record", file=out)
    if before["override_data_dir"]:
        print(f"note: flags.cfg's --data_dir={run.flags['data_dir']} is relative to where the run started; "
              f"passing the recorded --data_dir={before['data_dir']}", file=out)
    return before


def _verdict(run: Run, copy: Run, epochs: int, before: dict, out) -> int:
    """Prints the weights' comparison and PASS or FAIL with the reasons; returns the exit status (0 PASS)."""
    after = compare_reproduction(run, copy, overridden=SCHEDULE_FLAGS + ("data_dir",))
    weights = after["weights"]
    print(describe_weights(weights), file=out)
    for key, (va, vb) in after["environment"].items():
        print(f"note: environment differs: {key}: {va} -> {vb}", file=out)
    identical = (weights["first_divergence"] is None
                 and weights["epochs_compared"] == list(range(1, epochs + 1)))
    problems = _dedupe(before["problems"] + after["problems"])
    if identical and not problems:
        print(f"PASS: bit-identical reproduction of {run.path} (same code, data, split and weights after every "
              "epoch)", file=out)
        return 0
    if problems:
        print(f"FAIL: cannot expect identity: {'; '.join(problems)}", file=out)
    if not identical:
        reason = (f"weights diverge at epoch {weights['first_divergence']}" if weights["first_divergence"]
                  else f"reproduction has epochs {weights['epochs_compared']} of 1..{epochs}")
        print(f"FAIL: {reason}", file=out)
    return 1


def define_reproduce_flags(flag_values: flags.FlagValues) -> None:
    """The flags of `runs reproduce`."""
    flags.DEFINE_string("into", None, "Run directory of the copy (default <run>-reproduce-<n>); must not exist, "
                        "or be empty.", flag_values=flag_values)


def command_reproduce(fv: flags.FlagValues, run: str) -> int:
    """`runs reproduce RUN` (reproduce); returns 0 PASS, 1 FAIL."""
    return reproduce(run, fv.into)


# ------------------------------------------------------------------------------------------------ release


def define_release_flags(flag_values: flags.FlagValues) -> None:
    """The flags of `runs release`."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("into", None, "The release folder, e.g. models/<name>: must not exist, be empty, or "
                        "(with --replace) hold a release.", **fv)
    flags.DEFINE_string("model", None, "Which model of the run: an export folder inside it (export, swa, "
                        "snapshots/snapshot-K), released as export/; or 'snapshots' for all of them. Default: "
                        "export; for a CV parent, every model of each fold its oof.json and ensemble.json were made "
                        "from (the same --model for every fold may only name those).", **fv)
    flags.DEFINE_float("max_mb", release.DEFAULT_MAX_MB, "Refuse a release larger than this, in MB (10^6 bytes).",
                       lower_bound=0.0, **fv)
    flags.DEFINE_boolean("float16", False, "Store the weights as float16 (biases, batch norm and the layers "
                         "float16 would move most stay float32: about 2/3 of the size for the recipe), restored to "
                         "float32 when loaded; refused unless every model's probabilities stay within "
                         f"{release.FLOAT16_TOLERANCE:g} of the float32 model's on {release.FLOAT16_SAMPLE} "
                         "validation images of its run.", **fv)
    flags.DEFINE_string("data_dir", None, "With --float16: the labelled folder the runs trained on, if it moved "
                        "(default: the one their records name).", **fv)
    flags.DEFINE_boolean("replace", False, "Replace the release already in --into (whole).", **fv)


def command_release(fv: flags.FlagValues, run: str) -> int:
    """`runs release RUN --into=DIR` (release.release; RUN a run or a CV parent); prints what it wrote. Returns 0."""
    if not fv.into:
        raise release.ReleaseError("--into is required: the release folder, e.g. --into=models/<name>")
    done = release.release(run, fv.model, fv.into, fv.max_mb, fv.replace, fv.float16, fv.data_dir)
    models = ", ".join(f"{name} (the run's {source})" for name, source in done["models"].items())
    float16 = ("" if done["float16_difference"] is None else
               f"; float16 weights, probabilities within {done['float16_difference']:.2g} of float32")
    print(f"released {models} of {run} into {done['into']}: {len(done['sha256'])} files, "
          f"{done['bytes'] / 1e6:.1f} MB{float16}; check with: (cd {done['into']} && sha256sum -c "
          f"{release.CHECKSUMS_FILE})")
    if not done["choice"]:
        print(f"note: no ensemble.json fitted on that model; `python -m salt_tf.predict evaluate "
              f"--model_dir={done['evaluate']}` before releasing carries its threshold and post-processing over")
    return 0


# ------------------------------------------------------------------------------------------------ CLI

PROGRAM = cli.Program(
    module="salt_tf.runs",
    overview=__doc__.split("\n\n")[0],
    commands=(
        cli.Subcommand("list", "one line per run under a folder, the flags that differ as columns",
                       "LOG_ROOT [--sort=KEY] [--where FLAG=VALUE ...] [--csv]", define_list_flags, command_list,
                       arguments=("LOG_ROOT",)),
        cli.Subcommand("diff", "two runs side by side: flags, code, data, weights, metric curves",
                       "RUN_A RUN_B [--plot=ab.png]", define_diff_flags, command_diff, arguments=("RUN_A", "RUN_B")),
        cli.Subcommand("reproduce", "re-run a run from its flags.cfg and compare the weights bit for bit",
                       "RUN [--into=DIR]", define_reproduce_flags, command_reproduce, arguments=("RUN",)),
        cli.Subcommand("release", "copy a finished run's model (or a CV parent's fold ensemble), record, model "
                       "card and SHA-256 sums into a folder to share",
                       "RUN|CV_PARENT --into=models/NAME [--model=swa] [--max_mb=25] [--float16] [--replace]",
                       define_release_flags, command_release, arguments=("RUN",)),
    ),
    user_errors=(RunError, release.ReleaseError, rundir.RunDirError),
)


def main(argv: list[str] | None = None) -> int:
    """The command line (program name first, as sys.argv); returns the exit status."""
    return cli.main(PROGRAM, sys.argv if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
