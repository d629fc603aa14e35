"""Hyperparameter sweeps on Optuna: every trial an ordinary run directory, hopeless trials pruned, many workers.

    python -m salt_tf.sweep run --sweep_dir=S --space=flags/sweep_lr.yaml --trials=N [--storage=URL]
        [--study=NAME] [--sampler=tpe|random|cmaes] [--seed=0] [--pruner=median|hyperband|threshold|none]
        [--enqueue=FLAG=VALUE,...] [train flags: --flagfile=F --epochs=E [--folds=K] ...]
    python -m salt_tf.sweep report --sweep_dir=S [--plot=history.png]

`run` is one worker: it asks the study (Optuna, in --storage: SQLite in S by default, any SQLAlchemy URL such as
PostgreSQL, or journal:PATH) for a trial, trains it with the train command's own code into S/trial-<n>
(`python -m salt_tf.train <train flags> --<flag>=<sampled value> ... --model_dir=S/trial-<n>`, in this process),
reports its validation metric to the study after every epoch (an epoch-end action of the loop) and stops it
after an epoch when the pruner says so; until the study holds --trials trials. Start it N times (on N machines
with one storage URL) and the workers share the budget. A trial's value is the best, over its epochs, of the
--objective column of its metrics.csv.

Fold sweeps: when the train flags give --folds=K (K >= 2), each trial is a cross-validation parent S/trial-<n>
whose folds are trained one after another in this process, each by salt_tf.cv's own plan and arguments
(cv.plan_folds, cv.fold_arguments: S/trial-<n>/fold-k is `python -m salt_tf.train ... --fold=k
--model_dir=S/trial-<n>/fold-k`, an ordinary fold run for `cv collect` and `predict`). The trial's value is the
mean over its K folds of each fold's best --objective; it reports after every epoch of every fold at step
fold * E + epoch (E: --epochs, or the space's highest), so the pruner compares the same fold and epoch across
trials. --folds=K with --fold=k in the train flags is a sweep on one fold instead: every trial is one run
validating on fold k (1/K of a fold sweep's compute).

Resume: rerunning the command resumes the study. A trial left RUNNING by a worker that died (SIGKILL, a lost
machine) is adopted by the next worker on the same sweep folder: the same trial number, parameters and run
directory, trained on from its last checkpoint (the train command's resume; a fold trial's finished folds are
kept and its unfinished fold resumed), so it is neither restarted nor counted twice. A worker knows a trial's
owner is gone by its claim: the owner holds a lock on S/.claims/trial-<n> for as long as it runs the trial (the
kernel releases it when the process dies).

Budget: every trial asked for counts (running, complete, pruned, failed), in the storage, so N workers on one
study run --trials trials together. Two workers asking at the same moment may both get a new trial; the one
whose trial number comes after the budget is full marks its trial "surplus" (Optuna state FAIL, never trained,
never counted) and stops. Trial parameters are a function of --seed, the trial number and the study's history
(the sampler is re-seeded per trial), not of which worker or process asked.

Everything a user can get wrong is checked before the first trial, one line and exit status 2: an unknown flag or
a bad entry in the search space, a range a train flag's validator refuses, an unreachable storage, a study name
already used with another search space, base flags or objective; in a fold sweep also --fold or --folds in the
space (every trial trains the same K folds), and a K that leaves a fold without a validation
image or a training batch (cv's whole-K-fold check). A training that fails on its own (non-finite
steps, exit status 3 of train) fails its trial and the sweep goes on. Ctrl-C / SIGTERM: the running trial
checkpoints and the worker stops (exit 130 / 143); the same command resumes it.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import time

from absl import flags

from salt_tf import cli, cv, sweep_report
from salt_tf.stop_signals import StopSignals
from salt_tf.sweep_report import SweepError

# The run command's stop request, installed before TensorFlow's import (salt_tf.stop_signals); None as a library.
_PROCESS_STOP_SIGNALS: StopSignals | None = None
if __name__ == "__main__" and sys.argv[1:2] == ["run"]:
    _PROCESS_STOP_SIGNALS = StopSignals()
    _PROCESS_STOP_SIGNALS.install()

SPACE_TYPES = ("float", "log_float", "int", "log_int", "categorical")
NOT_SWEPT = ("model_dir", "flagfile")           # the sweep sets --model_dir; a flagfile is not a value
FOLD_FLAGS = ("fold", "folds")                   # a fold sweep trains every fold of one --folds=K per trial
OBJECTIVES = ("val_metric", "val_metric_at_best_threshold")
ABANDONED_AFTER_SECONDS = 120  # a RUNNING trial whose worker never said where it runs, this old, is abandoned


# ---------------------------------------------------------------------------------------------------------
# The search space: a YAML file, {flag: {TYPE: [LOW, HIGH] | [CHOICES], step: S}}.


def load_space(path: str) -> dict:
    """The search space of a YAML file as {flag: Optuna distribution}, in file order.

    Each entry is `flag: {float|log_float|int|log_int: [LOW, HIGH]}` (optionally `step: S`) or
    `flag: {categorical: [A, B, ...]}`.

    Raises:
        SweepError: a missing or unreadable file, or a malformed entry (one line naming the file and the flag).
    """
    import optuna.distributions as d
    import yaml

    try:
        with open(path) as f:
            entries = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"--space={path}: cannot read the search space ({str(e).splitlines()[0]})") from None
    if not isinstance(entries, dict) or not entries:
        raise SweepError(f"--space={path}: expected a mapping flag: {{type: range}}, e.g. learning_rate: "
                         "{log_float: [1.0e-4, 1.0e-2]}")
    space = {}
    for name, entry in entries.items():
        kinds = [k for k in (entry if isinstance(entry, dict) else {}) if k in SPACE_TYPES]
        others = set(entry if isinstance(entry, dict) else {}) - set(SPACE_TYPES) - {"step"}
        if len(kinds) != 1 or others:
            raise SweepError(f"--space={path}: {name}: give exactly one of {', '.join(SPACE_TYPES)} (and "
                             f"optionally step), e.g. {name}: {{log_float: [1.0e-4, 1.0e-2]}}")
        try:
            space[str(name)] = _distribution(d, kinds[0], entry[kinds[0]], entry.get("step"))
        except (TypeError, ValueError) as e:
            raise SweepError(f"--space={path}: {name}: {e}") from None
    return space


def _distribution(d, kind: str, values, step):
    """One Optuna distribution from a space entry (ValueError with the reason when malformed)."""
    if kind == "categorical":
        if not isinstance(values, list) or not values:
            raise ValueError("categorical needs a list of choices")
        return d.CategoricalDistribution(values)
    if not isinstance(values, list) or len(values) != 2:
        raise ValueError(f"{kind} needs [LOW, HIGH]")
    number = int if kind.endswith("int") else float
    low, high = (number(v) for v in values)  # YAML reads 1e-4 (no dot) as text: float() takes it
    if kind.endswith("int"):
        return d.IntDistribution(low, high, log=kind == "log_int", step=int(step or 1))
    return d.FloatDistribution(low, high, log=kind == "log_float", step=None if step is None else float(step))


def flag_text(value) -> str:
    """A parameter value as a train flag's value (booleans as absl spells them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def space_arguments(params: dict) -> list[str]:
    """The train command's arguments setting a trial's parameters."""
    return [f"--{name}={flag_text(value)}" for name, value in params.items()]


def space_json(space: dict) -> dict:
    """{flag: distribution as JSON}: what the study keeps of its search space."""
    import optuna.distributions as d

    return {name: d.distribution_to_json(dist) for name, dist in space.items()}


def edge_values(dist) -> list:
    """The values of a distribution a flag's validators must accept: both ends of a range, every choice."""
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


# ---------------------------------------------------------------------------------------------------------
# The train command's flags: the base command line and every value of the space, checked before any trial.


def parse_trial_flags(base_args: list[str], params_args: list[str], model_dir: str) -> None:
    """Parses a trial's train command line into absl's FLAGS (from the defaults, not the previous trial's values).

    Raises:
        flags.Error: one line naming the flag (the train command's own checks, train.parse_train_argv).
    """
    from salt_tf import train

    flags.FLAGS.unparse_flags()
    train.parse_train_argv(["train", *base_args, *params_args, f"--model_dir={model_dir}"])


def check_train_flags(base_args: list[str], space: dict, enqueued: list[dict], space_path: str) -> tuple[dict, bool]:
    """Checks the base train flags, each value at the edges of the space and each enqueued trial, the way the
    train command checks its own (validators included), in this process; FLAGS are left as they were.

    Returns:
        ({flag: value} of the base flags (for the study's record; salt_flags.RESUME_MAY_CHANGE left out),
         whether it is a fold sweep: --folds=K with K >= 2 and no --fold. With --fold=k as well, every trial is
         one run validating on fold k, a sweep on one fold that costs 1/K of a fold sweep.)

    Raises:
        SweepError: one line naming the flag, and the space entry or enqueued trial that set it.
    """
    from absl.testing import flagsaver

    salt_flags = cv.train_flags()
    names = {f.name for f in salt_flags.run_flags()}
    for name in space:
        if name not in names or name in NOT_SWEPT:
            raise SweepError(f"--space={space_path}: {name} is not a train flag a sweep can set (python -m "
                             "salt_tf.train --help lists them)" if name not in names else
                             f"--space={space_path}: {name} cannot be swept (the sweep sets --model_dir itself)")
    with flagsaver.flagsaver():
        _parse_or_say(base_args, [], "the base train flags")
        fold_sweep = flags.FLAGS.folds >= 2 and not flags.FLAGS["fold"].present
        if fold_sweep:
            check_fold_space(space, space_path)
        # What a resume may change (where the data and run live, logging) may differ between workers.
        base = {k: v for k, v in salt_flags.run_flag_values().items() if k not in salt_flags.RESUME_MAY_CHANGE}
        for name, dist in space.items():
            for value in edge_values(dist):
                _parse_or_say(base_args, space_arguments({name: value}), f"--space={space_path}: {name}={value}")
        for params in enqueued:
            _parse_or_say(base_args, space_arguments(params), f"--enqueue={params}")
    return base, fold_sweep


def check_fold_space(space: dict, space_path: str) -> None:
    """The check of a fold sweep's space (--folds=K, K >= 2, no --fold in the base flags): no --fold or --folds
    in it (every trial trains the same K folds, each fold k of a trial itself).

    Raises:
        SweepError: one line naming the flag.
    """
    for name in FOLD_FLAGS:
        if name in space:
            raise SweepError(f"--space={space_path}: {name} cannot be swept in a fold sweep (--folds="
                             f"{flags.FLAGS.folds}: every trial trains the same K folds)")


def check_fold_trials(base_args: list[str], sweep_dir: str) -> None:
    """A fold sweep's whole K-fold, before any trial: cv train's own plan of the base flags (cv.plan_folds: every
    fold's flags parsed, and every fold validates on at least one image and trains on at least one batch),
    for a parent folder that holds nothing (only read, never written).

    Raises:
        SweepError: one line (cv's, naming --folds or --batch_size and the fix).
    """
    try:
        cv.plan_folds(os.path.join(os.path.abspath(sweep_dir), ".fold-check"), base_args)
    except (cv.CVError, flags.Error) as e:
        raise SweepError(f"the base train flags: {e}") from None


def _parse_or_say(base_args: list[str], params_args: list[str], what: str) -> None:
    try:
        parse_trial_flags(base_args, params_args, "unused")
    except flags.Error as e:
        raise SweepError(f"{what}: the train command refuses it ({e})") from None


def parse_enqueued(texts: list[str], space: dict) -> list[dict]:
    """--enqueue values ("flag=value,flag=value") as {flag: value} in the space's types.

    Raises:
        SweepError: a flag outside the space or a value outside its distribution (one line).
    """
    import optuna.distributions as d

    enqueued = []
    for text in texts:
        params = {}
        for item in filter(None, text.split(",")):
            name, _, raw = item.partition("=")
            dist = space.get(name)
            if dist is None:
                raise SweepError(f"--enqueue={text}: {name} is not in the search space ({', '.join(space)})")
            value = _typed(dist, raw)
            if value is None or not dist._contains(dist.to_internal_repr(value)):
                raise SweepError(f"--enqueue={text}: {name}={raw} is outside its search space")
            params[name] = value
        enqueued.append(params)
    return enqueued


def _typed(dist, raw: str):
    """`raw` as a value of `dist` (a choice matched by its text), None when it is not one."""
    import optuna.distributions as d

    try:
        if isinstance(dist, d.CategoricalDistribution):
            return next((c for c in dist.choices if flag_text(c) == raw or str(c) == raw), None)
        return int(raw) if isinstance(dist, d.IntDistribution) else float(raw)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------
# The study: sampler, pruner, creation or the check that a rerun (or another worker) asks the same.


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial `number`."""
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def make_sampler(name: str, seed: int):
    """The sampler, re-seeded for every trial from (seed, trial number): a trial's parameters do not depend on
    which worker or process asked for it (an Optuna sampler seeded once draws in the order its process asks)."""
    import optuna

    makers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
              "cmaes": optuna.samplers.CmaEsSampler}

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        def __init__(self):
            self.inner = makers[name](seed=seed)

        def before_trial(self, study, trial):
            self.inner = makers[name](seed=trial_seed(seed, trial.number))
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

    return TrialSeededSampler()


def make_pruner(fv: flags.FlagValues, epochs: int):
    """The pruner of --pruner: median (of the complete trials at the same epoch), hyperband, threshold, none.

    Args:
        fv: the sweep's flags.
        epochs: the steps of a trial (hyperband's resources): --epochs, or a fold trial's K x fold_stride.
    """
    import optuna

    if fv.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=fv.prune_startup_trials,
                                           n_warmup_steps=fv.prune_from_epoch)
    if fv.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=fv.prune_from_epoch, max_resource=epochs)
    if fv.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=fv.prune_below, n_warmup_steps=fv.prune_from_epoch)
    return optuna.pruners.NopPruner()


def open_study(storage, name: str, attrs: dict, enqueued: list[dict], sampler, pruner):
    """Loads study `name`, or creates it (then records `attrs` and enqueues `enqueued`).

    Raises:
        SweepError: the study exists with other attributes: another space, base flags or objective (one line).
    """
    import optuna

    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                    pruner=pruner)
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        for params in enqueued:
            study.enqueue_trial(params)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    for _ in range(100):  # a worker that has just created it may still be writing its attributes
        if all(key in study.user_attrs for key in attrs):
            break
        time.sleep(0.1)
    for key, value in attrs.items():
        recorded = study.user_attrs.get(key)
        if sweep_report.as_json(recorded) != sweep_report.as_json(value):
            raise SweepError(f"--study={name} already exists with another {_what(key, recorded, value)}; give a "
                             "new --study (or --sweep_dir), or the flags it was made with")
    return study


def _what(key: str, recorded, given) -> str:
    """Which attribute of a study differs, for SweepError."""
    if key == sweep_report.SPACE_ATTR:
        return f"search space ({', '.join(sorted(recorded or {}))} there, {', '.join(sorted(given))} here)"
    if key == sweep_report.BASE_ATTR:
        names = sorted(n for n in set(recorded or {}) | set(given) if (recorded or {}).get(n) != given.get(n))
        return f"base train flags (differing: {', '.join('--' + n for n in names)})"
    return f"objective ({recorded} there, {given} here)"


# ---------------------------------------------------------------------------------------------------------
# Trials: asking, adopting an abandoned one, the budget.


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(sweep_dir: str, number: int):
    """Takes trial `number`'s claim (records.RunDirLock on its claim folder); None when a live worker holds it."""
    from salt_tf import records

    try:
        return records.RunDirLock(sweep_report.claim_dir(sweep_dir, number))
    except records.RunDirBusy:
        return None


def adopt_orphan(study, sweep_dir: str):
    """A RUNNING trial of this sweep folder whose worker died, claimed: (trial, claim), else None. A RUNNING
    trial that never said where it runs and is older than ABANDONED_AFTER_SECONDS is marked abandoned (FAIL,
    not counted: its worker died between asking for it and naming its folder)."""
    import optuna

    here = os.path.abspath(sweep_dir)
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        where = frozen.user_attrs.get(sweep_report.SWEEP_DIR_ATTR)
        if where is None:
            age = datetime.datetime.now() - (frozen.datetime_start or datetime.datetime.now())
            if age.total_seconds() > ABANDONED_AFTER_SECONDS:
                study._storage.set_trial_user_attr(frozen._trial_id, sweep_report.NOT_RUN_ATTR, "abandoned")
                study.tell(frozen.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            continue
        if where != here or not os.path.isdir(sweep_report.claim_dir(sweep_dir, frozen.number)):
            continue  # another folder's, or its owner has not taken its claim yet
        held = claim(sweep_dir, frozen.number)
        if held is not None:
            if study._storage.get_trial(frozen._trial_id).state == optuna.trial.TrialState.RUNNING:
                return optuna.Trial(study, frozen._trial_id), held
            held.release()
    return None


def new_trial(study, sweep_dir: str, budget: int, space: dict):
    """Asks the study for a new trial and claims it: (trial, claim), or None when the budget is full (a trial
    asked for past it is marked surplus) or another worker adopted it first."""
    import optuna

    trial = study.ask(fixed_distributions=space)
    storage, trial_id = study._storage, trial._trial_id
    storage.set_trial_user_attr(trial_id, sweep_report.SWEEP_DIR_ATTR, os.path.abspath(sweep_dir))
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and sweep_report.counted(t)]
    if len(before) >= budget:
        storage.set_trial_user_attr(trial_id, sweep_report.NOT_RUN_ATTR, "surplus")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None
    held = claim(sweep_dir, trial.number)
    return None if held is None else (trial, held)


def budget_left(study, budget: int) -> bool:
    return sum(sweep_report.counted(t) for t in study.get_trials(deepcopy=False)) < budget


# ---------------------------------------------------------------------------------------------------------
# One trial: the train command's own run, reporting to the study after every epoch; a fold trial: K of them.


class ReportEpoch:
    """Epoch-end action of a trial (or of one fold of a fold trial): reports the objective to the study, says in
    record.json which study and trial the run is, and stops the run after an epoch the pruner prunes
    (loop.StopAfterEpoch).

    Args:
        trial: the Optuna trial.
        run_dir: the run directory (a fold trial: the fold's, <trial>/fold-k).
        objective: the metrics.csv column reported.
        sweep_record: the `sweep` entry of its record.json (start_session's; a fold's with "fold": k).
        fold: None for a one-run trial; k for fold k of a fold trial, whose epoch e is reported at step
            fold * stride + e (fold_step) and is not pruned before epoch `from_epoch` of the fold.
        stride: the steps of one fold (the most epochs a trial of the study trains, fold_stride).
        from_epoch: --prune_from_epoch (a one-run trial: the pruner's own warm-up says it).
    """

    def __init__(self, trial, run_dir: str, objective: str, sweep_record: dict, fold: int | None = None,
                 stride: int = 0, from_epoch: int = 1):
        self.trial, self.run_dir, self.objective, self.sweep_record = trial, run_dir, objective, sweep_record
        self.fold, self.stride, self.from_epoch = fold, stride, from_epoch
        self.pruned_epoch: int | None = None
        self._recorded = False

    def __call__(self, end) -> None:
        from salt_tf import loop, records

        if not self._recorded:  # once per session: the run directory exists and is ours now
            records.update_record(self.run_dir, sweep=self.sweep_record)
            self._recorded = True
        step = end.epoch if self.fold is None else fold_step(self.fold, self.stride, end.epoch)
        frozen = self.trial.study._storage.get_trial(self.trial._trial_id)
        if step not in frozen.intermediate_values:  # a redone epoch (after a crash) was reported already
            self.trial.report(float(end.row[self.objective]), step)
        if self.fold is not None and end.epoch < self.from_epoch:
            return
        if self.trial.should_prune():
            self.pruned_epoch = end.epoch
            raise loop.StopAfterEpoch(f"pruned after epoch {end.epoch}" +
                                      ("" if self.fold is None else f" of fold {self.fold}"))


def fold_step(fold: int, stride: int, epoch: int) -> int:
    """The study's step of epoch `epoch` (1-based) of fold `fold` of a fold trial: fold * stride + epoch, so a
    pruner compares the same fold and epoch across trials."""
    return fold * stride + epoch


def fold_stride(base: dict, space: dict) -> int:
    """The steps one fold of a fold trial takes in the study: the most epochs any trial trains (the base
    --epochs, or the highest --epochs of the space)."""
    epochs = int(base["epochs"])
    if "epochs" in space:
        epochs = max([epochs] + [int(v) for v in edge_values(space["epochs"])])
    return epochs


def train_user_errors() -> tuple[type, ...]:
    """The exceptions the train command reports as a user's mistake (one line, exit 2)."""
    from salt_tf.checkpoints import InitCheckpointError, ResumeError
    from salt_tf.data.kaggle import DataError
    from salt_tf.distribute import StrategyError
    from salt_tf.records import RunDirBusy

    return DataError, StrategyError, InitCheckpointError, ResumeError, RunDirBusy


def trial_value(run_dir: str, objective: str) -> float | None:
    """The best value of the objective column over the run's epochs (metrics.csv), None without epochs."""
    from salt_tf import records

    rows = records.read_metrics(run_dir)
    return None if rows.empty or objective not in rows else float(rows[objective].max())


def fold_mean(values: list) -> float | None:
    """A fold trial's value: the mean of its folds' values (each fold's best objective), None unless every fold
    has one."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def run_trial(trial, fv: flags.FlagValues, base_args: list[str], stop_signals: StopSignals, resumed: bool,
              folds: int = 0, stride: int = 0) -> str:
    """Trains `trial` into its run directory (resuming it when it holds a run) and tells the study the outcome.

    Args:
        folds: K of a fold sweep (--folds=K in the base flags, K >= 2; run_fold_trial), else 0.
        stride: a fold trial's steps per fold (fold_stride).

    Returns:
        "complete", "pruned" or "failed".

    Raises:
        KeyboardInterrupt, loop.TrainingStopped (a signal): the trial stays RUNNING; a rerun adopts it.
        SweepError: the train command refused the trial's run directory (the trial is failed).
    """
    if folds >= 2:
        return run_fold_trial(trial, fv, base_args, stop_signals, resumed, stride)
    run_dir, record = start_session(trial, fv, resumed)
    train_args = [*base_args, *space_arguments(record["params"]), f"--model_dir={run_dir}"]
    state, outcome = train_trial(trial, train_args, stop_signals, ReportEpoch(trial, run_dir, fv.objective, record))
    return finish_trial(trial, run_dir, record, fv.objective, state, outcome)


def run_fold_trial(trial, fv: flags.FlagValues, base_args: list[str], stop_signals: StopSignals, resumed: bool,
                   stride: int) -> str:
    """A fold trial: cv train's plan of its K folds (cv.plan_folds on <trial> as the CV parent: finished folds
    are kept, an unfinished one resumed from its checkpoint), then each unfinished fold trained in turn by the
    train command's own code with cv's arguments (cv.fold_arguments), reporting every epoch (ReportEpoch at
    fold_step); a pruned or failed fold ends the trial. Its value: fold_mean of the folds' trial_value.

    Returns, raises: as run_trial.
    """
    import optuna

    from salt_tf import rundir

    parent, record = start_session(trial, fv, resumed)
    trial_args = [*base_args, *space_arguments(record["params"])]
    try:
        folds, plan = cv.plan_folds(parent, trial_args)
    except (cv.CVError, flags.Error) as e:  # e.g. a fold folder holding a run of other flags
        refuse_trial(trial, f"trial {trial.number}: {e}")
    say(f"trial {trial.number}: {folds} folds: " + ", ".join(f"fold-{k} {s}" for k, s in plan.items()))
    storage, values = trial.study._storage, []
    state, outcome = optuna.trial.TrialState.COMPLETE, {}
    for k in range(folds):
        fold_run, fold_record = rundir.fold_dir(parent, k), dict(record, fold=k)
        report_recorded_epochs(trial, fold_run, fv.objective, k, stride)
        if plan[k] != "finished":
            reporter = ReportEpoch(trial, fold_run, fv.objective, fold_record, fold=k, stride=stride,
                                   from_epoch=fv.prune_from_epoch)
            state, outcome = train_trial(trial, cv.fold_arguments(trial_args, parent, k), stop_signals, reporter)
        values.append(trial_value(fold_run, fv.objective))
        storage.set_trial_user_attr(trial._trial_id, sweep_report.FOLD_VALUES_ATTR,
                                    values + [None] * (folds - len(values)))
        if state != optuna.trial.TrialState.COMPLETE:
            break
    return finish_fold_trial(trial, parent, record, state, outcome, values + [None] * (folds - len(values)))


def report_recorded_epochs(trial, fold_run: str, objective: str, fold: int, stride: int) -> None:
    """Reports the epochs of a fold's metrics.csv that the study lacks (a worker killed after an epoch was
    committed but before its report): a resumed fold trial's steps are then complete."""
    from salt_tf import records

    rows = records.read_metrics(fold_run)
    if rows.empty or objective not in rows:
        return
    reported = trial.study._storage.get_trial(trial._trial_id).intermediate_values
    for epoch, value in zip(rows["epoch"], rows[objective]):
        step = fold_step(fold, stride, int(epoch))
        if step not in reported:
            trial.report(float(value), step)


def start_session(trial, fv: flags.FlagValues, resumed: bool) -> tuple[str, dict]:
    """Records in the study where trial `trial` runs and this session; returns (its run directory, the `sweep`
    entry of its record.json: study, trial, storage, sweep folder, parameters). A fold trial's run directory
    is its CV parent (its folds' record.json: this entry and "fold": k)."""
    run_dir = sweep_report.trial_dir(fv.sweep_dir, trial.number)
    storage = trial.study._storage
    storage.set_trial_user_attr(trial._trial_id, sweep_report.RUN_DIR_ATTR, os.path.abspath(run_dir))
    sessions = trial.user_attrs.get(sweep_report.SESSIONS_ATTR, []) + [{"worker": _worker(), "resumed": resumed}]
    storage.set_trial_user_attr(trial._trial_id, sweep_report.SESSIONS_ATTR, sessions)
    params = {name: trial.params[name] for name in load_space(fv.space)}  # set by ask (or the first session)
    say(f"trial {trial.number} ({', '.join(f'{k}={flag_text(v)}' for k, v in params.items())}): "
        f"{'resumed' if resumed else 'started'} in {run_dir}")
    url = sweep_report.storage_url(fv.storage, fv.sweep_dir)
    return run_dir, {"study": trial.study.study_name, "trial": trial.number, "storage": sweep_report.shown_url(url),
                     "sweep_dir": os.path.abspath(fv.sweep_dir), "params": params}


def refuse_trial(trial, message: str) -> None:
    """Fails `trial` (nothing was trained: the train command or cv refused its run directory) and raises
    SweepError(message)."""
    import optuna

    trial.study._storage.set_trial_user_attr(trial._trial_id, sweep_report.FAILED_ATTR, message)
    trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    raise SweepError(message)


def train_trial(trial, train_args: list[str], stop_signals: StopSignals, reporter: ReportEpoch) -> tuple:
    """The train command's own run of `train_args` (its whole command line, --model_dir included), with
    `reporter` as an extra epoch-end action.

    Returns:
        (Optuna's state: COMPLETE, PRUNED or FAIL; {"pruned_epoch": e} (a fold's also "pruned_fold": k) or
        {"failed": its one line} or {}).
    """
    import optuna
    from absl.testing import flagsaver

    from salt_tf import loop, train

    fold = {} if reporter.fold is None else {"pruned_fold": reporter.fold}
    where = "" if reporter.fold is None else f"fold {reporter.fold}: "
    with flagsaver.flagsaver(), loop.extra_epoch_end(reporter):
        flags.FLAGS.unparse_flags()  # from the defaults, not the previous trial's values
        train.parse_train_argv(["train", *train_args])
        try:
            train.run(stop_signals)
        except loop.StopAfterEpoch:
            return optuna.trial.TrialState.PRUNED, {"pruned_epoch": reporter.pruned_epoch, **fold}
        except loop.TrainingStopped as e:
            if e.exit_code > 128:
                raise
            return optuna.trial.TrialState.FAIL, {"failed": f"{where}{e}"}
        except train_user_errors() as e:  # e.g. S/trial-n holds a run of other flags: nothing was trained
            refuse_trial(trial, f"trial {trial.number}: {where}{e}")
    return optuna.trial.TrialState.COMPLETE, {}


def finish_trial(trial, run_dir: str, record: dict, objective: str, state, outcome: dict) -> str:
    """Tells the study the trial's state and value (its best `objective`, trial_value), records both in the
    study and in record.json, says it in one line; returns the state's name."""
    import optuna

    value = trial_value(run_dir, objective)
    if state == optuna.trial.TrialState.COMPLETE and value is None:
        state, outcome = optuna.trial.TrialState.FAIL, {"failed": "no epoch finished"}
    return tell_trial(trial, {run_dir: record}, state, value, outcome)


def finish_fold_trial(trial, parent: str, record: dict, state, outcome: dict, values: list) -> str:
    """finish_trial of a fold trial: its value is fold_mean(values) (values[k]: fold k's best objective, None
    for a fold without an epoch); every fold's record.json gets the `sweep` entry with its fold, fold_value and
    the trial's fold_values, state, value and (pruned) pruned_fold and pruned_epoch."""
    import optuna

    from salt_tf import rundir

    missing = [k for k, v in enumerate(values) if v is None]
    if state == optuna.trial.TrialState.COMPLETE and missing:
        state, outcome = optuna.trial.TrialState.FAIL, {"failed": f"fold {missing[0]}: no epoch finished"}
    trial.study._storage.set_trial_user_attr(trial._trial_id, sweep_report.FOLD_VALUES_ATTR, values)
    dirs = {d: dict(record, fold=k, fold_value=values[k], fold_values=values)
            for k, d in rundir.fold_dirs(parent).items()
            if k < len(values) and os.path.isfile(os.path.join(d, rundir.RECORD_FILE))}
    return tell_trial(trial, dirs, state, fold_mean(values), outcome)


def tell_trial(trial, records_by_dir: dict[str, dict], state, value: float | None, outcome: dict) -> str:
    """Tells the study the trial's state and value, records the outcome as trial attributes and in each run
    directory's record.json (`sweep`: its entry plus state, value and the outcome), says it in one line;
    returns the state's name."""
    import optuna

    from salt_tf import records

    for key, attr in (("pruned_epoch", sweep_report.PRUNED_ATTR), ("pruned_fold", sweep_report.PRUNED_FOLD_ATTR),
                      ("failed", sweep_report.FAILED_ATTR)):
        if key in outcome:
            trial.study._storage.set_trial_user_attr(trial._trial_id, attr, outcome[key])
    for run_dir, record in records_by_dir.items():
        records.update_record(run_dir, sweep=dict(record, state=state.name.lower(), value=value, **outcome))
    trial.study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    pruned = ""
    if "pruned_epoch" in outcome:
        pruned = f" (pruned after epoch {outcome['pruned_epoch']}" + (
            f" of fold {outcome['pruned_fold']})" if "pruned_fold" in outcome else ")")
    say(f"trial {trial.number} {state.name.lower()}" + (f", value {value:.4f}" if value is not None else "") +
        pruned + (f": {outcome['failed']}" if "failed" in outcome else ""))
    return state.name.lower()


def say(message: str) -> None:
    print(f"sweep: {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# sweep run.


def define_run_flags(flag_values: flags.FlagValues) -> None:
    """The flags of `sweep run` itself (every other argument is the trials' train command's)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("sweep_dir", None, "The sweep folder: trial n's run directory is <sweep_dir>/trial-<n>; "
                        "the default storage is <sweep_dir>/study.db.", **fv)
    flags.DEFINE_string("space", None, "The search space, a YAML file: flag: {float|log_float|int|log_int: "
                        "[LOW, HIGH]} or {categorical: [A, B]} (e.g. flags/sweep_lr.yaml).", **fv)
    flags.DEFINE_integer("trials", None, "The study's trial budget: all workers together run this many trials "
                         "(complete, pruned or failed).", lower_bound=1, **fv)
    flags.DEFINE_string("study", None, "The study's name (default: the sweep folder's name).", **fv)
    flags.DEFINE_string("storage", None, "Where the study lives: an SQLAlchemy URL (sqlite:///PATH, "
                        "postgresql://USER:PASSWORD@HOST:PORT/DB) or journal:PATH (a journal file on a shared file "
                        "system). Default: sqlite:///<sweep_dir>/study.db.", **fv)
    flags.DEFINE_enum("sampler", "tpe", ["tpe", "random", "cmaes"], "Optuna's sampler.", **fv)
    flags.DEFINE_integer("seed", 0, "The sampler's seed (re-seeded per trial from seed and trial number).", **fv)
    flags.DEFINE_enum("pruner", "median", ["median", "hyperband", "threshold", "none"], "median: stop a trial "
                      "whose value after an epoch is below the median of the complete trials' at that epoch (a "
                      "fold sweep: that epoch of that fold); hyperband; threshold: below --prune_below; none.",
                      **fv)
    flags.DEFINE_integer("prune_from_epoch", 1, "No pruning before this epoch (a fold sweep: of each fold).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("prune_startup_trials", 2, "median: no pruning until this many trials are complete.",
                         lower_bound=0, **fv)
    flags.DEFINE_float("prune_below", 0.0, "threshold: prune a trial whose value after an epoch is below this.",
                       **fv)
    flags.DEFINE_enum("objective", "val_metric", list(OBJECTIVES), "The metrics.csv column whose best value over "
                      "a trial's epochs is the trial's value (maximized); in a fold sweep (--folds=K among the "
                      "train flags) the trial's value is the mean over its K folds of each fold's best.", **fv)
    flags.DEFINE_multi_string("enqueue", [], "FLAG=VALUE,...: a trial to run first (e.g. the shipped recipe's "
                              "values), when the study is created; repeatable.", **fv)


def check_run_arguments(fv: flags.FlagValues, train_args: list[str]) -> None:
    """The sweep's own required flags, and no --model_dir among the train flags (the sweep sets it)."""
    for name in ("sweep_dir", "space", "trials"):
        if fv[name].value is None:
            raise SweepError(f"--{name} is required (--help lists the flags)")
    for arg in train_args:
        if arg.startswith("--model_dir"):
            raise SweepError("--model_dir: the sweep sets it for each trial (<sweep_dir>/trial-<n>); drop it")


def prepare(fv: flags.FlagValues, train_args: list[str]):
    """Every check before a trial, then the study: (study, space, K of a fold sweep or 0, its fold_stride or 0).
    Nothing is written before the storage opens, and the sweep folder is created only for the default storage,
    which lives in it."""
    check_run_arguments(fv, train_args)
    space = load_space(fv.space)
    enqueued = parse_enqueued(fv.enqueue, space)
    base, fold_sweep = check_train_flags(train_args, space, enqueued, fv.space)
    folds = int(base["folds"]) if fold_sweep else 0  # --folds=K --fold=k: one-run trials on fold k
    stride = fold_stride(base, space) if folds >= 2 else 0
    if folds >= 2:
        check_fold_trials(train_args, fv.sweep_dir)
    if fv.storage is None:
        os.makedirs(fv.sweep_dir, exist_ok=True)
    storage = sweep_report.open_storage(sweep_report.storage_url(fv.storage, fv.sweep_dir))
    attrs = {sweep_report.SPACE_ATTR: space_json(space), sweep_report.BASE_ATTR: base,
             sweep_report.OBJECTIVE_ATTR: fv.objective}
    pruner = make_pruner(fv, folds * stride if folds >= 2 else int(base["epochs"]))
    study = open_study(storage, fv.study or sweep_report.default_study_name(fv.sweep_dir), attrs, enqueued,
                       make_sampler(fv.sampler, fv.seed), pruner)
    return study, space, folds, stride


def run_sweep(fv: flags.FlagValues, train_args: list[str]) -> int:
    """`sweep run`: one worker, until the study's budget is used (adopting orphaned trials first)."""
    from absl import logging

    logging.set_verbosity(logging.INFO)
    stop_signals = _PROCESS_STOP_SIGNALS or StopSignals()
    study, space, folds, stride = prepare(fv, train_args)
    os.makedirs(fv.sweep_dir, exist_ok=True)
    say(f"study {study.study_name} in {sweep_report.shown_url(sweep_report.storage_url(fv.storage, fv.sweep_dir))}: "
        f"{sum(sweep_report.counted(t) for t in study.get_trials(deepcopy=False))} of {fv.trials} trials asked "
        "for so far")
    installed_here = stop_signals.install()
    done = {}
    try:
        while True:
            stop_signals.raise_if_requested()
            taken, resumed = adopt_orphan(study, fv.sweep_dir), True
            if taken is None and budget_left(study, fv.trials):
                taken, resumed = new_trial(study, fv.sweep_dir, fv.trials, space), False
                if taken is None and budget_left(study, fv.trials):
                    continue  # another worker adopted the trial we asked for
            if taken is None:
                break
            trial, held = taken
            try:
                state = run_trial(trial, fv, train_args, stop_signals, resumed, folds, stride)
            finally:
                held.release()
            done[state] = done.get(state, 0) + 1
    except KeyboardInterrupt:  # a signal between trials, or a second one: no trial was left half-saved
        cli.error("interrupted; the same command resumes the study (a running trial from its last checkpoint)")
        return 128 + (stop_signals.signum or signal.SIGINT)
    finally:
        if installed_here:
            stop_signals.restore()
    return _finish(fv, study, done)


def _finish(fv: flags.FlagValues, study, done: dict) -> int:
    """The worker's last line: what it ran, what the study holds, how to see it."""
    mine = ", ".join(f"{n} {s}" for s, n in done.items()) or "nothing left to run"
    say(f"this worker: {mine}; the study: {sum(sweep_report.counted(t) for t in study.get_trials(deepcopy=False))}"
        f" of {fv.trials} trials; `python -m salt_tf.sweep report --sweep_dir={fv.sweep_dir}"
        + (f" --storage={sweep_report.shown_url(fv.storage)}" if fv.storage else "")
        + (f" --study={fv.study}" if fv.study else "") + "` shows them")
    return 0


def run_command(fv: flags.FlagValues, train_args: list[str]) -> int:
    """`sweep run`, with a trial's signal stop as its exit status (130 / 143, the trial checkpointed)."""
    cv.train_flags()  # TensorFlow started by tfstart (no CUDA noise) before salt_tf.loop imports it
    from salt_tf import loop

    try:
        return run_sweep(fv, train_args)
    except loop.TrainingStopped as e:
        cli.error(f"{e} (this sweep command: it resumes the study and this trial)")
        return e.exit_code


def train_flags_help() -> str:
    """What `sweep run --help` shows after its own flags: the train command's flags, which it passes on."""
    salt_flags = cv.train_flags()
    return ("Every other argument goes to each trial's train command (--flagfile=F and any train flag below); the "
            "sweep adds the trial's values and --model_dir=<sweep_dir>/trial-<n>. With --folds=K (K >= 2, no "
            "--fold) each trial is a cross-validation: the sweep trains its folds one after another as cv train "
            "does, --fold=k --model_dir=<sweep_dir>/trial-<n>/fold-k ({fold} in an argument becomes k).\n\n" +
            flags.FLAGS.module_help(salt_flags.__name__))


def _user_errors() -> tuple[type, ...]:
    return (SweepError,)


PROGRAM = cli.Program(
    module="salt_tf.sweep",
    overview="\n\n".join(__doc__.split("\n\n")[:3]),  # the usage, a worker's trials, fold sweeps
    commands=(
        cli.Subcommand(name="run", summary="one hyperparameter-sweep worker: Optuna trials, each a run directory, "
                       "until the study's budget is used", usage="--sweep_dir=DIR --space=SPACE.yaml --trials=N "
                       "[--storage=URL] [train flags]", define_flags=define_run_flags, run=run_command,
                       passes_on=train_flags_help),
        sweep_report.REPORT,
    ),
    user_errors=(SweepError,), writes=True)


def main(argv: list[str] | None = None) -> int:
    return cli.main(PROGRAM, sys.argv if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
