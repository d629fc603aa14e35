"""Run directories side by side: loading them, the `runs list` table and the `runs diff` report.

A `Run` is what a run directory records (flags.cfg, record.json, metrics.csv; salt_tf.rundir and
salt_tf.records read them); `find_runs` finds them under a folder at any depth. `table_rows`/`render_table`
make the list (only the flags that differ between the runs as columns), `diff_runs`/`render_diff` the
comparison of two runs (flags, code, data, environment, weights, metric curves). Reads records only: no
TensorFlow, and runs made by older versions of the code still load (missing files give blanks).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable

import numpy as np
import pandas as pd

from salt_tf import records, rundir
from salt_tf.progress import format_seconds

# Flags that say where a run lives, not what it is: two runs differing only here are the same experiment.
IGNORED_FLAGS = ("model_dir",)

SORT_KEYS = ("best_val_metric", "date", "name", "epochs", "wall")
CURVE_KEYS = ("val_metric", "train_loss")


class RunError(Exception):
    """A path or record the runs command cannot use; it prints it as one line and exits 2."""


# ------------------------------------------------------------------------------------------------ loading


@dataclasses.dataclass
class Run:
    """One run directory's records: its flags (flags.cfg), record.json ({} if none yet), metrics.csv rows."""

    path: str
    name: str
    flags: dict[str, str]
    record: dict
    metrics: pd.DataFrame

    @property
    def summary(self) -> dict:
        return self.record.get("summary") or {}

    @property
    def data(self) -> dict:
        return self.record.get("data") or {}

    @property
    def code(self) -> dict:
        return self.record.get("code") or {}

    @property
    def environment(self) -> dict:
        return self.record.get("environment") or {}


def load_run(path: str, name: str | None = None) -> Run:
    """The records of the run directory `path` (`name`: how tables show it; default the path).

    Raises:
        RunError: no such directory, or no flags.cfg in it (one line).
    """
    flags_path = os.path.join(path, rundir.FLAGS_FILE)
    if not os.path.isdir(path):
        raise RunError(f"{path}: no such directory")
    if not os.path.isfile(flags_path):
        raise RunError(f"{path}: not a salt_tf run directory (no {rundir.FLAGS_FILE})")
    flags = rundir.read_flagfile(path)
    record_path = os.path.join(path, rundir.RECORD_FILE)
    # A run that died before its data was loaded has flags.cfg only: still listable, with blanks.
    record = rundir.read_json(record_path) if os.path.isfile(record_path) else {}
    return Run(path=path, name=name or path, flags=flags, record=record, metrics=records.read_metrics(path))


def is_run_dir(path: str) -> bool:
    """Whether `path` holds a run's flags.cfg and record.json."""
    return all(os.path.isfile(os.path.join(path, f)) for f in (rundir.FLAGS_FILE, rundir.RECORD_FILE))


def find_runs(root: str) -> list[str]:
    """Run directories (flags.cfg + record.json) at any depth under root, root included, in path order."""
    if not os.path.isdir(root):
        raise RunError(f"{root}: no such directory")
    found = []
    for folder, subfolders, _ in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        if is_run_dir(folder):
            found.append(folder)
            subfolders[:] = [d for d in subfolders if d not in rundir.RUN_FOLDERS]  # never runs: keeps it fast
    return found


def run_progress(run: Run) -> dict:
    """Epochs completed, best epoch and metric, train+eval seconds: blanks (None) for a run without any.

    The summary is written when a session ends, so while a run trains (or after a crash) metrics.csv is
    ahead of it; the same numbers are then derived from metrics.csv the way the loop derives them.
    """
    rows = run.metrics
    summary = run.summary
    keys = ("epochs_completed", "best_epoch", "best_val_metric", "train_seconds_total")
    if rows.empty or "epoch" not in rows or summary.get("epochs_completed") == len(rows):
        return {k: summary.get(k) for k in keys}
    seconds = rows.get("train_seconds", 0) + rows.get("eval_seconds", 0)
    result = {"epochs_completed": int(rows["epoch"].max()), "best_epoch": None, "best_val_metric": None,
              "train_seconds_total": float(np.sum(seconds))}
    if "val_metric" in rows and rows["val_metric"].notna().any():  # a diverged run may log NaN only
        best = rows.loc[rows["val_metric"].idxmax()]  # first of equal maxima, as the loop's max() picks
        result.update(best_epoch=int(best["epoch"]), best_val_metric=float(best["val_metric"]))
    return result


# ------------------------------------------------------------------------------------------------ list


def differing_flags(runs: list[Run]) -> list[str]:
    """Names of the flags whose value is not the same in every run (a flag missing from a run differs)."""
    names = set().union(*(r.flags for r in runs)) if runs else set()
    return sorted(n for n in names - set(IGNORED_FLAGS) if len({r.flags.get(n) for r in runs}) > 1)


def parse_where(conditions: Iterable[str]) -> dict[str, str]:
    """{flag: value} of `--where FLAG=VALUE` conditions (a leading -- on FLAG is ignored); RunError if malformed."""
    wanted = {}
    for condition in conditions:
        name, sep, value = condition.partition("=")
        name = name.lstrip("-")
        if not sep or not name:
            raise RunError(f"--where {condition}: expected FLAG=VALUE, e.g. --where learning_rate=0.001")
        wanted[name] = value
    return wanted


def same_flag_value(actual: str | None, wanted: str) -> bool:
    """Whether a recorded flag value equals a value typed by a person (1e-3 == 0.001, 1 == true)."""
    if actual is None:
        return False
    a, w = actual.strip().lower(), wanted.strip().lower()
    if a in ("true", "false"):
        w = {"1": "true", "yes": "true", "0": "false", "no": "false"}.get(w, w)
    if a == w:
        return True
    try:
        return float(a) == float(w)
    except ValueError:
        return False


def select_runs(runs: list[Run], wanted: dict[str, str]) -> list[Run]:
    """The runs whose flags have the wanted values (same_flag_value); RunError for a flag no run has."""
    known = set().union(*(r.flags for r in runs)) if runs else set()
    for name in wanted:
        if runs and name not in known:
            raise RunError(f"--where {name}=...: no listed run has a flag --{name}")
    return [r for r in runs if all(same_flag_value(r.flags.get(n), v) for n, v in wanted.items())]


def sort_runs(runs: list[Run], key: str) -> list[Run]:
    """The runs in the order of `key` (one of SORT_KEYS), then by name."""
    # (blank last, value): runs without a summary sort after every run that has one, whatever the key.
    def by(value, descending=False):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return (1, 0)
        return (0, -value if descending else value)

    keyed = {
        "best_val_metric": lambda r: by(run_progress(r)["best_val_metric"], descending=True),
        "epochs": lambda r: by(run_progress(r)["epochs_completed"], descending=True),
        "wall": lambda r: by(run_progress(r)["train_seconds_total"], descending=True),
        "date": lambda r: (r.record.get("started") is None, r.record.get("started") or ""),
        "name": lambda r: (0, r.name),
    }[key]
    return sorted(runs, key=lambda r: (keyed(r), r.name))


def table_rows(runs: list[Run], flag_names: list[str]) -> list[dict]:
    """One dict per run: the fixed columns (raw values, None for blanks) then the given flags."""
    rows = []
    for run in runs:
        p = run_progress(run)
        row = {"name": run.name, "started": run.record.get("started"), "best_val_metric": p["best_val_metric"],
               "best_epoch": p["best_epoch"], "epochs_completed": p["epochs_completed"],
               "train_seconds_total": p["train_seconds_total"]}
        row.update({name: run.flags.get(name) for name in flag_names})
        rows.append(row)
    return rows


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key == "started":
        return str(value).replace("T", " ")[:16]
    if key == "best_val_metric":
        return f"{value:.4f}"
    if key == "train_seconds_total":
        return format_seconds(value)
    return str(value)


def render_table(rows: list[dict], columns: list[str]) -> str:
    """The `runs list` table of table_rows: aligned columns, numbers right-aligned, blanks for missing values."""
    headers = ["wall" if c == "train_seconds_total" else c for c in columns]
    cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = {"best_val_metric", "best_epoch", "epochs_completed", "train_seconds_total"}

    def line(values):
        parts = [v.rjust(w) if c in numeric else v.ljust(w) for v, w, c in zip(values, widths, columns)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in cells]) + "\n"


# ------------------------------------------------------------------------------------------------ diff


def differences(a: dict, b: dict, keys: Iterable[str] | None = None) -> dict[str, tuple]:
    """{key: (a's value, b's value)} of the keys (default: all of either) whose values differ."""
    keys = sorted(set(a) | set(b)) if keys is None else keys
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def metric_curves(a: Run, b: Run) -> list[dict]:
    """Per epoch of either run: val_metric and train_loss of each (None where a run has no such epoch)."""
    def by_epoch(run):
        if run.metrics.empty:
            return {}
        return {int(r["epoch"]): r for r in run.metrics.to_dict("records")}

    rows_a, rows_b = by_epoch(a), by_epoch(b)
    curves = []
    for epoch in sorted(set(rows_a) | set(rows_b)):
        row = {"epoch": epoch}
        for key in CURVE_KEYS:
            row[f"{key}_a"] = rows_a.get(epoch, {}).get(key)
            row[f"{key}_b"] = rows_b.get(epoch, {}).get(key)
        curves.append(row)
    return curves


def weights_comparison(a_path: str, b_path: str) -> dict:
    """Two runs' weights epoch by epoch (fingerprints.json): the epochs compared, the first epoch at which they
    differ (None: identical) and its differing variables, how many there are, the runs without fingerprints."""
    fa, fb = records.read_fingerprints(a_path), records.read_fingerprints(b_path)
    common, epoch, paths = records.first_divergence(fa, fb)
    total = len(set(fa[epoch]) | set(fb[epoch])) if epoch is not None else (len(fa[common[-1]]) if common else 0)
    missing = [p for p, f in ((a_path, fa), (b_path, fb)) if not f]
    return {"epochs_compared": common, "first_divergence": epoch, "variables": paths, "total_variables": total,
            "missing": missing}


def diff_runs(a: Run, b: Run) -> dict:
    """Everything that differs between two runs, as data: flags, code, data, environment, summaries, weights
    (weights_comparison) and both metric curves (metric_curves); render_diff prints it."""
    code_a, code_b = a.code, b.code
    return {
        "flags": differences(a.flags, b.flags, sorted((set(a.flags) | set(b.flags)) - set(IGNORED_FLAGS))),
        "code": {"commit": (code_a.get("commit"), code_b.get("commit")),
                 "dirty": (code_a.get("dirty"), code_b.get("dirty")),
                 "same_diff": code_a.get("diff") == code_b.get("diff")},
        "data": differences(a.data, b.data, ("fingerprint", "dir", "train_images", "val_images")),
        "environment": differences(a.environment, b.environment),
        "summary": {"a": run_progress(a), "b": run_progress(b)},
        "weights": weights_comparison(a.path, b.path),
        "curves": metric_curves(a, b),
    }


def short(value: Any) -> str:
    """Hashes and commits cut to 12 characters, like git's abbreviations; everything else as is."""
    text = "-" if value is None else str(value)
    return text[:12] if len(text) >= 40 and all(c in "0123456789abcdef" for c in text) else text


def describe_weights(w: dict) -> str:
    """One line saying what weights_comparison found."""
    common = w["epochs_compared"]
    if w.get("missing"):
        return f"weights: not comparable, no {rundir.FINGERPRINTS_FILE} in {', '.join(w['missing'])}"
    if not common:
        return "weights: no epoch in common to compare"
    if w["first_divergence"] is None:
        epochs = f"epoch {common[0]}" if len(common) == 1 else f"each of epochs {common[0]}..{common[-1]}"
        return f"weights: bit-identical after {epochs} ({w['total_variables']} variables)"
    names = w["variables"]
    total = w["total_variables"]
    count = f"all {total}" if len(names) == total else f"{len(names)} of {total}"
    shown = ", ".join(names[:5]) + (f", ... (+{len(names) - 5} more)" if len(names) > 5 else "")
    return (f"weights: diverge at epoch {w['first_divergence']} (identical before it): {count} variables "
            f"differ: {shown}")


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4f}"


def render_diff(d: dict, a: Run, b: Run) -> str:
    """The `runs diff` report of diff_runs: A and B, what differs, the weights, then both curves per epoch."""
    out = [f"A: {a.name}", f"B: {b.name}", ""]
    out.append("flags: same" if not d["flags"] else "flags:")
    out += [f"  {name}: {_shown(va)} -> {_shown(vb)}" for name, (va, vb) in d["flags"].items()]

    commit_a, commit_b = d["code"]["commit"]
    dirty_a, dirty_b = d["code"]["dirty"]
    out.append("code:")
    out.append(f"  commit: {short(commit_a)} (both)" if commit_a == commit_b
               else f"  commit: {short(commit_a)} -> {short(commit_b)}")
    out.append(f"  uncommitted changes: {_yes(dirty_a)} -> {_yes(dirty_b)}; diffs "
               + ("identical" if d["code"]["same_diff"] else "differ"))

    out.append("data: same" + (f" (fingerprint {short(a.data.get('fingerprint'))})" if a.data else "")
               if not d["data"] else "data:")
    out += [f"  {k}: {short(va)} -> {short(vb)}" for k, (va, vb) in d["data"].items()]
    out.append("environment: same" if not d["environment"] else "environment:")
    out += [f"  {k}: {va} -> {vb}" for k, (va, vb) in d["environment"].items()]

    sa, sb = d["summary"]["a"], d["summary"]["b"]
    out.append(f"best val_metric: {_number(sa['best_val_metric']) or '-'} (epoch {sa['best_epoch'] or '-'} of "
               f"{sa['epochs_completed'] or 0}) -> {_number(sb['best_val_metric']) or '-'} (epoch "
               f"{sb['best_epoch'] or '-'} of {sb['epochs_completed'] or 0})")
    out.append(describe_weights(d["weights"]))
    out.append("")
    headers = ["epoch", "val_metric A", "val_metric B", "train_loss A", "train_loss B"]
    keys = ["val_metric_a", "val_metric_b", "train_loss_a", "train_loss_b"]
    table = [[str(r["epoch"])] + [_number(r[k]) for k in keys] for r in d["curves"]]
    widths = [max([len(h)] + [len(row[i]) for row in table]) for i, h in enumerate(headers)]
    for row in [headers] + table:
        out.append("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    return "\n".join(out) + "\n"


def _shown(value):
    return "(unset)" if value is None else (value or '""')


def _yes(value):
    return {True: "yes", False: "no"}.get(value, "unknown")
