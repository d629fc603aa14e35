"""The run record: every file of the run directory that is not a checkpoint or an event file.

    flags.cfg     effective flags; passing it back with --flagfile reproduces (or resumes) the run
    split.csv     id, role (train/val), coverage_class
    record.json   code version, environment, determinism applied, data fingerprint, final summary
    metrics.csv   one row per finished epoch
    fingerprints.json   per epoch, the SHA-256 of every variable (what tools/compare_runs.py reads)

Every write is atomic (temp file in the same folder + rename): a crash leaves the old file or the new one,
never half a file that would break a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import Any

import pandas as pd

FLAGS_FILE = "flags.cfg"
SPLIT_FILE = "split.csv"
RECORD_FILE = "record.json"
METRICS_FILE = "metrics.csv"
FINGERPRINTS_FILE = "fingerprints.json"


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def update_record(run_dir: str, **fields: Any) -> dict:
    """Merges fields into record.json (created if absent) and returns the whole record."""
    path = os.path.join(run_dir, RECORD_FILE)
    record = read_json(path) if os.path.isfile(path) else {}
    record.update(fields)
    write_json(path, record)
    return record


def code_version(source_dir: str | None = None) -> dict:
    """Git commit and uncommitted diff of the code that runs (None outside a git checkout)."""
    source_dir = source_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=source_dir, capture_output=True, text=True,
                                  timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff": None}
    # Only what can change a run's numbers: the package and the flagfiles (not docs or tests).
    diff = git("diff", "HEAD", "--", "salt_tf", "flags") or ""
    return {"commit": commit.strip(), "dirty": bool(diff), "diff": diff}


# Prefix of an exported model's weight files (<export>/weights.index, weights.data-*), written by
# checkpoints.export_to; here so runs.py can hash them without importing TensorFlow.
EXPORT_WEIGHTS = "weights"


def files_sha256(folder: str, prefix: str) -> str | None:
    """One SHA-256 over the names and bytes of the files in `folder` whose names start with `prefix` (an
    exported model's weights.*), in name order; None if there are none."""
    names = sorted(n for n in os.listdir(folder) if n.startswith(prefix)) if os.path.isdir(folder) else []
    if not names:
        return None
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_metrics(run_dir: str) -> pd.DataFrame:
    path = os.path.join(run_dir, METRICS_FILE)
    return pd.read_csv(path) if os.path.isfile(path) else pd.DataFrame()


def write_metrics(run_dir: str, rows: list[dict]) -> None:
    path = os.path.join(run_dir, METRICS_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    pd.DataFrame(rows).to_csv(tmp, index=False)
    os.replace(tmp, path)


def read_fingerprints(run_dir: str) -> dict[int, dict[str, str]]:
    """{epoch: {variable path: sha256}} of a run (empty if it has none)."""
    path = os.path.join(run_dir, FINGERPRINTS_FILE)
    if not os.path.isfile(path):
        return {}
    return {int(epoch): value for epoch, value in read_json(path).items()}


def write_fingerprints(run_dir: str, fingerprints: dict[int, dict[str, str]]) -> None:
    write_json(os.path.join(run_dir, FINGERPRINTS_FILE), {str(k): v for k, v in sorted(fingerprints.items())})


def first_divergence(a: dict[int, dict[str, str]], b: dict[int, dict[str, str]]):
    """Compares two runs' per-epoch variable fingerprints over the epochs both have.

    Returns (epochs compared, first differing epoch or None, sorted paths that differ there; a path present
    in only one run counts as differing).
    """
    common = sorted(set(a) & set(b))
    for epoch in common:
        if a[epoch] != b[epoch]:
            paths = set(a[epoch]) | set(b[epoch])
            return common, epoch, sorted(p for p in paths if a[epoch].get(p) != b[epoch].get(p))
    return common, None, []
