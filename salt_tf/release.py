"""A released model: the files a user needs to predict with a trained model and to check it, nothing else.

    python -m salt_tf.runs release RUN --model=swa --into=models/NAME [--max_mb=25] [--replace]

    models/NAME/
      export/          the released model: a byte-for-byte copy of the run's --model folder (model.json, weights.*)
      ensemble.json    the choice `predict evaluate` made for exactly that model (threshold, TTA, post-processing,
                       image-head gate), when the run has one; its model is renamed "export"
      flags.cfg  record.json  split.csv  metrics.csv
                       the run's own: how it was trained, with which code, on which data and which validation
                       images, and its curves
      MODEL_CARD.md    what the model is, its validation scores, how to use, verify and reproduce it
      SHA256SUMS       the SHA-256 of every other file; `sha256sum -c SHA256SUMS` in the folder checks them

The folder reads as a run directory whose one model is export/, so `predict submit`, `predict evaluate` (on the
run's validation images, through split.csv and record.json) and `python -m salt_tf.serving` take it as
--model_dir unchanged. Checkpoints, TensorBoard events and the other exports stay in the run: a release is for
using the model, the run for studying it. The release is written whole or not at all (rundir.staged_dir), and
every check (finished run, the model, the size limit, the target) happens before anything is written.

This module reads run directories only (no TensorFlow); the command line is salt_tf.runs'.
"""

from __future__ import annotations

import hashlib
import os
import shutil

from salt_tf import ensemble, rundir

RUN_FILES = (rundir.FLAGS_FILE, rundir.RECORD_FILE, rundir.SPLIT_FILE, rundir.METRICS_FILE)
CARD_FILE = "MODEL_CARD.md"
CHECKSUMS_FILE = "SHA256SUMS"
SNAPSHOTS = rundir.SNAPSHOTS_DIR  # --model=snapshots: every snapshot, kept as snapshots/snapshot-K
DEFAULT_MAX_MB = 25.0  # what a git repository carries comfortably (GitHub warns from 50 MB a file)


class ReleaseError(ValueError):
    """A release that cannot be made as asked; the message is one line naming the path and the fix."""


def sha256_of_file(path: str) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def released_models(run_dir: str, model: str) -> dict[str, str]:
    """{folder in the release: export folder of the run} for --model.

    Args:
        run_dir: the run directory.
        model: an export folder relative to it ("export", "swa", "snapshots/snapshot-2"): released as export/;
            or "snapshots": every snapshot, released under its own name (the run's snapshot ensemble).

    Raises:
        ReleaseError: no such export in the run (one line listing the ones it has).
    """
    if model == SNAPSHOTS:
        found = {os.path.relpath(d, run_dir): d for d in rundir.snapshot_dirs(run_dir)}
    else:
        path = os.path.join(run_dir, model)
        found = {rundir.EXPORT_DIR: path} if rundir.is_export(path) else {}
    if not found:
        have = [os.path.relpath(d, run_dir) for d in rundir.run_exports(run_dir)]
        raise ReleaseError(f"{os.path.join(run_dir, model)}: no exported model there; --model is one of "
                           f"{', '.join(have + ([SNAPSHOTS] if any(h.startswith(SNAPSHOTS) for h in have) else []))}"
                           if have else f"{run_dir}: no exported model; train the run to its end first")
    return found


def carried_choice(run_dir: str, model: str, released: dict[str, str], configs: dict[str, dict]) -> dict | None:
    """The ensemble.json the release carries: the run's choice fitted on exactly the released models (names and
    epochs, in order), its model names changed to their names in the release; None when the run has none.
    `configs` holds each released model's model.json (by its name in the release), read once by `release`.

    `predict evaluate --model_dir=RUN/swa` writes RUN/swa/ensemble.json, its one model named "swa"; evaluate on
    the run directory writes RUN/ensemble.json, its models "export" or "snapshots/snapshot-K". The weights are
    copied byte for byte, so a choice fitted on them holds for the copy under its new name.
    """
    wanted = [(os.path.relpath(source, run_dir), configs[name].get("epoch")) for name, source in released.items()]
    candidates = [(os.path.join(run_dir, rundir.ENSEMBLE_FILE), lambda name: name)]
    if model != SNAPSHOTS:  # an export folder's own choice names its one model by the folder's base name
        candidates.insert(0, (os.path.join(run_dir, model, rundir.ENSEMBLE_FILE),
                              lambda name: model if name == os.path.basename(os.path.normpath(model)) else None))
    for path, as_run_name in candidates:
        if not os.path.isfile(path):
            continue
        choice = rundir.read_json(path)
        fitted = [(as_run_name(m.get("name")), m.get("epoch")) for m in choice.get("models", [])]
        if fitted == wanted:
            for entry, name in zip(choice["models"], released):
                entry["name"] = name
            return choice
    return None


def _check_run(run_dir: str) -> dict:
    """The run's record.json, after checking that `run_dir` is a finished run with the files a release copies."""
    if not os.path.isdir(run_dir):
        raise ReleaseError(f"{run_dir}: not found; pass a run directory")
    if rundir.is_cv_parent(run_dir):
        raise ReleaseError(f"{run_dir}: a cross-validation parent; a release holds the models of one run: release "
                           f"one fold's run ({os.path.join(run_dir, rundir.FOLD_PREFIX)}k)")
    missing = [name for name in RUN_FILES if not os.path.isfile(os.path.join(run_dir, name))]
    if missing:
        raise ReleaseError(f"{run_dir}: not a run directory with a finished epoch (no {', '.join(missing)}); pass "
                           "the --model_dir of a training run")
    record = rundir.read_json(os.path.join(run_dir, rundir.RECORD_FILE))
    if not rundir.finished(record):
        raise ReleaseError(f"{run_dir}: its training has not finished ({rundir.RECORD_FILE} has no end after its "
                           "last start); run the same train command to its end, then release")
    return record


def _check_target(into: str, run_dir: str, replace: bool) -> None:
    """Refuses a target that would overwrite anything but an older release (and that only with --replace)."""
    inside = os.path.commonpath([os.path.abspath(into), os.path.abspath(run_dir)]) == os.path.abspath(run_dir)
    if inside:
        raise ReleaseError(f"--into={into}: inside the run {run_dir}; release into a folder of its own, e.g. "
                           "models/<name>")
    if not os.path.exists(into) or (os.path.isdir(into) and not os.listdir(into)):
        return
    if not os.path.isfile(os.path.join(into, CHECKSUMS_FILE)):
        raise ReleaseError(f"--into={into}: exists and is not a release (no {CHECKSUMS_FILE}); choose another "
                           "folder")
    if not replace:
        raise ReleaseError(f"--into={into}: holds a release already; pass --replace to replace it with this one")
    foreign = _not_released(into)
    if foreign:
        raise ReleaseError(f"--into={into}: {', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not as "
                           f"released (added or changed since, e.g. by predict evaluate); move "
                           f"{'it' if len(foreign) == 1 else 'them'} out of the folder before --replace")


def _not_released(release_dir: str) -> list[str]:
    """The files of a release folder that its SHA256SUMS does not list with their present content."""
    listed = read_checksums(release_dir)
    found = []
    for root, _, files in os.walk(release_dir):
        for name in files:
            path = os.path.relpath(os.path.join(root, name), release_dir)
            if path != CHECKSUMS_FILE and listed.get(path) != sha256_of_file(os.path.join(root, name)):
                found.append(path)
    return sorted(found)


def _files_to_copy(run_dir: str, released: dict[str, str]) -> dict[str, str]:
    """{path in the release: source file}: each model's model.json and weights.*, then the run's files."""
    files = {}
    for name, source in released.items():
        for entry in sorted(os.listdir(source)):
            if entry == rundir.EXPORT_CONFIG or entry.startswith(rundir.EXPORT_WEIGHTS + "."):
                files[os.path.join(name, entry)] = os.path.join(source, entry)
    files.update({name: os.path.join(run_dir, name) for name in RUN_FILES})
    return files


def release(run_dir: str, model: str, into: str, max_mb: float = DEFAULT_MAX_MB, replace: bool = False) -> dict:
    """Copies a finished run's model and record into a release folder, with its model card and SHA-256 sums.

    Args:
        run_dir: the run directory.
        model: which model (released_models): an export folder of the run, or "snapshots".
        into: the release folder; must not exist, be empty, or (with `replace`) hold a release.
        max_mb: the largest release allowed, in MB (10^6 bytes), checked before anything is written.
        replace: replace the release at `into` (whole: readers see the old release or the new one).

    Returns:
        {"into", "models" (name in the release -> run's folder), "bytes", "sha256" (path -> hex),
        "choice" (whether ensemble.json was carried over)}.

    Raises:
        ReleaseError: an unfinished run, no such model, a release over max_mb, a target that is not an older
            release, or a file that changed while it was copied (one line; nothing written).
    """
    model = os.path.normpath(model)
    record = _check_run(run_dir)
    released = released_models(run_dir, model)
    _check_target(into, run_dir, replace)
    files = _files_to_copy(run_dir, released)
    total = sum(os.path.getsize(source) for source in files.values())
    if total > max_mb * 1e6:
        raise ReleaseError(f"{os.path.join(run_dir, model)}: the release would be {total / 1e6:.1f} MB, more than "
                           f"--max_mb={max_mb:g}; release one model (--model=swa, export or snapshots/snapshot-K) "
                           "or raise --max_mb")
    configs = {name: rundir.read_json(os.path.join(source, rundir.EXPORT_CONFIG)) for name, source in released.items()}
    choice = carried_choice(run_dir, model, released, configs)
    sources = {path: sha256_of_file(source) for path, source in files.items()}
    with rundir.staged_dir(into) as stage:
        for path, source in files.items():
            os.makedirs(os.path.dirname(os.path.join(stage, path)), exist_ok=True)
            shutil.copyfile(source, os.path.join(stage, path))
        if choice is not None:
            rundir.write_json(os.path.join(stage, rundir.ENSEMBLE_FILE), choice)
        sums = {path: sha256_of_file(os.path.join(stage, path)) for path in files}
        changed = [path for path in files if sums[path] != sources[path]]
        if changed:
            raise ReleaseError(f"{run_dir}: {', '.join(changed)} changed while being copied; is the run still "
                               "being written? Release it when nothing writes to it")
        card = model_card(os.path.basename(os.path.normpath(into)), run_dir, released, configs, record, choice,
                          sums, into)
        rundir.write_text(os.path.join(stage, CARD_FILE), card)
        for extra in ([rundir.ENSEMBLE_FILE] if choice is not None else []) + [CARD_FILE]:
            sums[extra] = sha256_of_file(os.path.join(stage, extra))
        rundir.write_text(os.path.join(stage, CHECKSUMS_FILE),
                          "".join(f"{sums[path]}  {path}\n" for path in sorted(sums)))
    size = sum(os.path.getsize(os.path.join(into, path)) for path in sums)
    return {"into": into, "models": {name: os.path.relpath(src, run_dir) for name, src in released.items()},
            "bytes": size, "sha256": sums, "choice": choice is not None}


def release_of(export_dir: str) -> str | None:
    """The release folder an export folder belongs to (export/ or snapshots/snapshot-K of a folder with
    SHA256SUMS), or None when it is not part of a release (a run's export)."""
    root = rundir.source_run_dir(export_dir)
    return root if os.path.isfile(os.path.join(root, CHECKSUMS_FILE)) else None


def check_model_files(export_dir: str) -> None:
    """Checks a released model's files against its release's SHA256SUMS before they are used; nothing to
    check for a model that is not part of a release.

    Raises:
        ReleaseError: a model file missing from SHA256SUMS or with other bytes than it lists (one line naming
            the file and the fix).
    """
    root = release_of(export_dir)
    if root is None:
        return
    listed = read_checksums(root)
    for name in sorted(os.listdir(export_dir)):
        if name != rundir.EXPORT_CONFIG and not name.startswith(rundir.EXPORT_WEIGHTS + "."):
            continue
        path = os.path.relpath(os.path.join(export_dir, name), root)
        if listed.get(path) != sha256_of_file(os.path.join(export_dir, name)):
            why = "is not listed in" if path not in listed else "does not have the SHA-256 listed in"
            raise ReleaseError(f"{os.path.join(export_dir, name)}: {why} {os.path.join(root, CHECKSUMS_FILE)}; "
                               "the copy is damaged or was changed: fetch the release again")


def read_checksums(release_dir: str) -> dict[str, str]:
    """{path: hex SHA-256} of a release's SHA256SUMS (the `sha256sum` format: hash, two spaces, path)."""
    with open(os.path.join(release_dir, CHECKSUMS_FILE), encoding="utf-8") as f:
        return {path: digest for digest, path in (line.rstrip("\n").split("  ", 1) for line in f if line.strip())}


# ------------------------------------------------------------------------------------------------ model card


def _architecture(config: dict) -> str:
    """The model of a model.json's "model" in words."""
    se = {"scse": "channel + spatial squeeze-and-excitation (scSE)", "channel": "squeeze-and-excitation"}
    parts = [f"residual U-Net, width {config.get('base_width')}, depth {config.get('depth')}, "
             f"{config.get('blocks_per_level')} blocks per level"]
    if config.get("se"):
        parts.append(se.get(config.get("se_type", "channel"), "squeeze-and-excitation") +
                     f" (ratio {config.get('se_ratio')})")
    if config.get("hypercolumn"):
        parts.append("hypercolumn")
    if config.get("deep_supervision"):
        parts.append("deep supervision with an image-level salt head")
    size = config.get("input_size")
    parts.append(f"input padded to {size}x{size} ({config.get('pad_mode')})" if size and size != 101
                 else "native 101x101 input")
    return ", ".join(parts)


def _scores_lines(choice: dict | None, into: str) -> list[str]:
    """The validation section of the card: what ensemble.json chose and its scores."""
    if choice is None:
        return ["Not evaluated in the release: `python -m salt_tf.predict evaluate "
                f"--model_dir={into}` chooses the threshold, TTA and post-processing on the run's validation "
                "images (the `val` rows of split.csv) and writes ensemble.json; `predict submit` then applies it."]
    pp, scores = choice.get("postprocessing") or {}, choice.get("scores") or {}
    score = ensemble.format_score

    rules = [f"threshold {pp.get('threshold')}"]
    if pp.get("min_component"):
        rules.append(f"components under {pp['min_component']} px removed")
    if pp.get("min_salt"):
        rules.append(f"masks under {pp['min_salt']} px emptied")
    if pp.get("min_has_salt"):
        rules.append(f"empty when the image head's salt probability < {pp['min_has_salt']}")
    lines = [f"Chosen by `predict evaluate` on the {scores.get('images')} validation images of split.csv "
             f"(ensemble.json): TTA {'+'.join(choice.get('tta', []))}, {choice.get('combine')} of "
             f"{len(choice.get('models', []))} model(s), {', '.join(rules)}.", "",
             "| score (competition metric: mean precision over IoU 0.50-0.95) | value |", "|---|---|",
             f"| {scores.get('folds')}-fold cross-validated over the images, thresholds and rules chosen on the "
             f"other folds (the honest figure) | **{score(scores.get('cv_chosen', scores.get('cv_mean_postprocessed')))}** |",
             f"| the same, threshold only | {score(scores.get('cv_mean'))} |",
             f"| with the choice fitted on all of them (optimistic) | {score((pp.get('scores') or {}).get('final'))} |"]
    return lines


def model_card(name: str, run_dir: str, released: dict[str, str], configs: dict[str, dict], record: dict,
               choice: dict | None, sums: dict[str, str], into: str) -> str:
    """MODEL_CARD.md of a release: the model, its training and data, validation scores, use, checks, origin.
    `configs` holds each released model's model.json by its name in the release."""
    config = next(iter(configs.values()))
    code, data = record.get("code") or {}, record.get("data") or {}
    summary, env = record.get("summary") or {}, record.get("environment") or {}
    weights = [(path, digest) for path, digest in sorted(sums.items()) if os.path.basename(path).startswith(
        rundir.EXPORT_WEIGHTS + ".data")]
    models = "; ".join(f"`{n}` = the run's `{os.path.relpath(s, run_dir)}` (epoch {configs[n].get('epoch')}, "
                       f"validation metric {ensemble.format_score(configs[n].get('val_metric'))})"
                       for n, s in released.items())
    dirty = " with uncommitted changes (record.json holds the diff)" if code.get("dirty") else ""
    lines = [
        f"# {name}", "",
        "A salt_tf model for the TGS Salt Identification task: a salt mask for each 101x101 "
        "grayscale seismic image. Released from a finished run by `python -m salt_tf.runs release`; this card is "
        "written from the run's record.", "",
        "| | |", "|---|---|",
        f"| model | {_architecture(config['model'])}; {config.get('precision', 'float32')} |",
        f"| released | {models} |",
        f"| training | {summary.get('epochs_completed')} epochs on {data.get('train_images')} images, the flags in "
        f"flags.cfg; code {str(code.get('commit'))[:12]}{dirty}; TensorFlow {env.get('tensorflow')}; "
        f"deterministic: {bool((record.get('determinism') or {}).get('deterministic'))} |",
        f"| data | fingerprint {str(data.get('fingerprint'))[:16]}... of the labelled folder; "
        f"{data.get('val_images')} validation images (the `val` rows of split.csv) never trained on |",
        *[f"| SHA-256 of `{path}` | `{digest}` |" for path, digest in weights],
        "", "## Validation", "", *_scores_lines(choice, into), "",
        "## Use", "",
        "    python -m salt_tf.predict submit --model_dir=" + into + " --images=<folder of 101x101 PNGs> "
        "--output=submission.csv",
        "    python -m salt_tf.serving --model_dir=" + into + " --output=<folder>/1    # a SavedModel for serving",
        "", "## Check", "",
        f"    (cd {into} && sha256sum -c {CHECKSUMS_FILE})", "",
        "## Reproduce", "",
        f"With the code at commit {code.get('commit')} and the same labelled data (the fingerprint above):", "",
        f"    python -m salt_tf.train --flagfile={into}/{rundir.FLAGS_FILE} --model_dir=<new run>", "",
        "then `python -m salt_tf.runs diff <new run> <the original run>` compares them; on the same machine type "
        "the weights come out bit-identical (docs/usage.md, Reproducibility).", ""]
    return "\n".join(lines)
