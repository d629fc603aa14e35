"""The run record: what the training process writes and reads about its run, besides checkpoints and events.

    record.json        update_record: code version (code_version), environment, determinism applied, data
                       fingerprint, final summary
    metrics.csv        read_metrics / write_metrics: one row per finished epoch
    fingerprints.json  read_fingerprints / write_fingerprints: per epoch, the SHA-256 of every variable (what
                       tools/compare_runs.py reads; first_divergence compares two runs)
    .lock              RunDirLock: held (flock) by the one process writing the directory; holds its pid

The names of these files, the atomic writers and flags.cfg's reader live in salt_tf.rundir. A crash leaves
the old file or the new one, never half a file that would break a resume; the temporary names it leaves
behind are removed by the next process that takes the lock (remove_temporary_files).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from typing import Any

import pandas as pd

from salt_tf import rundir


class RunDirBusy(Exception):
    """Another live process holds the run directory's lock; the message is one line naming it."""


class RunDirLock:
    """The one-writer lock of a run directory: an exclusive flock on <directory>/.lock, taken when the object
    is created (creating the directory if needed) and held until release() or the end of the process. The
    kernel drops a flock when its holder dies, however it dies, so a lock left by a dead process never
    blocks; the pid written into the file only names the holder in the error message."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, rundir.LOCK_FILE)
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


def remove_temporary_files(run_dir: str) -> list[str]:
    """Deletes the temporary files and folders a dead writer left in the run directory (events/ excluded);
    returns their paths. Only for the holder of the directory's lock: another writer's are live."""
    removed = []
    for root, folders, files in os.walk(run_dir):
        if root == run_dir and rundir.EVENTS_DIR in folders:
            folders.remove(rundir.EVENTS_DIR)
        for name in [f for f in folders if rundir.is_temporary(f)]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            folders.remove(name)
            removed.append(os.path.join(root, name))
        for name in [f for f in files if rundir.is_temporary(f)]:
            os.remove(os.path.join(root, name))
            removed.append(os.path.join(root, name))
    return removed


class DamagedRunFile(ValueError):
    """record.json or fingerprints.json of a run does not read back (cut short, edited); one line."""


def check_run_files(run_dir: str) -> dict:
    """Before a resume writes anything: record.json and fingerprints.json, where present, are whole JSON objects
    (a resume rewrites both, so a damaged one would be half replaced, or crash the run midway).

    Returns:
        The record ({} when the run has none).

    Raises:
        DamagedRunFile: one line naming the file and the fix.
    """
    record = {}
    for name, fix in ((rundir.RECORD_FILE, "restore it from a copy of the run, or start a new run from its "
                                           f"weights (--init_checkpoint={run_dir} and a new --model_dir)"),
                      (rundir.FINGERPRINTS_FILE, "restore it from a copy of the run, or delete it to resume "
                                                 "without the fingerprints of the epochs trained so far")):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            content = rundir.read_json(path)
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedRunFile(f"{path} is damaged (not readable JSON: {str(e).splitlines()[0]}), so the run "
                                 f"cannot resume and nothing was written; {fix}") from None
        if not isinstance(content, dict):
            raise DamagedRunFile(f"{path} is damaged (not a JSON object), so the run cannot resume and nothing "
                                 f"was written; {fix}")
        record = content if name == rundir.RECORD_FILE else record
    return record


def update_record(run_dir: str, **fields: Any) -> dict:
    """Merges fields into record.json (created if absent) and returns the whole record."""
    path = os.path.join(run_dir, rundir.RECORD_FILE)
    record = rundir.read_json(path) if os.path.isfile(path) else {}
    record.update(fields)
    rundir.write_json(path, record, default=str)
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
    path = os.path.join(run_dir, rundir.METRICS_FILE)
    return pd.read_csv(path) if os.path.isfile(path) else pd.DataFrame()


def write_metrics(run_dir: str, rows: list[dict]) -> None:
    rundir.write_csv(os.path.join(run_dir, rundir.METRICS_FILE), pd.DataFrame(rows))


def read_fingerprints(run_dir: str) -> dict[int, dict[str, str]]:
    """{epoch: {variable path: sha256}} of a run (empty if it has none)."""
    path = os.path.join(run_dir, rundir.FINGERPRINTS_FILE)
    if not os.path.isfile(path):
        return {}
    return {int(epoch): value for epoch, value in rundir.read_json(path).items()}


def write_fingerprints(run_dir: str, fingerprints: dict[int, dict[str, str]]) -> None:
    rundir.write_json(os.path.join(run_dir, rundir.FINGERPRINTS_FILE),
                      {str(k): v for k, v in sorted(fingerprints.items())}, default=str)


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
