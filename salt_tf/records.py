"""The run record: every file of the run directory that is not a checkpoint or an event file.

    flags.cfg     effective flags; passing it back with --flagfile reproduces (or resumes) the run
    split.csv     id, role (train/val), coverage_class
    record.json   code version, environment, determinism applied, data fingerprint, final summary
    metrics.csv   one row per finished epoch
    fingerprints.json   per epoch, the SHA-256 of every variable (what tools/compare_runs.py reads)
    .lock         held (flock) by the one process writing the directory; holds its pid

Every write is atomic (temp file in the same folder + rename): a crash leaves the old file or the new one,
never half a file that would break a resume; the temporary names it leaves behind are removed by the next
process that takes the lock (remove_temporary_files).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from typing import Any

import pandas as pd

FLAGS_FILE = "flags.cfg"
SPLIT_FILE = "split.csv"
RECORD_FILE = "record.json"
METRICS_FILE = "metrics.csv"
FINGERPRINTS_FILE = "fingerprints.json"
LOCK_FILE = ".lock"


class RunDirBusy(Exception):
    """Another live process holds the run directory's lock; the message is one line naming it."""


class RunDirLock:
    """The one-writer lock of a run directory: an exclusive flock on <directory>/.lock, taken when the object
    is created (creating the directory if needed) and held until release() or the end of the process. The
    kernel drops a flock when its holder dies, however it dies, so a lock left by a dead process never
    blocks; the pid written into the file only names the holder in the error message."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, LOCK_FILE)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"{directory} is in use by another training process (pid {holder}); wait for it "
                             "to finish or stop it, or give this run another --model_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Unlocks (idempotent). The file stays: deleting it could let two processes lock different files."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


# What an interrupted writer leaves: this module's and export_to's "<name>.tmp<pid>" and "<name>.old<pid>",
# TensorFlow's "<prefix>_temp/" checkpoint shards and its "checkpoint.tmp<hex>" state file.
_TEMPORARY_NAME = re.compile(r".+(\.tmp[0-9a-f]+|\.old[0-9]+|_temp)$")


def remove_temporary_files(run_dir: str) -> list[str]:
    """Deletes the temporary files and folders a dead writer left in the run directory (events/ excluded);
    returns their paths. Only for the holder of the directory's lock: another writer's are live."""
    removed = []
    for root, folders, files in os.walk(run_dir):
        if root == run_dir and "events" in folders:
            folders.remove("events")
        for name in [f for f in folders if _TEMPORARY_NAME.fullmatch(f)]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            folders.remove(name)
            removed.append(os.path.join(root, name))
        for name in [f for f in files if _TEMPORARY_NAME.fullmatch(f)]:
            os.remove(os.path.join(root, name))
            removed.append(os.path.join(root, name))
    return removed


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_flagfile(text: str) -> dict[str, str]:
    """{flag name: value as text} of a flagfile; booleans become "true"/"false", the last setting wins. The one
    reader of flags.cfg (runs, predict and the resume check of train use it)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("--"):
            continue  # comments and blank lines
        body = line[2:]
        if "=" in body:
            name, value = body.split("=", 1)
        elif body.startswith("no"):
            # absl's spelling of a false boolean. (A boolean whose own name began with "no" would be
            # misread here; the flagfile alone cannot tell, and salt_tf defines none.)
            name, value = body[2:], "false"
        else:
            name, value = body, "true"
        values[name] = value
    return values


def read_flagfile(run_dir: str) -> dict[str, str] | None:
    """The parsed flags.cfg of a run directory; None if it has none."""
    path = os.path.join(run_dir, FLAGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return parse_flagfile(f.read())


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
