"""Experiment tracking without a service: the run directories are the database.

    python -m salt_tf.runs list LOG_ROOT [--sort=best_val_metric|date|name|epochs|wall]
                                         [--where FLAG=VALUE ...] [--csv]
    python -m salt_tf.runs diff RUN_A RUN_B [--plot=ab.png]
    python -m salt_tf.runs reproduce RUN [--into DIR]

`list` tables every run under a folder with only the flags that differ between them; `diff` puts two runs
side by side (flags, code, data, environment, weights, metric curves); `reproduce` re-runs a run from its
flags.cfg in a fresh process and says whether the weights came out bit-identical, and if not, why identity
could not be expected. Exit status: 0 done / PASS, 1 reproduction FAIL, 2 unusable path or arguments.

This module reads run records only (salt_tf.rundir, salt_tf.records and the data fingerprint); it never
imports the training code, so listing a hundred runs costs no TensorFlow start-up, and it keeps working on
runs made by older versions of the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import subprocess
import sys
from typing import Any, Iterable

import numpy as np
import pandas as pd

from salt_tf import records, rundir

# Flags that say where a run lives, not what it is: two runs differing only here are the same experiment.
IGNORED_FLAGS = ("model_dir",)

SORT_KEYS = ("best_val_metric", "date", "name", "epochs", "wall")
CURVE_KEYS = ("val_metric", "train_loss")


class RunError(Exception):
    """A path or record the command cannot use; main() prints it as one line and exits 2."""


# ------------------------------------------------------------------------------------------------ loading


@dataclasses.dataclass
class Run:
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


def progress(run: Run) -> dict:
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
    known = set().union(*(r.flags for r in runs)) if runs else set()
    for name in wanted:
        if runs and name not in known:
            raise RunError(f"--where {name}=...: no listed run has a flag --{name}")
    return [r for r in runs if all(same_flag_value(r.flags.get(n), v) for n, v in wanted.items())]


def sort_runs(runs: list[Run], key: str) -> list[Run]:
    # (blank last, value): runs without a summary sort after every run that has one, whatever the key.
    def by(value, descending=False):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return (1, 0)
        return (0, -value if descending else value)

    keyed = {
        "best_val_metric": lambda r: by(progress(r)["best_val_metric"], descending=True),
        "epochs": lambda r: by(progress(r)["epochs_completed"], descending=True),
        "wall": lambda r: by(progress(r)["train_seconds_total"], descending=True),
        "date": lambda r: (r.record.get("started") is None, r.record.get("started") or ""),
        "name": lambda r: (0, r.name),
    }[key]
    return sorted(runs, key=lambda r: (keyed(r), r.name))


def table_rows(runs: list[Run], flag_names: list[str]) -> list[dict]:
    """One dict per run: the fixed columns (raw values, None for blanks) then the given flags."""
    rows = []
    for run in runs:
        p = progress(run)
        row = {"name": run.name, "started": run.record.get("started"), "best_val_metric": p["best_val_metric"],
               "best_epoch": p["best_epoch"], "epochs_completed": p["epochs_completed"],
               "train_seconds_total": p["train_seconds_total"]}
        row.update({name: run.flags.get(name) for name in flag_names})
        rows.append(row)
    return rows


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


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
    headers = ["wall" if c == "train_seconds_total" else c for c in columns]
    cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = {"best_val_metric", "best_epoch", "epochs_completed", "train_seconds_total"}

    def line(values):
        parts = [v.rjust(w) if c in numeric else v.ljust(w) for v, w, c in zip(values, widths, columns)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in cells]) + "\n"


def command_list(args) -> int:
    root = args.log_root
    runs = [load_run(p, name=os.path.relpath(p, root)) for p in find_runs(root)]
    runs = sort_runs(select_runs(runs, parse_where(args.where)), args.sort)
    flag_names = differing_flags(runs)
    rows = table_rows(runs, flag_names)
    columns = ["name", "started", "best_val_metric", "best_epoch", "epochs_completed", "train_seconds_total",
               *flag_names]
    if args.csv:
        pd.DataFrame(rows, columns=columns).to_csv(sys.stdout, index=False)
    elif not runs:
        print(f"no salt_tf runs under {root}" + (" matching --where" if args.where else ""), file=sys.stderr)
    else:
        sys.stdout.write(render_table(rows, columns))
    return 0


# ------------------------------------------------------------------------------------------------ diff


def _differences(a: dict, b: dict, keys: Iterable[str] | None = None) -> dict[str, tuple]:
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
    fa, fb = records.read_fingerprints(a_path), records.read_fingerprints(b_path)
    common, epoch, paths = records.first_divergence(fa, fb)
    total = len(set(fa[epoch]) | set(fb[epoch])) if epoch is not None else (len(fa[common[-1]]) if common else 0)
    missing = [p for p, f in ((a_path, fa), (b_path, fb)) if not f]
    return {"epochs_compared": common, "first_divergence": epoch, "variables": paths, "total_variables": total,
            "missing": missing}


def diff_runs(a: Run, b: Run) -> dict:
    code_a, code_b = a.code, b.code
    return {
        "flags": _differences(a.flags, b.flags, sorted((set(a.flags) | set(b.flags)) - set(IGNORED_FLAGS))),
        "code": {"commit": (code_a.get("commit"), code_b.get("commit")),
                 "dirty": (code_a.get("dirty"), code_b.get("dirty")),
                 "same_diff": code_a.get("diff") == code_b.get("diff")},
        "data": _differences(a.data, b.data, ("fingerprint", "dir", "train_images", "val_images")),
        "environment": _differences(a.environment, b.environment),
        "summary": {"a": progress(a), "b": progress(b)},
        "weights": weights_comparison(a.path, b.path),
        "curves": metric_curves(a, b),
    }


def short(value: Any) -> str:
    """Hashes and commits cut to 12 characters, like git's abbreviations; everything else as is."""
    text = "-" if value is None else str(value)
    return text[:12] if len(text) >= 40 and all(c in "0123456789abcdef" for c in text) else text


def describe_weights(w: dict) -> str:
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


# ------------------------------------------------------------------------------------------------ plot


def plot_curves(curves: list[dict], labels: tuple[str, str], path: str) -> str:
    """Writes val_metric and train_loss vs epoch of both runs to a PNG; returns the renderer used."""
    try:
        import matplotlib
    except ImportError:
        plot_curves_cv2(curves, labels, path)
        return "opencv"
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, CURVE_KEYS):
        for side, label in zip("ab", labels):
            points = _points(curves, f"{key}_{side}")
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def _points(curves: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["epoch"], float(r[key])) for r in curves
            if r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]


# BGR: matplotlib's first two default colours, so both renderers draw A blue and B orange.
CV2_COLOURS = ((180, 119, 31), (14, 127, 255))


def plot_curves_cv2(curves: list[dict], labels: tuple[str, str], path: str) -> None:
    import cv2

    width, height, panel_w, panel_h, left, top = 1000, 450, 400, 300, 70, 90
    image = np.full((height, width, 3), 255, np.uint8)
    font, black, grey = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (200, 200, 200)
    for k, label in enumerate(labels):  # legend, one line per run
        y = 20 + 22 * k
        cv2.line(image, (left, y), (left + 30, y), CV2_COLOURS[k], 3)
        cv2.putText(image, f"{'AB'[k]}: {label}"[-100:], (left + 38, y + 5), font, 0.5, black, 1, cv2.LINE_AA)
    epochs = [r["epoch"] for r in curves] or [1]
    e0, e1 = min(epochs), max(epochs)
    for p, key in enumerate(CURVE_KEYS):
        x0, y0 = left + p * (panel_w + 100), top
        series = [_points(curves, f"{key}_{side}") for side in "ab"]
        values = [v for s in series for _, v in s] or [0.0, 1.0]
        v0, v1 = min(values), max(values)
        pad = (v1 - v0) * 0.08 or max(abs(v0) * 0.05, 0.01)
        v0, v1 = v0 - pad, v1 + pad

        def to_pixel(epoch, value):
            fx = 0.5 if e1 == e0 else (epoch - e0) / (e1 - e0)
            return (int(round(x0 + fx * panel_w)), int(round(y0 + (v1 - value) / (v1 - v0) * panel_h)))

        for i in range(5):  # grid and y labels
            value = v0 + (v1 - v0) * i / 4
            _, y = to_pixel(e0, value)
            cv2.line(image, (x0, y), (x0 + panel_w, y), grey, 1)
            cv2.putText(image, f"{value:.3f}", (x0 - 62, y + 4), font, 0.4, black, 1, cv2.LINE_AA)
        for epoch in sorted(set(epochs))[:: max(1, len(set(epochs)) // 10)]:  # x labels
            x, _ = to_pixel(epoch, v0)
            cv2.putText(image, str(epoch), (x - 5, y0 + panel_h + 18), font, 0.4, black, 1, cv2.LINE_AA)
        cv2.rectangle(image, (x0, y0), (x0 + panel_w, y0 + panel_h), black, 1)
        cv2.putText(image, key, (x0 + panel_w // 2 - 40, y0 - 12), font, 0.6, black, 1, cv2.LINE_AA)
        cv2.putText(image, "epoch", (x0 + panel_w // 2 - 20, y0 + panel_h + 40), font, 0.45, black, 1,
                    cv2.LINE_AA)
        for k, points in enumerate(series):
            pixels = np.array([to_pixel(e, v) for e, v in points], np.int32)
            if len(pixels) > 1:
                cv2.polylines(image, [pixels.reshape(-1, 1, 2)], False, CV2_COLOURS[k], 2, cv2.LINE_AA)
            for x, y in pixels:  # markers (A drawn larger, so equal values show both): one epoch is a point
                cv2.circle(image, (int(x), int(y)), 6 - 2 * k, CV2_COLOURS[k], -1, cv2.LINE_AA)
    try:
        rundir.write_png(path, image)
    except (OSError, ValueError) as e:
        raise RunError(f"--plot={path}: could not write the PNG ({getattr(e, 'strerror', None) or e})") from None


def command_diff(args) -> int:
    a, b = load_run(args.run_a), load_run(args.run_b)
    d = diff_runs(a, b)
    sys.stdout.write(render_diff(d, a, b))
    if args.plot:
        if not d["curves"]:
            print(f"no plot: neither run has a finished epoch (no {rundir.METRICS_FILE})")
        else:
            renderer = plot_curves(d["curves"], (a.name, b.name), args.plot)
            print(f"plot: {args.plot} ({renderer})")
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

    No hash of the flags is recorded, so only the flags the record also witnesses can be checked: the
    initial learning rate (epoch 1 of metrics.csv), seed and determinism (record.json), data folder and
    validation size (record.json). A change to any other flag shows up only as diverging weights.
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
        if run.flags.get("dataset") != "demo":
            raise RunError(f"{run.path}: its data folder is not usable now: {e}") from None
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


def reproduce_command(run: Run, target: str, epochs: int, before: dict) -> list[str]:
    # absl applies flags in order, so these overrides win over the values inside the flagfile.
    command = [sys.executable, "-m", "salt_tf.train", f"--flagfile={os.path.join(run.path, rundir.FLAGS_FILE)}",
               f"--model_dir={target}", f"--epochs={epochs}"]
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
    flags = _differences(a.flags, b.flags, sorted((set(a.flags) | set(b.flags)) - skip))
    if flags:
        problems.append("flags differ: " + ", ".join(f"{k}: {va} -> {vb}" for k, (va, vb) in flags.items()))
    return {"problems": problems, "environment": _differences(a.environment, b.environment),
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
    out = out or sys.stdout
    run = load_run(path)
    if not run.data or not run.code:
        raise RunError(f"{path}: {rundir.RECORD_FILE} has no code or data section; nothing to compare against")
    epochs = progress(run)["epochs_completed"]
    if not epochs:
        raise RunError(f"{path}: no finished epoch to reproduce")
    target = into or reproduce_dir(path)
    if os.path.exists(target) and os.listdir(target):
        raise RunError(f"{target}: exists and is not empty; a reproduction must start from scratch")

    print(f"reproducing {path} ({epochs} epoch{'s' * (epochs != 1)}) into {target}", file=out)
    before = check_before(run)
    for problem in before["problems"]:
        print(f"before: {problem}", file=out)
    if not before["problems"]:
        print(f"before: code, data (fingerprint {short(before['data_fingerprint'])}) and flags agree with "
              "the record", file=out)
    if before["override_data_dir"]:
        print(f"note: flags.cfg's --data_dir={run.flags['data_dir']} is relative to where the run started; "
              f"passing the recorded --data_dir={before['data_dir']}", file=out)
    command = reproduce_command(run, target, epochs, before)
    print("running: " + " ".join(shlex.quote(c) for c in command), file=out)
    out.flush()
    status = _stream(command, out)
    if status != 0:
        print(f"FAIL: the reproduction run exited with status {status} (its output is above)", file=out)
        return 1

    after = compare_reproduction(run, load_run(target), overridden=("epochs", "data_dir"))
    weights = after["weights"]
    print(describe_weights(weights), file=out)
    for key, (va, vb) in after["environment"].items():
        print(f"note: environment differs: {key}: {va} -> {vb}", file=out)
    identical = (weights["first_divergence"] is None
                 and weights["epochs_compared"] == list(range(1, epochs + 1)))
    problems = _dedupe(before["problems"] + after["problems"])
    if identical and not problems:
        print(f"PASS: bit-identical reproduction of {path} (same code, data, split and weights after every "
              "epoch)", file=out)
        return 0
    if problems:
        print(f"FAIL: cannot expect identity: {'; '.join(problems)}", file=out)
    if not identical:
        reason = (f"weights diverge at epoch {weights['first_divergence']}" if weights["first_divergence"]
                  else f"reproduction has epochs {weights['epochs_compared']} of 1..{epochs}")
        print(f"FAIL: {reason}", file=out)
    return 1


def command_reproduce(args) -> int:
    return reproduce(args.run, args.into)


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m salt_tf.runs", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="table of the runs under a folder")
    listing.add_argument("log_root")
    listing.add_argument("--sort", choices=SORT_KEYS, default="best_val_metric",
                         help="best_val_metric, epochs, wall: largest first; date: oldest first; name: A-Z")
    listing.add_argument("--where", action="append", default=[], metavar="FLAG=VALUE",
                         help="keep runs whose flag has this value (repeatable)")
    listing.add_argument("--csv", action="store_true", help="CSV on stdout instead of the table")
    listing.set_defaults(handler=command_list)

    diff = commands.add_parser("diff", help="two runs side by side")
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    diff.add_argument("--plot", metavar="PNG", help="also draw val_metric and train_loss vs epoch")
    diff.set_defaults(handler=command_diff)

    again = commands.add_parser("reproduce", help="re-run a run from its flags.cfg and compare bit for bit")
    again.add_argument("run")
    again.add_argument("--into", metavar="DIR", help="run directory of the copy (default <run>-reproduce-<n>)")
    again.set_defaults(handler=command_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
