"""A sweep's folder, its Optuna study's storage, and the `sweep report` command. No TensorFlow.

    <sweep_dir>/
      study.db           STUDY_DB          the default storage: SQLite (any SQLAlchemy URL or journal:PATH instead)
      trial-<n>/         trial_dir         trial n's run directory: an ordinary `python -m salt_tf.train` run;
                                           in a fold sweep (--folds=K) a CV parent of K fold runs, fold-<k>/
      best.cfg           BEST_FLAGFILE     written by `report`: the best trial's flags, without --model_dir
      history.png        (report --plot)   the optimisation history and the parameter importances
      .claims/trial-<n>/ claim_dir         flock-ed by the worker running trial n (records.RunDirLock's .lock)

The study (its trials, their parameters, per-epoch values and states) lives in the storage; what salt_tf
keeps in it besides Optuna's own fields are the user attributes named by the *_ATTR constants below.
salt_tf.sweep runs the trials; this module reads what they left, so `report` starts without TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any

from absl import flags

from salt_tf import cli, records, rundir, run_table

STUDY_DB = "study.db"
TRIAL_PREFIX = "trial-"
BEST_FLAGFILE = "best.cfg"
CLAIMS_DIR = ".claims"
JOURNAL_SCHEME = "journal:"

# Study user attributes: what the study was made from (a rerun or another worker must match them).
SPACE_ATTR = "salt_tf.search_space"    # {flag: Optuna distribution JSON}
BASE_ATTR = "salt_tf.base_flags"       # {flag: value} of the base command line (model_dir, data_dir left out)
OBJECTIVE_ATTR = "salt_tf.objective"   # the metrics.csv column whose best value is a trial's value
# Trial user attributes.
RUN_DIR_ATTR = "salt_tf.run_dir"       # absolute path of the trial's run directory
SWEEP_DIR_ATTR = "salt_tf.sweep_dir"   # absolute path of the sweep folder of the worker that asked for it
SESSIONS_ATTR = "salt_tf.sessions"     # one entry per training session: worker (host:pid), resumed or not
PRUNED_ATTR = "salt_tf.pruned_epoch"   # the epoch after which the pruner stopped it (a fold trial: of that fold)
PRUNED_FOLD_ATTR = "salt_tf.pruned_fold"  # a fold trial: the fold the pruner stopped it in
FOLD_VALUES_ATTR = "salt_tf.fold_values"  # a fold trial: [fold k's best objective or None], its value their mean
FAILED_ATTR = "salt_tf.failed"         # why a trial failed (its training's one line)
NOT_RUN_ATTR = "salt_tf.not_run"       # "surplus" (asked past the budget) or "abandoned": never counts


class SweepError(ValueError):
    """A bad flag, search space, storage or study; the command prints it as one line and exits 2."""


def trial_dir(sweep_dir: str, number: int) -> str:
    """The run directory of trial `number`."""
    return os.path.join(sweep_dir, f"{TRIAL_PREFIX}{number}")


def claim_dir(sweep_dir: str, number: int) -> str:
    """The folder whose lock the worker running trial `number` holds."""
    return os.path.join(sweep_dir, CLAIMS_DIR, f"{TRIAL_PREFIX}{number}")


def storage_url(given: str | None, sweep_dir: str) -> str:
    """The storage URL: `given`, else SQLite in the sweep folder (absolute: workers may start elsewhere)."""
    return given or "sqlite:///" + os.path.join(os.path.abspath(sweep_dir), STUDY_DB)


def shown_url(url: str) -> str:
    """The URL with any password hidden (what messages and record.json show)."""
    if url.startswith(JOURNAL_SCHEME):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL: shown as given, the error names it
        return url


def open_storage(url: str):
    """Connects to a study storage: an SQLAlchemy URL (sqlite:///PATH, postgresql://USER@HOST:PORT/DB, ...) or
    journal:PATH (Optuna's journal file, for a shared file system without a database server).

    Raises:
        SweepError: the database cannot be reached or opened (one line naming the URL).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(10):
        try:
            return _open_storage(url, optuna)
        except Exception as e:  # SQLAlchemy's and the drivers' errors have no common base worth naming
            # Workers starting together on a new database race to create Optuna's tables: the loser's
            # IntegrityError ("UNIQUE constraint failed", "duplicate key") goes away when it tries again.
            if attempt < 9 and (type(e).__name__ == "IntegrityError" or "already exists" in str(e)):
                time.sleep(0.5)
                continue
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SweepError(f"--storage={shown_url(url)}: cannot open the study storage ({detail}); start the "
                             "database or fix the URL (sqlite:///PATH, postgresql://USER@HOST:PORT/DB, "
                             "journal:PATH)") from None


def _open_storage(url: str, optuna):
    """open_storage's one attempt."""
    if url.startswith(JOURNAL_SCHEME):
        path = url[len(JOURNAL_SCHEME):]
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise OSError(f"no folder {os.path.dirname(os.path.abspath(path))}")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(path))
    engine = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    elif url.startswith("sqlite"):  # workers wait for each other's writes (SQLite locks the whole file)
        engine["connect_args"] = {"timeout": 60}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def load_study(storage, name: str):
    """The existing study `name`; SweepError (one line listing the storage's studies) when there is none."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise SweepError(f"--study={name}: no such study in the storage (it holds: {', '.join(names) or 'none'})"
                         ) from None


def default_study_name(sweep_dir: str) -> str:
    """A sweep's study name unless --study gives one: the sweep folder's name."""
    return os.path.basename(os.path.abspath(sweep_dir).rstrip(os.sep))


def counted(trial) -> bool:
    """Whether a trial counts against the budget: every trial asked for, but the surplus and abandoned ones."""
    import optuna

    return trial.state != optuna.trial.TrialState.WAITING and not trial.user_attrs.get(NOT_RUN_ATTR)


# ---------------------------------------------------------------------------------------------------------
# The report.


def define_report_flags(flag_values: flags.FlagValues) -> None:
    """The flags of `sweep report`."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("sweep_dir", None, "The sweep folder (its trial-<n> run directories).", **fv)
    flags.DEFINE_string("study", None, "The study's name (default: the sweep folder's name).", **fv)
    flags.DEFINE_string("storage", None, "The study's storage URL (default: sqlite in the sweep folder).", **fv)
    flags.DEFINE_string("best_flagfile", None, f"Where to write the best trial's flags (default: "
                        f"<sweep_dir>/{BEST_FLAGFILE}).", **fv)
    flags.DEFINE_string("plot", None, "PNG of the optimisation history and the parameter importances "
                        "(needs matplotlib: pip install -e '.[plots]').", **fv)


def trial_rows(study, sweep_dir: str) -> tuple[list[dict], list[str]]:
    """The trials table: per counted trial, what `runs list` shows of its run directory (run_table) plus trial,
    state, value and pruned epoch. A fold trial's row (fold_run_row): its folds together, plus pruned_fold and
    fold_values (each fold's best objective, k = 0..K-1). Returns (rows, columns)."""
    trials = [t for t in study.get_trials(deepcopy=False) if counted(t)]
    runs, extra, folds = [], [], {}
    for t in trials:
        path = t.user_attrs.get(RUN_DIR_ATTR) or trial_dir(sweep_dir, t.number)
        fold_runs = {k: d for k, d in rundir.fold_dirs(path).items()
                     if os.path.isfile(os.path.join(d, rundir.FLAGS_FILE))}
        if os.path.isfile(os.path.join(path, rundir.FLAGS_FILE)):
            runs.append(run_table.load_run(path, name=os.path.basename(path)))
        elif fold_runs or FOLD_VALUES_ATTR in t.user_attrs:
            folds[t.number] = {k: run_table.load_run(d, name=os.path.basename(d)) for k, d in fold_runs.items()}
            runs.append(fold_trial_run(path, folds[t.number]))
        else:  # not started yet (or its folder is on another machine): the study's fields only
            runs.append(run_table.Run(path=path, name=os.path.basename(path), flags={}, record={},
                                      metrics=records.read_metrics(path)))
        extra.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                      "pruned_epoch": t.user_attrs.get(PRUNED_ATTR)})
        if t.number in folds or FOLD_VALUES_ATTR in t.user_attrs:
            extra[-1].update(pruned_fold=t.user_attrs.get(PRUNED_FOLD_ATTR),
                             fold_values=fold_values_text(t.user_attrs.get(FOLD_VALUES_ATTR)))
    flag_names = run_table.differing_flags([r for r in runs if r.flags])
    rows = [dict(e, **r) for e, r in zip(extra, run_table.table_rows(runs, flag_names))]
    for row in rows:
        if row["trial"] in folds:
            row.update(fold_run_row(folds[row["trial"]]))
    fold_columns = ["pruned_fold", "fold_values"] if any("fold_values" in e for e in extra) else []
    columns = ["trial", "state", "value", "pruned_epoch", *fold_columns, "name", "started", "best_val_metric",
               "best_epoch", "epochs_completed", "train_seconds_total", *flag_names]
    return rows, columns


def fold_trial_run(path: str, fold_runs: dict) -> run_table.Run:
    """A fold trial as one row's run: its first fold's flags without --fold (the trial's flags) and record (when
    it started); no metrics of its own (fold_run_row sums its folds')."""
    first = fold_runs[min(fold_runs)] if fold_runs else None
    flags_of = {k: v for k, v in (first.flags if first else {}).items() if k != "fold"}
    return run_table.Run(path=path, name=os.path.basename(path), flags=flags_of,
                         record=first.record if first else {}, metrics=records.read_metrics(path))


def fold_run_row(fold_runs: dict) -> dict:
    """The `runs list` numbers of a fold trial's row: epochs and wall time summed over its folds, best_val_metric
    the mean of the folds' best (blank unless all K folds have one), no single best epoch."""
    progress = [run_table.run_progress(r) for r in fold_runs.values()]
    bests = [p["best_val_metric"] for p in progress]
    counts = {(r.record.get("split") or {}).get("folds") for r in fold_runs.values()}
    whole = len(counts) == 1 and len(bests) == next(iter(counts)) and None not in bests
    return {"best_val_metric": sum(bests) / len(bests) if whole else None, "best_epoch": None,
            "epochs_completed": sum(p["epochs_completed"] or 0 for p in progress) if progress else None,
            "train_seconds_total": sum(p["train_seconds_total"] or 0.0 for p in progress) if progress else None}


def fold_values_text(values: list | None) -> str | None:
    """A fold trial's per-fold values as one cell, "0.6123/0.5987/-" (-: a fold without a value yet)."""
    if not values:
        return None
    return "/".join("-" if v is None else f"{v:.4f}" for v in values)


def best_flagfile_text(study) -> tuple[Any, str] | None:
    """(the best complete trial, its run's flags.cfg without --model_dir), or None without a complete trial. A
    fold trial's: its fold-0's flags.cfg without --model_dir and --fold (a flagfile for `cv train`, or for
    another fold sweep)."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    path = best.user_attrs.get(RUN_DIR_ATTR)
    fold_trial = bool(path) and not os.path.isfile(os.path.join(path, rundir.FLAGS_FILE)) and \
        os.path.isfile(os.path.join(rundir.fold_dir(path, 0), rundir.FLAGS_FILE))
    source = rundir.fold_dir(path, 0) if fold_trial else path
    values = rundir.read_flagfile(source) if source and os.path.isdir(source) else None
    if values is None:
        return None
    if fold_trial:
        values.pop("fold", None)  # cv train sets each fold's own
        lines = [f"# The best trial of study {study.study_name}: trial {best.number}, value {best.value:.4f} (the "
                 f"mean of its folds' {fold_values_text(best.user_attrs.get(FOLD_VALUES_ATTR))}), run {path}.",
                 "# python -m salt_tf.cv train --flagfile=<this file> --parent=<a new folder>"]
    else:
        lines = [f"# The best trial of study {study.study_name}: trial {best.number}, value {best.value:.4f}, run "
                 f"{path}.", "# python -m salt_tf.train --flagfile=<this file> --model_dir=<a new run directory>"]
    lines += [f"--{name}={value}" for name, value in sorted(values.items()) if name != "model_dir"]
    return best, "\n".join(lines) + "\n"


def importances(study) -> dict[str, float] | None:
    """Optuna's parameter importances over the complete trials (None: too few trials to say)."""
    import optuna

    try:
        with warnings.catch_warnings():  # PED-ANOVA warns that one parameter's importance is trivially 1
            warnings.simplefilter("ignore", UserWarning)
            return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # fewer than two complete trials, or a single-valued parameter
        return None


def plot(study, scores: dict[str, float] | None, path: str) -> None:
    """The optimisation history (each complete trial's value, the best so far) and the importances, one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SweepError("--plot needs matplotlib: pip install -e '.[plots]'") from None
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    figure, (history, bars) = plt.subplots(1, 2, figsize=(11, 4))
    numbers, values = [t.number for t in done], [t.value for t in done]
    history.plot(numbers, values, "o", label="trial value")
    history.plot(numbers, [max(values[:i + 1]) for i in range(len(values))], "-", label="best so far")
    history.set(xlabel="trial", ylabel=study.user_attrs.get(OBJECTIVE_ATTR, "value"), title="optimisation history")
    history.legend()
    names = sorted(scores or {}, key=lambda n: (scores or {})[n])
    bars.barh(names, [(scores or {})[n] for n in names])
    bars.set(xlabel="importance", title="parameter importances" + ("" if scores else " (too few trials)"))
    figure.tight_layout()
    figure.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    plt.close(figure)


def run_report(fv: flags.FlagValues) -> int:
    """`sweep report`: the trials table, the best trial's flagfile, the importances, optionally the plot."""
    if not fv.sweep_dir:
        raise SweepError("--sweep_dir is required: the sweep folder")
    if not os.path.isdir(fv.sweep_dir):
        raise SweepError(f"--sweep_dir={fv.sweep_dir}: no such folder")
    if fv.storage is None and not os.path.isfile(os.path.join(fv.sweep_dir, STUDY_DB)):
        raise SweepError(f"--sweep_dir={fv.sweep_dir}: no {STUDY_DB} in it; give the sweep's --storage=URL if its "
                         "study lives elsewhere")
    study = load_study(open_storage(storage_url(fv.storage, fv.sweep_dir)),
                       fv.study or default_study_name(fv.sweep_dir))
    rows, columns = trial_rows(study, fv.sweep_dir)
    shown = [dict(r, value=None if r["value"] is None else f"{r['value']:.4f}") for r in rows]
    sys.stdout.write(run_table.render_table(shown, columns) if rows else "no trials yet\n")
    best = best_flagfile_text(study)
    if best is not None:
        path = fv.best_flagfile or os.path.join(fv.sweep_dir, BEST_FLAGFILE)
        rundir.write_text(path, best[1])
        folds = best[0].user_attrs.get(FOLD_VALUES_ATTR)
        print(f"best: trial {best[0].number}, value {best[0].value:.4f}" +
              (f" (the mean of its {len(folds)} folds' {fold_values_text(folds)})" if folds else "") +
              f"; its flags: {path}")
    scores = importances(study)
    print("importances: " + (", ".join(f"{n} {v:.3f}" for n, v in scores.items()) if scores else
                             "need two or more complete trials"))
    if fv.plot:
        plot(study, scores, fv.plot)
        print(f"plot: {fv.plot}")
    return 0


def as_json(value: Any) -> str:
    """Canonical JSON (sorted keys): how the study's attributes are compared."""
    return json.dumps(value, sort_keys=True)


REPORT = cli.Subcommand(
    name="report", summary="a sweep's trials table, its best trial's flags as a flagfile, importances, a plot",
    usage="--sweep_dir=DIR [--study=NAME] [--storage=URL] [--plot=history.png]",
    define_flags=define_report_flags, run=run_report)
