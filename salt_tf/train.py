"""Entry point: `python -m salt_tf.train --flagfile=flags/<name>.cfg [--flag=value ...]`.

Flags -> determinism -> strategy -> data and split -> configs (salt_tf.configs) -> model, loss, optimizer ->
TrainStep (salt_tf/step.py) -> the loop over the run directory (loop.run_dir_trainer) -> run record. The logic
lives in the modules it calls; this file only wires them together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time

from salt_tf.stop_signals import StopSignals

# The command's stop request, installed before anything slow (TensorFlow's import) so that no SIGINT or SIGTERM
# of the process is handled by anyone else (salt_tf.stop_signals says why). None when imported as a library.
_PROCESS_STOP_SIGNALS: StopSignals | None = None

if __name__ == "__main__":  # the command: start TensorFlow (imported by the flags) without CUDA noise on a CPU
    _PROCESS_STOP_SIGNALS = StopSignals()
    _PROCESS_STOP_SIGNALS.install()
    from salt_tf import tfstart

    tfstart.import_tensorflow()

from absl import app, flags, logging

from salt_tf import flags as salt_flags

FLAGS = flags.FLAGS


def prepare_run_dir(run_dir: str) -> None:
    """Creates the run directory and writes the effective flagfile: the values this run uses (a resume may have
    changed only what check_resume_flags allows). record.json's "flags" gets the same values first, so a later
    hand edit of flags.cfg, which a resume could not apply, is seen (check_flags_cfg_edits)."""
    from salt_tf import records, rundir

    os.makedirs(run_dir, exist_ok=True)
    text = salt_flags.flagfile_text()
    records.update_record(run_dir, flags=rundir.parse_flagfile(text))
    rundir.write_text(os.path.join(run_dir, rundir.FLAGS_FILE), text)


def holds_run(run_dir: str) -> bool:
    """Whether run_dir holds a run a rerun resumes: a checkpoint, or results of finished epochs."""
    from salt_tf import checkpoints, rundir

    return os.path.isfile(os.path.join(run_dir, rundir.CHECKPOINTS_DIR, rundir.CHECKPOINT_STATE)) or \
        checkpoints.has_history(run_dir)


def model_shape_flags() -> set[str]:
    """The flags that decide the model's variables (what --init_checkpoint requires to match)."""
    from salt_tf import checkpoints, model as model_lib

    names = {field.name for field in dataclasses.fields(model_lib.ModelConfig)}
    return names - set(checkpoints._SHAPE_FREE_SETTINGS) - {"input_channels"} | {"use_depth"}


def check_resume_flags(run_dir: str) -> dict | None:
    """Before anything is read or written: when run_dir holds a run, the flags given must be those of its
    flags.cfg, up to the changes a resume may make (salt_tf.flags.RESUME_MAY_CHANGE, more --epochs). Returns
    those changes, {name: [recorded, given]}, or None when run_dir holds no run (a fresh start); raises
    ResumeError with one line naming every other difference and the two ways forward."""
    from salt_tf import checkpoints, records, rundir

    recorded = rundir.read_flagfile(run_dir) if holds_run(run_dir) else None
    if recorded is None:
        check_new_run_dir(run_dir)
        return None
    try:
        record = records.check_run_files(run_dir)
    except records.DamagedRunFile as e:
        raise checkpoints.ResumeError(str(e)) from None
    check_flags_cfg_edits(run_dir, recorded, record.get("flags"))
    allowed, refused = salt_flags.resume_changes(recorded)
    if not refused:
        return allowed
    flagfile = os.path.join(run_dir, rundir.FLAGS_FILE)
    if not same_folder(recorded.get("model_dir"), run_dir):  # a copied or moved run: its flags.cfg names the old
        flagfile += f" --model_dir={run_dir}"
    changed = {line.split(":")[0] for line in refused}
    model_changed = sorted(model_shape_flags() & changed)
    if changed & {"fold", "folds"}:
        other = (f"each fold is a run of its own: give fold {FLAGS.fold} its own --model_dir (python -m salt_tf.cv "
                 "trains fold k into <parent>/fold-k)")
    elif model_changed:
        other = (f"to train the other model ({', '.join('--' + n for n in model_changed)}), give a new "
                 "--model_dir (--init_checkpoint needs the same model)")
    else:
        other = (f"to continue from its best weights with the new settings, start a new run with "
                 f"--init_checkpoint={run_dir} and a new --model_dir")
    raise checkpoints.ResumeError(
        f"--model_dir={run_dir} holds a run made with other flags ({'; '.join(refused)}); nothing was "
        f"written. To resume it, rerun with its recorded flags: --flagfile={flagfile}; {other}")


def check_new_run_dir(run_dir: str) -> None:
    """A new run's --model_dir must not be a folder of something else it would write into: an exported model
    (model.json), or the data folder (or a folder inside it).

    Raises:
        checkpoints.ResumeError: one line naming the folder and the fix.
    """
    from salt_tf import checkpoints, rundir
    from salt_tf.data import kaggle

    if not os.path.isdir(run_dir):
        return
    if rundir.is_export(run_dir):
        raise checkpoints.ResumeError(
            f"--model_dir={run_dir} is an exported model ({rundir.EXPORT_CONFIG}), not a run directory: a run "
            f"written into it would mix with that model's files; give a new --model_dir (--init_checkpoint={run_dir} "
            "starts from its weights)")
    # The data folder itself or its image folders (a run folder next to the data, inside its parent, is fine).
    folders = [os.path.join(FLAGS.data_dir, sub) for sub in ("train", "test")] if FLAGS.data_dir else []
    target = os.path.realpath(run_dir) + os.sep
    inside = same_folder(run_dir, FLAGS.data_dir) or any(target.startswith(os.path.realpath(f) + os.sep)
                                                         for f in folders)
    if inside or os.path.isfile(os.path.join(run_dir, kaggle.TRAIN_FILE)):
        raise checkpoints.ResumeError(
            f"--model_dir={run_dir} is a data folder ({'in --data_dir' if inside else 'it holds train.csv'}): a "
            "run's files would mix with the data; give a new --model_dir outside it, e.g. runs/<name>")


def same_folder(a: str | None, b: str | None) -> bool:
    """Whether two paths name the same folder (symlinks and ../ resolved); False when either is None."""
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def check_flags_cfg_edits(run_dir: str, cfg: dict[str, str], recorded: dict[str, str] | None) -> None:
    """A run's flags.cfg (`cfg`, parsed) must say what the run wrote into it (record.json's "flags", `recorded`;
    None for runs older than that record: not checked). A hand edit there would be ignored by a resume (the
    schedule, optimizer and split come from the run's checkpoint and files) and then mislead `runs reproduce`,
    so it stops, except for the flags a resume may change anyway (salt_flags.RESUME_MAY_CHANGE: where the run
    and its data live, logging).

    Raises:
        checkpoints.ResumeError: one line naming each edited flag and the ways forward.
    """
    from salt_tf import checkpoints, rundir

    if recorded is None:
        return
    edited = sorted(name for name in set(cfg) | set(recorded)
                    if name not in salt_flags.RESUME_MAY_CHANGE and cfg.get(name) != recorded.get(name))
    if not edited:
        return
    changes = "; ".join(f"{name}: {recorded.get(name, '(none)')} -> {cfg.get(name, '(none)')}" for name in edited)
    raise checkpoints.ResumeError(
        f"{os.path.join(run_dir, rundir.FLAGS_FILE)} was edited after the run wrote it ({changes}); a resume "
        f"cannot apply that (the run's values are \"flags\" in {rundir.RECORD_FILE}), so nothing was written: undo "
        "the edit and give what a resume may change (more --epochs) on the command line, or start a new run with "
        f"--init_checkpoint={run_dir} and a new --model_dir")


def check_flagfile_model_dir(argv: list[str]) -> None:
    """`--flagfile=B/flags.cfg` of a run copied or moved from A names --model_dir=A: without a --model_dir of its
    own, that command would resume (and rewrite) A. Stops it when the flagfile is a run's flags.cfg, the command
    line sets no --model_dir, and the flagfile's folder is not FLAGS.model_dir.

    Args:
        argv: the command line as given (flagfiles not expanded); FLAGS parsed from it.

    Raises:
        flags.IllegalFlagValueError: one line naming the flagfile and the --model_dir to add.
    """
    from salt_tf import rundir

    named = {arg[2:].partition("=")[0] for arg in argv[1:] if arg.startswith("--")}
    if "model_dir" in named:
        return
    for arg in argv[1:]:
        path = arg.partition("=")[2] if arg.startswith("--flagfile=") else None
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if path and os.path.basename(path) == rundir.FLAGS_FILE and holds_run(folder) and \
                not same_folder(folder, FLAGS.model_dir):
            raise flags.IllegalFlagValueError(
                f"--flagfile={path} belongs to the run in {folder} but names --model_dir={FLAGS.model_dir} (the run "
                f"was copied or moved): add --model_dir={folder} to resume it there, or a new --model_dir to "
                "train it again elsewhere")


def check_resume_data(run_dir: str, data_fingerprint: str) -> None:
    """A resumed run must train on the images it started with (wherever --data_dir now points)."""
    from salt_tf import rundir
    from salt_tf.data import kaggle

    path = os.path.join(run_dir, rundir.RECORD_FILE)
    recorded = (rundir.read_json(path).get("data") or {}).get("fingerprint") if os.path.isfile(path) else None
    if recorded and recorded != data_fingerprint:
        extra = f" (with --extra_data_dir={','.join(FLAGS.extra_data_dir)})" if FLAGS.extra_data_dir else ""
        raise kaggle.DataError(f"--data_dir={FLAGS.data_dir}{extra} holds other images or masks than the run in "
                               f"{run_dir} trained on (its data fingerprint in {rundir.RECORD_FILE} differs); "
                               "point --data_dir (and --extra_data_dir) at that data to resume, or give a new "
                               "--model_dir")


def record_flag_changes(out_dir: str, changes: dict, resume: str | None) -> None:
    """Appends a resume's legal flag changes to record.json's "flag_changes" (flags.cfg now holds the new
    values)."""
    from salt_tf import records, rundir

    path = os.path.join(out_dir, rundir.RECORD_FILE)
    earlier = (rundir.read_json(path) if os.path.isfile(path) else {}).get("flag_changes") or []
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
             "checkpoint": os.path.basename(resume) if resume else None, "changed": changes}
    records.update_record(out_dir, flag_changes=earlier + [entry])


def load_data():
    """The labelled set (generating the demo set first if asked) and the examples skipped as bad."""
    from salt_tf.data import kaggle, synthetic

    if FLAGS.dataset == "demo":
        synthetic.ensure_demo_data(FLAGS.data_dir, FLAGS.demo_images, seed=0)
    skipped = None if FLAGS.strict else []
    data = kaggle.load_labelled(FLAGS.data_dir, skipped=skipped)
    for id_, reason in skipped or []:
        logging.warning("skipped %s: %s", id_, reason)
    if skipped:
        logging.warning("--nostrict: skipped %d bad examples (listed in skipped.csv)", len(skipped))
    return data, skipped or []


def load_extra_data(data, skipped: list | None):
    """The --extra_data_dir folders: [(folder, its LabelledSet, its fingerprint)], in flag order.

    Their images train only, so none may share an id with --data_dir (it could be a validation image) or with
    another extra folder (the same image twice). Raises DataError naming the folder and the fix.
    """
    from salt_tf.data import kaggle

    extras, seen = [], {i: FLAGS.data_dir for i in data.ids}
    for folder in FLAGS.extra_data_dir:
        extra = kaggle.load_labelled(folder, skipped=skipped, flag="--extra_data_dir")
        clash = [i for i in extra.ids if i in seen]
        if clash:
            raise kaggle.DataError(
                f"--extra_data_dir={folder}: {len(clash)} of its ids are also in {seen[clash[0]]} (e.g. "
                f"{clash[0]}); extra data trains only, so an image of the labelled set could reach validation or "
                "an image count twice: remove those ids from the folder or drop it")
        seen.update((i, folder) for i in extra.ids)
        extras.append((folder, extra, kaggle.fingerprint(folder, list(extra.ids))))
    return extras


def data_fingerprint(labelled: str, extras) -> str:
    """The run's data fingerprint: --data_dir's (kaggle.fingerprint), unchanged without extra data (so older
    runs resume), else the SHA-256 over it and every --extra_data_dir folder's fingerprint, in flag order."""
    import hashlib

    if not extras:
        return labelled
    return hashlib.sha256(" ".join([labelled] + [fp for _, _, fp in extras]).encode()).hexdigest()


def with_extra(train_data, extras):
    """The training set: the split's training images, then every extra folder's."""
    import numpy as np

    from salt_tf.data import kaggle

    if not extras:
        return train_data
    sets = [train_data] + [extra for _, extra, _ in extras]
    return kaggle.LabelledSet(*(np.concatenate([getattr(s, f) for s in sets])
                                for f in ("ids", "images", "masks", "depths")))


def new_split(data):
    """The split of a new run: fold --fold of --folds (splits.fold_split), or one split with --val_images."""
    from salt_tf.data import splits

    if FLAGS.folds:
        splits.check_folds(len(data.ids), FLAGS.folds, FLAGS.batch_size)  # every fold, not only this one
        return splits.fold_split(list(data.ids), data.coverage(), FLAGS.folds, FLAGS.fold, FLAGS.split_seed)
    return splits.stratified_split(list(data.ids), data.coverage(), FLAGS.val_images, FLAGS.split_seed)


def split_data(data, run_dir: str):
    """Train and validation subsets, and the split to write (None when it was read back): the split is read
    from the run directory on resume, so a run always validates on the images it started with. Writes
    nothing, so a bad --val_images or --batch_size stops the run before its directory exists."""
    from salt_tf.data import kaggle, splits
    from salt_tf import rundir

    split_path = os.path.join(run_dir, rundir.SPLIT_FILE)
    new_split_frame = None
    if os.path.isfile(split_path):
        split = splits.read_split(split_path)
    else:
        split = new_split_frame = new_split(data)
    train_ids = list(split.loc[split["role"] == "train", "id"])
    val_ids = list(split.loc[split["role"] == "val", "id"])
    check_split_counts(run_dir, len(train_ids), len(val_ids), read_back=new_split_frame is None)
    if len(train_ids) < FLAGS.batch_size:
        raise kaggle.DataError(f"--batch_size={FLAGS.batch_size} is larger than the {len(train_ids)} training "
                               f"images ({len(val_ids)} of {len(split)} held out for validation); lower "
                               f"--batch_size to at most {len(train_ids)}" +
                               ("" if new_split_frame is None or FLAGS.folds else " or lower --val_images"))
    return data.subset(train_ids), data.subset(val_ids), new_split_frame


def check_split_counts(run_dir: str, train: int, val: int, read_back: bool) -> None:
    """A resumed run trains and validates on as many labelled images as record.json says it did (a split.csv
    that lost or gained rows would silently change the run); nothing to check for a new run (holds_run).

    Args:
        run_dir: the run directory.
        train, val: the split's training images (without --extra_data_dir's) and validation images.
        read_back: the split was read from split.csv (else recomputed from the flags: the file was missing).

    Raises:
        DataError: one line naming split.csv, both counts and the fix.
    """
    from salt_tf import rundir
    from salt_tf.data import kaggle

    path = os.path.join(run_dir, rundir.RECORD_FILE)
    if not holds_run(run_dir) or not os.path.isfile(path):
        return
    data = rundir.read_json(path).get("data") or {}
    if "train_images" not in data:
        return
    recorded_train = data["train_images"] - sum(extra["images"] for extra in data.get("extra") or [])
    if (train, val) == (recorded_train, data["val_images"]):
        return
    split = os.path.join(run_dir, rundir.SPLIT_FILE)
    where = f"{split} has" if read_back else f"{split} is missing and the split recomputed from the flags has"
    raise kaggle.DataError(
        f"{where} {train} training and {val} validation images, but the run trained on {recorded_train} and "
        f"validated on {data['val_images']} ({rundir.RECORD_FILE}); resuming would train another run: restore "
        f"{rundir.SPLIT_FILE} from a copy of the run, or start a new run with --init_checkpoint={run_dir} and a "
        "new --model_dir")


def run(stop_signals: StopSignals | None = None) -> dict:
    """Runs (or resumes) the training described by FLAGS (parsed, salt_tf.flags.define_flags).

    Args:
      stop_signals: the process's stop request (the train command's, installed since start-up), checked
        between the start-up phases and by the training loop; None: the loop installs its own while it runs.

    Returns:
      The final summary (loop.Trainer.run's), also written to record.json.
    """
    run_dir = FLAGS.model_dir
    # Before TensorFlow runs its first op: thread pools are fixed then.
    from salt_tf import determinism

    applied = determinism.configure(FLAGS.seed, FLAGS.deterministic)

    from salt_tf import distribute

    # Right after the thread settings, before any other op: MultiWorkerMirroredStrategy must configure the
    # runtime (collectives, its gRPC server) before TensorFlow initializes it. A bad TF_CONFIG, --devices or
    # batch stops here, before anything is written.
    tf_config = distribute.read_tf_config() if FLAGS.strategy == "multi_worker" else None
    strategy = distribute.create_strategy(FLAGS.strategy, FLAGS.devices, tf_config)
    per_replica_batch = distribute.check_global_batch(strategy, FLAGS.batch_size)
    role = distribute.worker_role(tf_config)
    # Only the chief writes the run directory; another worker writes the same files into a temporary
    # directory, deleted when it finishes.
    out_dir = distribute.write_dir(run_dir, role)
    try:
        with contextlib.ExitStack() as lock:
            return _run(run_dir, out_dir, applied, strategy, per_replica_batch, role, lock,
                        stop_signals or StopSignals())
    finally:
        distribute.remove_write_dir(out_dir, role)


def _run(run_dir, out_dir, applied, strategy, per_replica_batch, role, lock: contextlib.ExitStack,
         stop_signals: StopSignals) -> dict:
    """The run; `lock` receives out_dir's records.RunDirLock, held until the caller closes it."""
    from salt_tf import checkpoints, configs, determinism, distribute, losses, loop, model as model_lib, pipeline
    from salt_tf import records, schedules, step as step_lib
    from salt_tf import rundir
    from salt_tf.data import kaggle, splits

    # One writer per directory. An existing directory (a resume) is locked before its split and checkpoints
    # are read; a new one is created, and locked, only once every check of flags and data below has passed,
    # so a failed start writes nothing.
    locked_early = os.path.isdir(out_dir)
    if locked_early:
        lock.enter_context(records.RunDirLock(out_dir))
    # A rerun on a run directory resumes that run: first of all, the flags must be the run's.
    flag_changes = check_resume_flags(run_dir)
    started = time.time()
    # Data first: a bad file stops the run before anything is written into the run directory.
    data, skipped = load_data()
    extras = load_extra_data(data, None if FLAGS.strict else skipped)
    stop_signals.raise_if_requested()
    labelled_fingerprint = kaggle.fingerprint(FLAGS.data_dir, list(data.ids))
    fingerprint = data_fingerprint(labelled_fingerprint, extras)
    if flag_changes is not None:
        check_resume_data(run_dir, fingerprint)
    model_config, config = configs.model_config(), configs.loop_config()
    train_data, val_data, new_split = split_data(data, run_dir)
    train_data = with_extra(train_data, extras)  # after the split: extra images never validate
    train_arrays = pipeline.to_arrays(train_data, FLAGS.use_depth)
    val_arrays = pipeline.to_arrays(val_data, FLAGS.use_depth)
    resume = checkpoints.resume_point(run_dir, FLAGS.restart_from_scratch)
    init_weights, init_source = initial_weights(resume, dataclasses.asdict(model_config))
    if not locked_early:
        lock.enter_context(records.RunDirLock(out_dir))
    # Writes start here.
    for path in records.remove_temporary_files(out_dir):
        logging.info("removed %s, left by an interrupted write", path)
    prepare_run_dir(out_dir)
    if flag_changes:
        record_flag_changes(out_dir, flag_changes, resume)
        logging.info("resuming with changed flags (recorded in %s): %s", rundir.RECORD_FILE, "; ".join(
            f"{name}: {was} -> {now}" for name, (was, now) in flag_changes.items()))
    if skipped:
        import pandas as pd

        rundir.write_csv(os.path.join(out_dir, rundir.SKIPPED_FILE), pd.DataFrame(skipped, columns=["id", "reason"]))
    if new_split is not None:
        splits.write_split(new_split, os.path.join(out_dir, rundir.SPLIT_FILE))
    if init_source:
        init_source["val_images_trained_on_by_source"] = seen = images_trained_on(init_weights, val_data.ids)
        if seen:
            logging.warning("%d of the %d validation images were training images of --init_checkpoint=%s: this "
                            "run's validation scores are optimistic; use the source run's --split_seed and "
                            "--val_images", seen, len(val_data.ids), FLAGS.init_checkpoint)
    extra_images = sum(len(e.ids) for _, e, _ in extras)
    logging.info("data: %d training%s, %d validation images from %s%s", len(train_data.ids),
                 f" ({extra_images} of them from --extra_data_dir)" if extras else "", len(val_data.ids),
                 FLAGS.data_dir, f", fold {FLAGS.fold} of {FLAGS.folds}" if FLAGS.folds else "")
    # Everything with variables is created under the strategy's scope: mirrored on every replica.
    with strategy.scope():
        model = model_lib.build_model(model_config, precision=FLAGS.precision)
        optimizer = schedules.build_optimizer(configs.optimizer_config())
    synchronized = distribute.synchronize_batch_norm(model, strategy, FLAGS.sync_batch_norm)
    logging.info("model: %d parameters, %.2f GFLOP forward per image", model_lib.count_params(model),
                 model_lib.forward_flops_per_image(model_config) / 1e9)
    logging.info("strategy %s: %d replicas (%s), per-replica batch %d of global %d%s", FLAGS.strategy,
                 strategy.num_replicas_in_sync, role.task, per_replica_batch, FLAGS.batch_size,
                 f", {synchronized} batch-norm layers synchronized" if synchronized else "")
    loss_stages = losses.build_losses(configs.loss_config(), model_config.deep_supervision)
    stop_signals.raise_if_requested()
    records.update_record(out_dir, code=records.code_version(), environment=determinism.environment(),
                          determinism=applied, distribution=distribution_record(strategy, per_replica_batch),
                          data=data_record(fingerprint, labelled_fingerprint, train_data, val_data, skipped, extras),
                          split={"folds": FLAGS.folds, "fold": FLAGS.fold if FLAGS.folds else None,
                                 "seed": FLAGS.split_seed},
                          started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)))
    if init_source:
        records.update_record(out_dir, init_checkpoint=init_source)
    step = step_lib.TrainStep(model, optimizer, loss_stages, batch_size=config.batch_size,
                              clip_norm=config.clip_norm, strategy=strategy)
    trainer = loop.run_dir_trainer(
        step, config, train_arrays, val_arrays, out_dir, restore_dir=run_dir,
        export_config={"model": dataclasses.asdict(model_config), "use_depth": FLAGS.use_depth,
                       "precision": FLAGS.precision},
        hparams=salt_flags.run_flag_values(), resume_checkpoint=resume, init_weights=init_weights,
        stop_signals=stop_signals)
    summary = trainer.run()
    records.update_record(out_dir, summary=summary,
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()))
    logging.info("done: best val_metric %.4f at epoch %s (%.4f at threshold %.2f); run directory %s",
                 summary["best_val_metric"] or 0.0, summary["best_epoch"],
                 summary["best_val_metric_at_best_threshold"] or 0.0, summary["best_threshold"] or 0.5, run_dir)
    return summary


def data_record(fingerprint: str, kaggle_fingerprint: str, train_data, val_data, skipped: list, extras) -> dict:
    """record.json's "data": the folder, the fingerprint of everything trained or validated on, the counts
    (train_images includes the extra images), and with extra data the labelled set's own fingerprint and each
    --extra_data_dir folder with its own."""
    record = {"dir": os.path.abspath(FLAGS.data_dir), "fingerprint": fingerprint,
              "train_images": len(train_data.ids), "val_images": len(val_data.ids),
              "skipped_examples": len(skipped)}
    if extras:  # the labelled set alone, which every fold of a cross-validation shares (salt_tf.cv collect)
        record["labelled_fingerprint"] = kaggle_fingerprint
        record["extra"] = [{"dir": os.path.abspath(folder), "fingerprint": fp, "images": len(extra.ids)}
                           for folder, extra, fp in extras]
    return record


def initial_weights(resume: str | None, model_config: dict) -> tuple[str | None, dict | None]:
    """With --init_checkpoint on a run that has no checkpoint to resume (`resume` None): the export folder to
    start from and what the record says of it; checked before anything is written, so a wrong path or model
    stops the run cleanly. A resumed run continues from its own checkpoint and needs neither."""
    from salt_tf import checkpoints, records, rundir

    if not FLAGS.init_checkpoint or resume:
        return None, None
    export_dir = checkpoints.init_export_dir(FLAGS.init_checkpoint)
    source = checkpoints.check_init_compatible(export_dir, FLAGS.init_checkpoint, model_config)
    return export_dir, {"path": os.path.abspath(export_dir), "epoch": source.get("epoch"),
                        "val_metric": source.get("val_metric"),
                        "weights_sha256": records.files_sha256(export_dir, rundir.EXPORT_WEIGHTS)}


def images_trained_on(export_dir: str, ids) -> int | None:
    """How many of `ids` the run that wrote `export_dir` trained on (None: its split.csv is not there)."""
    from salt_tf import rundir
    from salt_tf.data import splits

    path = os.path.join(rundir.source_run_dir(export_dir), rundir.SPLIT_FILE)
    if not os.path.isfile(path):
        return None
    split = splits.read_split(path)
    return len(set(split.loc[split["role"] == "train", "id"]) & set(ids))


def distribution_record(strategy, per_replica_batch: int) -> dict:
    """How the run was spread over devices and hosts, for record.json."""
    import json

    devices = list(strategy.extended.worker_devices) if FLAGS.strategy != "default" else []
    record = {"strategy": FLAGS.strategy, "replicas": strategy.num_replicas_in_sync,
              "devices": devices, "global_batch": FLAGS.batch_size,
              "per_replica_batch": per_replica_batch, "sync_batch_norm": FLAGS.sync_batch_norm}
    if FLAGS.strategy == "multi_worker":
        record["cluster"] = json.loads(os.environ["TF_CONFIG"])["cluster"]
    return record


class _QuietSaverLogs:
    """Drops TensorFlow's per-save 'Sharding callback duration' info lines, which bury the epoch lines."""

    def filter(self, record):
        return "Sharding callback" not in record.getMessage()


def parse_train_argv(argv: list[str]) -> list[str]:
    """Parses a train command line into FLAGS with every check of the flags alone (validators, repeated list
    flags joined, the command-line conflicts of salt_flags, a stray argument, --model_dir given).

    Args:
        argv: the command line, program name first.

    Returns:
        absl's remaining arguments (the program name).

    Raises:
        flags.Error: one line naming the flag.
    """
    argv = salt_flags.join_repeated(list(argv))
    remaining = FLAGS(argv)
    salt_flags.command_line_conflicts(argv)
    if len(remaining) > 1:
        raise flags.Error(f"unexpected argument {' '.join(remaining[1:])}: flags take the form --name=value "
                          "(--help lists them)")
    if FLAGS.model_dir is None:
        raise flags.IllegalFlagValueError("--model_dir is required: the run directory to write (or resume)")
    check_flagfile_model_dir(argv)
    return remaining


def parse_flags(argv: list[str]) -> list[str]:
    """Parses argv into FLAGS; a bad flag ends the program with one line naming it (exit status 2)."""
    try:
        return parse_train_argv(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv  # parse_flags has refused any argument that is not a flag
    stop_signals = _PROCESS_STOP_SIGNALS or StopSignals()
    installed_here = stop_signals.install()
    try:
        _main(stop_signals)
    except KeyboardInterrupt:
        # A second SIGINT/SIGTERM (the first one finishes the step and writes a checkpoint), or one during
        # start-up (TensorFlow's import, data loading, model building): stop at once. Every file of the run directory is
        # written atomically, so what is there is whole; the same command resumes from the last checkpoint.
        _fail(f"interrupted: stopped at once, without writing a checkpoint; the same command resumes "
              f"{FLAGS.model_dir} from its last checkpoint (or starts it, if it has none)", 128 + signal.SIGINT,
              prefix="stopped")
    finally:
        if installed_here:
            stop_signals.restore()


def _main(stop_signals: StopSignals) -> None:
    """The train command after flag parsing: the run, and each failure a user can cause as one line.

    Args:
      stop_signals: the process's stop request, installed (a signal during start-up stops before training).
    """
    import tensorflow as tf

    from salt_tf.checkpoints import InitCheckpointError, ResumeError
    from salt_tf.data.kaggle import DataError
    from salt_tf.distribute import StrategyError
    from salt_tf.loop import TrainingStopped
    from salt_tf import tfstart
    from salt_tf.records import RunDirBusy

    logging.get_absl_handler().addFilter(_QuietSaverLogs())
    logging.info("%s", tfstart.device_summary(tf))
    try:
        stop_signals.raise_if_requested()
        run(stop_signals)
    except (DataError, StrategyError, InitCheckpointError, ResumeError, RunDirBusy) as e:
        _fail(str(e), 2)
    except TrainingStopped as e:
        _fail(str(e), e.exit_code, prefix="stopped" if e.exit_code > 128 else "error")
    except (OSError, tf.errors.PermissionDeniedError, tf.errors.ResourceExhaustedError,
            tf.errors.FailedPreconditionError, tf.errors.UnavailableError, tf.errors.DataLossError) as e:
        # A failing write (read-only or full disk) deep inside TensorFlow: one line, not a stack trace.
        detail = getattr(e, "message", None) or str(e)
        _fail(f"cannot write the run directory {FLAGS.model_dir}: {detail.splitlines()[0]}; check its "
              "permissions and free space, then run the same command to resume", 1)


def _fail(message: str, status: int, prefix: str = "error") -> None:
    """The one line of a stop, `<prefix>: message` on stderr (not also absl's E-line: the same text twice),
    then exit `status`."""
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    salt_flags.define_flags()
    flags.adopt_module_key_flags(salt_flags)  # so --help lists the run flags, not only --helpfull
    app.run(main, flags_parser=parse_flags)
