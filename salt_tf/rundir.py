"""The run directory as code: its names, the atomic writers, export discovery, flags.cfg, the data folder.

    <run_dir>/
      flags.cfg          FLAGS_FILE        effective flags (read_flagfile)
      split.csv          SPLIT_FILE        id, role (train/val), coverage_class
      record.json        RECORD_FILE       code, environment, data (its absolute "dir"), summary
      metrics.csv        METRICS_FILE      one row per finished epoch
      fingerprints.json  FINGERPRINTS_FILE per epoch, the SHA-256 of every variable
      skipped.csv        SKIPPED_FILE      with --nostrict: examples left out and why
      ensemble.json      ENSEMBLE_FILE     written by `predict evaluate`
      .lock              LOCK_FILE         flock-ed by the one training process writing the directory
      checkpoints/       CHECKPOINTS_DIR   step-N (TensorFlow's state file CHECKPOINT_STATE) and best/ (BEST_DIR)
      export/            EXPORT_DIR        an export: model.json (EXPORT_CONFIG) + weights.* (EXPORT_WEIGHTS)
      snapshots/         SNAPSHOTS_DIR     snapshot-K/ (snapshot_dir), each an export
      swa/               SWA_DIR           the weight average, an export
      swa-until-epoch-N/ retired_swa_dir   the weight average of a run since grown (more --epochs), an export
      events/            EVENTS_DIR        TensorBoard

Every writer here writes a temporary file next to its target (`<name>.tmp<pid>`), fsyncs it, renames it over
the target (os.replace, atomic on POSIX) and fsyncs the folder, so a reader or a crash sees the old file or
the new one, never half a file; a failed write removes its temporary file. A folder is replaced whole the
same way (staged_dir). What a killed writer leaves behind matches is_temporary, and the next holder of the
run directory's lock deletes it (records.remove_temporary_files).

This module imports nothing from salt_tf and no TensorFlow, so the data layer, runs and predict's cheap
checks can use it; cv2 is imported only by write_png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any, Callable, Iterator

FLAGS_FILE = "flags.cfg"
SPLIT_FILE = "split.csv"
RECORD_FILE = "record.json"
METRICS_FILE = "metrics.csv"
FINGERPRINTS_FILE = "fingerprints.json"
SKIPPED_FILE = "skipped.csv"
ENSEMBLE_FILE = "ensemble.json"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_STATE = "checkpoint"  # TensorFlow's list of a folder's checkpoints, inside checkpoints/
BEST_DIR = "best"                # inside checkpoints/
EXPORT_DIR = "export"
EXPORT_CONFIG = "model.json"
EXPORT_WEIGHTS = "weights"       # prefix of an export's weight files (weights.index, weights.data-*)
SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_PREFIX = "snapshot-"
SWA_DIR = "swa"
EVENTS_DIR = "events"
# The folders a run writes into itself: never a run directory of their own (runs list skips them).
RUN_FOLDERS = (CHECKPOINTS_DIR, EVENTS_DIR, EXPORT_DIR, SNAPSHOTS_DIR, SWA_DIR)


class RunDirError(ValueError):
    """A run directory or export folder that cannot be used as asked; the message is one line naming the
    path and the fix."""


# ---------------------------------------------------------------------------------------------- writers


def _temporary(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


# What an interrupted writer leaves: this module's "<name>.tmp<pid>" files and folders and "<name>.old<pid>"
# folders, TensorFlow's "<prefix>_temp/" checkpoint shards and its "checkpoint.tmp<hex>" state file.
_TEMPORARY_NAME = re.compile(r".+(\.tmp[0-9a-f]+|\.old[0-9]+|_temp)$")


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one a writer uses until its rename (left behind only by a crash).

    Args:
        name: a base name, not a path.
    """
    return _TEMPORARY_NAME.fullmatch(name) is not None


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str, data: bytes) -> None:
    """Replaces the file `path` with `data` atomically and durably (temp file, fsync, rename, fsync folder).

    Args:
        path: the target file; its folder must exist.
        data: the whole new content.

    Raises:
        OSError: the write failed (its filename the target's when the failing call named none); the old file
            (if any) is intact and no temporary file is left.
    """
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:  # a full disk's write() names no file: name the target
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise
    _fsync_dir(os.path.dirname(path))


def write_text(path: str, text: str) -> None:
    """write_bytes of `text` in UTF-8, newlines as given (no translation)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, payload: Any, *, default: Callable[[Any], Any] | None = None,
               final_newline: bool = True) -> None:
    """Writes `payload` as JSON, indented by 2 with sorted keys, atomically (write_bytes).

    Args:
        path: the target file.
        payload: anything json can encode (with `default`).
        default: json's fallback for other objects (e.g. str); None: such an object raises TypeError before
            anything is written.
        final_newline: end the file with a newline (an export's model.json has none).
    """
    text = json.dumps(payload, indent=2, sort_keys=True, default=default)
    write_text(path, text + "\n" if final_newline else text)


def read_json(path: str) -> Any:
    """The parsed JSON file `path` (OSError, ValueError as json and open raise them)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_csv(path: str, frame) -> None:
    """Writes a pandas DataFrame as CSV without its index (pandas' default formatting), atomically.

    Args:
        path: the target file.
        frame: a pandas.DataFrame; written exactly as `frame.to_csv(path, index=False)` would write it.
    """
    write_text(path, frame.to_csv(index=False))


def write_png(path: str, array) -> None:
    """Writes an image as PNG (cv2's encoder, default settings), atomically.

    Args:
        path: the target file.
        array: uint8 or uint16, [H, W] gray or [H, W, 3] BGR.

    Raises:
        ValueError: cv2 cannot encode the array (nothing written).
    """
    import cv2

    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"{path}: could not encode PNG")
    write_bytes(path, encoded.tobytes())


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


@contextlib.contextmanager
def staged_dir(final: str) -> Iterator[str]:
    """A folder to fill that then replaces folder `final` whole: readers see the old content or the new.

    Yields an empty `<final>.tmp<pid>` next to `final` (parents created). When the block ends normally, its
    files are fsynced and it takes `final`'s place: the old `final` is renamed to `<final>.old<pid>`, the
    staging folder to `final` (os.replace), then the old one is deleted. When the block raises, the staging
    folder is deleted and `final` is untouched.

    Args:
        final: the folder to replace (need not exist).
    """
    final = os.path.normpath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent or ".", exist_ok=True)
    staging = _temporary(final)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        _fsync_tree(staging)
        retired = f"{final}.old{os.getpid()}"
        if os.path.isdir(final):
            os.replace(final, retired)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(parent)
    shutil.rmtree(retired, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ exports


def is_export(path: str) -> bool:
    """Whether `path` is an export folder (holds model.json)."""
    return os.path.isfile(os.path.join(path, EXPORT_CONFIG))


def retired_swa_dir(run_dir: str, epoch: int) -> str:
    """<run_dir>/swa-until-epoch-<epoch>: where the weight average a run exported at `epoch` is kept once the
    run has grown past it (resumed with more --epochs); swa/ then holds the grown run's."""
    return os.path.join(run_dir, f"{SWA_DIR}-until-epoch-{epoch}")


def snapshot_dir(run_dir: str, index: int) -> str:
    """<run_dir>/snapshots/snapshot-<index>: where snapshot `index` of a snapshot ensemble is exported."""
    return os.path.join(run_dir, SNAPSHOTS_DIR, f"{SNAPSHOT_PREFIX}{index}")


def _snapshot_index(name: str) -> int | None:
    number = name[len(SNAPSHOT_PREFIX):]
    return int(number) if name.startswith(SNAPSHOT_PREFIX) and number.isdigit() else None


def snapshot_dirs(run_dir: str) -> list[str]:
    """The run's snapshots/snapshot-K folders that hold an export, in K order (none: an empty list)."""
    root = os.path.join(run_dir, SNAPSHOTS_DIR)
    indices = sorted(i for i in map(_snapshot_index, os.listdir(root) if os.path.isdir(root) else [])
                     if i is not None and is_export(snapshot_dir(run_dir, i)))
    return [snapshot_dir(run_dir, i) for i in indices]


def run_exports(run_dir: str) -> list[str]:
    """Every export folder of a run directory: export/, swa/, then each snapshot in K order (those that exist)."""
    return [d for d in (os.path.join(run_dir, EXPORT_DIR), os.path.join(run_dir, SWA_DIR)) if is_export(d)] + \
        snapshot_dirs(run_dir)


def export_dirs(path: str) -> list[str]:
    """The export folders `path` stands for, in order.

    Args:
        path: an export folder (export/, swa/, snapshots/snapshot-K or a copy): itself; or a run directory:
            its snapshots/snapshot-K exports in K order if it has any, else its export/.

    Returns:
        Paths of export folders (each holds model.json), joined onto `path`; at least one.

    Raises:
        RunDirError: `path` is missing, a file, or holds no export (one line naming it and the fix).
    """
    if not path or not os.path.exists(path):
        raise RunDirError(f"{path}: not found; pass a run directory or an export folder")
    if not os.path.isdir(path):
        raise RunDirError(f"{path}: is a file; pass a run directory or an export folder")
    if is_export(path):
        return [path]
    dirs = snapshot_dirs(path)
    if not dirs and is_export(os.path.join(path, EXPORT_DIR)):
        dirs = [os.path.join(path, EXPORT_DIR)]
    if not dirs:
        raise RunDirError(f"{path}: no exported model (no {EXPORT_CONFIG}, {EXPORT_DIR}/{EXPORT_CONFIG} or "
                          f"{SNAPSHOTS_DIR}/); train first, or point at a run directory or its {EXPORT_DIR}/ "
                          "folder")
    return dirs


def source_run_dir(export_dir: str) -> str:
    """The run directory an export folder belongs to.

    Args:
        export_dir: <run>/export, <run>/swa or <run>/snapshots/snapshot-K.

    Returns:
        <run>, absolute.
    """
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    return os.path.dirname(parent) if os.path.basename(parent) == SNAPSHOTS_DIR else parent


# ---------------------------------------------------------------------------------- flags.cfg, data folder


def parse_flagfile(text: str) -> dict[str, str]:
    """The flags of a flagfile's text, as absl would apply them.

    Args:
        text: flagfile lines (`--name=value`, `--flag`, `--noflag`; comments and blank lines ignored).

    Returns:
        {flag name: value as text}; booleans are "true"/"false"; the last setting of a flag wins.
    """
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
    """The parsed flags.cfg of a run directory (parse_flagfile); None if it has none."""
    path = os.path.join(run_dir, FLAGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return parse_flagfile(f.read())


def resolve_data_dir(flags: dict[str, str] | None, record: dict | None, run_dir: str) -> str:
    """The labelled data folder a run trained on, from its flags and record (the rule of data_dir).

    Args:
        flags: its parsed flags.cfg (None or {} if it has none).
        record: its parsed record.json (None or {} if it has none).
        run_dir: the run directory, for the error message.

    Returns:
        An absolute path; it may no longer exist.

    Raises:
        RunDirError: neither flags.cfg nor record.json names a data folder.
    """
    flag = (flags or {}).get("data_dir")
    recorded = ((record or {}).get("data") or {}).get("dir")
    if flag and os.path.isabs(flag):
        return os.path.normpath(flag)
    if recorded:  # a relative flag, resolved where the run started; or no flag at all
        return recorded
    if flag:  # a run that stopped before recording its data: as absl would read the flag from here
        return os.path.abspath(flag)
    raise RunDirError(f"{run_dir}: no data folder recorded (no --data_dir in {FLAGS_FILE}, no data.dir in "
                      f"{RECORD_FILE}); pass --data_dir=<labelled folder>")


def data_dir(run_dir: str, must_exist: bool = True) -> str:
    """The labelled data folder the run in `run_dir` trained on. One rule:

    1. an absolute --data_dir in flags.cfg: that folder (record.json records the same one);
    2. else record.json's data.dir: the absolute folder the run read, which is what a relative --data_dir
       meant where the run was started (resolving it from the current folder could find other data);
    3. else a relative --data_dir (a run that stopped before recording its data), from the current folder;
    4. else RunDirError: "<run_dir>: no data folder recorded ...; pass --data_dir=<labelled folder>".

    Args:
        run_dir: a run directory.
        must_exist: also raise RunDirError, naming the folder and the fix `--data_dir=`, when the folder is
            not there any more.

    Returns:
        An absolute path.
    """
    record_path = os.path.join(run_dir, RECORD_FILE)
    try:
        record = read_json(record_path) if os.path.isfile(record_path) else None
    except ValueError as e:
        raise RunDirError(f"{record_path}: not valid JSON ({e})") from None
    folder = resolve_data_dir(read_flagfile(run_dir), record, run_dir)
    if must_exist and not os.path.isdir(folder):
        raise RunDirError(f"{run_dir}: the run's data folder {folder} is not found; pass "
                          "--data_dir=<labelled folder>")
    return folder


# ------------------------------------------------------------------------------- cross-validation parents
# A CV parent (python -m salt_tf.cv) holds one run directory per fold and what `cv collect` writes:
#
#   <parent>/fold-<k>/   FOLD_PREFIX       fold k's run directory (train --folds=K --fold=k)
#   <parent>/oof.npz     OOF_FILE          the out-of-fold probabilities, truth and per-image scores
#   <parent>/oof.json    OOF_SUMMARY       the OOF scores (the printed table), the fold models they are of
#   <parent>/ensemble.json ENSEMBLE_FILE   written by `predict evaluate` on the parent (from oof.npz)

FOLD_PREFIX = "fold-"
OOF_FILE = "oof.npz"
OOF_SUMMARY = "oof.json"

# A pipeline's folder (python -m salt_tf.competition --parent=P): its stages' folders (round1/, pseudo/, round2/:
# CV parents and pseudo-label folders), the status of every stage, and each stage's output.
#   <P>/pipeline.json    PIPELINE_FILE     the plan: each stage's command, status, attempts, seconds, FLOP budget
#   <P>/logs/<stage>.log PIPELINE_LOGS     what each stage printed, appended at every attempt
PIPELINE_FILE = "pipeline.json"
PIPELINE_LOGS = "logs"


def fold_dir(parent: str, fold: int) -> str:
    """<parent>/fold-<fold>: where `cv train` trains fold `fold`."""
    return os.path.join(parent, f"{FOLD_PREFIX}{fold}")


def fold_dirs(parent: str) -> dict[int, str]:
    """{k: <parent>/fold-k} of the fold folders present (any content), in k order; {} for anything else."""
    if not os.path.isdir(parent):
        return {}
    numbers = sorted(int(name[len(FOLD_PREFIX):]) for name in os.listdir(parent)
                     if name.startswith(FOLD_PREFIX) and name[len(FOLD_PREFIX):].isdigit()
                     and os.path.isdir(os.path.join(parent, name)))
    return {k: fold_dir(parent, k) for k in numbers}


def is_cv_parent(path: str) -> bool:
    """Whether `path` is a CV parent: not a run or export itself, with a fold-<k>/ run directory inside."""
    return not is_export(path) and not os.path.isfile(os.path.join(path, FLAGS_FILE)) and any(
        os.path.isfile(os.path.join(d, FLAGS_FILE)) for d in fold_dirs(path).values())


def finished(record: dict) -> bool:
    """Whether a run's record.json says its last session finished (train writes "started" at every start and
    "finished" at the end; timestamps of one format compare as text)."""
    started, ended = record.get("started"), record.get("finished")
    return bool(started and ended and ended >= started)


def fold_record(run_dir: str) -> dict:
    """The record.json of a fold run; RunDirError when its training has not started."""
    path = os.path.join(run_dir, RECORD_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir}: no {RECORD_FILE}; its training has not started; train it first")
    return read_json(path)


def fold_runs(parent: str) -> dict[int, str]:
    """{k: run directory} of the K folds of a CV parent, each a finished fold run of the same K-fold.

    Args:
        parent: the CV parent (`cv train --parent`, `predict --model_dir`).

    Returns:
        {k: <parent>/fold-k} for k = 0..K-1.

    Raises:
        RunDirError: no fold run, a fold missing or unfinished, or folds of different K (one line with the fix).
    """
    runs = fold_dirs(parent)
    if not runs:
        raise RunDirError(f"{parent}: no {FOLD_PREFIX}k run directories; train them with python -m salt_tf.cv "
                          f"train, or python -m salt_tf.train --folds=K --fold=k "
                          f"--model_dir={os.path.join(parent, FOLD_PREFIX)}k")
    records = {k: fold_record(d) for k, d in runs.items()}
    counts = {k: (r.get("split") or {}).get("folds") for k, r in records.items()}
    for k, count in counts.items():
        if not count:
            raise RunDirError(f"{runs[k]}: not a fold run (record.json has no --folds); train it with --folds=K "
                              f"--fold={k}")
    # What finishes a cross-validation: the folds' training, then collect (the out-of-fold files).
    then_collect = f"then python -m salt_tf.cv collect --parent={parent}"
    folds = counts[min(counts)]
    if set(counts.values()) != {folds} or set(runs) != set(range(folds)):
        missing = sorted(set(range(folds)) - set(runs))
        raise RunDirError(f"{parent}: fold runs of {sorted(set(counts.values()))} folds in all, folds present "
                          f"{sorted(runs)}{f', missing fold-{missing[0]}' if missing else ''}; train fold 0..K-1 "
                          f"of one --folds=K, {then_collect}")
    for k, record in records.items():
        if not finished(record):
            raise RunDirError(f"{runs[k]}: its training has not finished; finish it (rerun python -m salt_tf.cv "
                              f"train, or the fold's train command), {then_collect}")
    return runs
