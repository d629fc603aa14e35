"""The competition pipeline in one resumable command: K folds of a recipe, their out-of-fold (OOF) score,
pseudo-labels of the unlabelled images, a second round of folds on them, the fold ensemble's choice, the
submission and a release.

    python -m salt_tf.competition --flagfile=flags/pipeline.cfg --parent=runs/v2 [--dry_run] [--until=STAGE]

Each stage is an existing command, still usable alone, run as its own process (output prefixed [stage], and
appended to <parent>/logs/<stage>.log):

    round1    python -m salt_tf.cv train --flagfile=<recipe> --parent=<parent>/round1 [--round1_flag ...]
    pseudo-k  python -m salt_tf.cv pseudo --model_dir=<parent>/round1/fold-k --images=<test_images>
                  --output=<parent>/pseudo/fold-k [--pseudo_flag ...]          (--pseudo=leak_free, each fold k)
    pseudo    ... --model_dir=<parent>/round1 --output=<parent>/pseudo/all      (--pseudo=shared)
    round2    python -m salt_tf.cv train --flagfile=<recipe> --parent=<parent>/round2
                  --extra_data_dir=<parent>/pseudo/fold-{fold} [--init_checkpoint=<parent>/round1/fold-{fold}]
                  [--round2_flag ...]
    compare   python -m salt_tf.cv compare <parent>/round1 <parent>/round2
    evaluate  python -m salt_tf.predict evaluate --model_dir=<final round> [--evaluate_flag ...]
    submit    python -m salt_tf.predict submit --model_dir=<final round> --images=<test_images>
                  --output=<submission> [--submit_flag ...]
    release   python -m salt_tf.runs release <final round> --into=<release_into> [--release_flag ...]

**Leak-free pseudo-labels** (--pseudo=leak_free, the default): fold k of round 2 trains on the pseudo-labels of
round 1's fold-k model alone, the one model that never saw fold k's validation images (every other fold model
trained on them), and with --round2_init starts from that same model; so round 2's OOF score, and its
comparison with round 1's, is honest. --pseudo=shared labels once with the whole round-1 fold ensemble (better
labels, but fold k's labels then carry what the other folds learnt of fold k's images: its OOF gain is
optimistic). --pseudo=none stops after round 1 (the final round is round 1).

<parent>/pipeline.json (salt_tf.rundir.PIPELINE_FILE, written atomically at every change) records the plan:
each stage's command, status (pending, running, done, failed, stopped), attempts, seconds, start and end, and
its forward-FLOP budget. Rerunning the same command skips the finished stages (one line each says so) and
resumes the unfinished one: its command resumes itself (cv train resumes its folds from their checkpoints;
pseudo-labels and releases are written whole, so a folder that exists is a finished stage). A finished stage
is never redone with another command: change flags of a finished stage and the command stops with one line
(give a new --parent). --dry_run prints the plan, each stage's status and FLOP budget, and writes nothing.

The planner parses the folds' train flags with the train command's own parser (cv.plan_folds' way), so it
starts TensorFlow for that; everything else here is files and processes. Exit status: 0 done (or stopped by
--until), 1 a stage failed (its lines above and its log say why; rerun to resume), 2 a bad flag or path (one
line, nothing written), 130/143 stopped by Ctrl-C/SIGTERM (the running stage checkpoints; rerun to resume).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from typing import Sequence

from absl import flags

from salt_tf import cli, cv, rundir, tta
from salt_tf.data import kaggle

ROUND1, ROUND2, PSEUDO, COMPARE, EVALUATE, SUBMIT, RELEASE = (
    "round1", "round2", "pseudo", "compare", "evaluate", "submit", "release")
SHARED_PSEUDO = "all"  # <parent>/pseudo/all: the labels of --pseudo=shared
PSEUDO_MODES = ("leak_free", "shared", "none")
STAGE_FLAGS = (ROUND1, PSEUDO, ROUND2, EVALUATE, SUBMIT, RELEASE)  # each has --<stage>_flag (repeatable)
PENDING, RUNNING, DONE, FAILED, STOPPED = "pending", "running", "done", "failed", "stopped"


class PipelineError(ValueError):
    """A bad flag, path or parent folder; the command prints it as one line and exits 2."""


def _say(message: str = "") -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Flags.


def define_flags(flag_values: flags.FlagValues) -> None:
    """The pipeline's own flags (a FlagValues of its own: the stages' flags are their commands')."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("parent", None, "The pipeline's folder: round1/, pseudo/, round2/, logs/, pipeline.json, "
                        "the submission. New, or one this command made (rerun to resume).", **fv)
    flags.DEFINE_string("recipe", None, "The folds' train flagfile (with --folds=K), e.g. flags/recipe_cv.cfg; "
                        "both rounds train it.", **fv)
    flags.DEFINE_string("test_images", None, "The unlabelled images: pseudo-labelled and submitted, e.g. "
                        "<data>/test/images.", **fv)
    flags.DEFINE_enum("pseudo", "leak_free", PSEUDO_MODES, "leak_free: fold k of round 2 learns the labels of "
                      "round 1's fold-k model only (honest OOF); shared: the labels of round 1's fold ensemble "
                      "(optimistic OOF); none: no round 2.", **fv)
    flags.DEFINE_boolean("round2_init", True, "Round 2's fold k starts from round 1's fold-k model "
                         "(--init_checkpoint); else from scratch.", **fv)
    for stage in STAGE_FLAGS:
        flags.DEFINE_multi_string(f"{stage}_flag", [], f"An argument for the {stage} stage's command (repeat "
                                  "the flag for several), e.g. --round2_flag=--epochs=20.", **fv)
    flags.DEFINE_string("submission", None, "The submission CSV (default: <parent>/submission.csv).", **fv)
    flags.DEFINE_string("release_into", None, "Release the final fold ensemble here (runs release), e.g. "
                        "models/salt-v2; none: no release stage.", **fv)
    flags.DEFINE_string("until", None, "Stop after this stage (a name of the plan: round1, pseudo-0, ...).", **fv)
    flags.DEFINE_boolean("dry_run", False, "Print the plan (stages, commands, status, FLOP budgets); run nothing, "
                         "write nothing.", **fv)


@dataclasses.dataclass(frozen=True)
class Options:
    """The parsed pipeline flags (define_flags), with paths as given."""
    parent: str
    recipe: str
    test_images: str
    pseudo: str = "leak_free"
    round2_init: bool = True
    stage_flags: dict = dataclasses.field(default_factory=dict)  # {stage: [argument, ...]}
    submission: str | None = None
    release_into: str | None = None

    @classmethod
    def from_flags(cls, fv: flags.FlagValues) -> "Options":
        """Options of parsed flags; PipelineError names a required flag that is missing."""
        for name in ("parent", "recipe", "test_images"):
            if not fv[name].value:
                raise PipelineError(f"--{name} is required (--help lists the flags)")
        return cls(parent=fv.parent, recipe=fv.recipe, test_images=fv.test_images, pseudo=fv.pseudo,
                   round2_init=fv.round2_init, stage_flags={s: list(fv[f"{s}_flag"].value) for s in STAGE_FLAGS},
                   submission=fv.submission, release_into=fv.release_into)

    def extra(self, stage: str) -> list[str]:
        return list(self.stage_flags.get(stage, []))


# ---------------------------------------------------------------------------------------------------------
# The plan: the stages, their commands and FLOP budgets.


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the pipeline: an existing command of salt_tf."""
    name: str
    argv: tuple[str, ...]       # the command after `python`: ("-m", "salt_tf.cv", "train", ...)
    what: str                   # what it makes, one line
    tflop: float = 0.0          # forward TFLOP budget (training images x epochs + images predicted x views)
    bound: bool = False         # tflop is an upper bound (the pseudo-labels it trains on are not made yet)
    output: str | None = None   # a folder the command writes whole: its existence means the stage finished

    def command(self) -> list[str]:
        """The command as recorded and printed (`python -m ...`; run with this interpreter)."""
        return ["python", *self.argv]


def _count(path: str) -> int | None:
    """Rows of a labelled folder's train.csv (None while it does not exist)."""
    return len(kaggle.read_train_csv(path)) if os.path.isfile(os.path.join(path, kaggle.TRAIN_FILE)) else None


def train_stage(name: str, parent: str, train_args: list[str], budget: cv.FoldBudget,
                extra_images: Sequence[int | None], unlabelled: int, what: str) -> Stage:
    """`cv train` of a K-fold into `parent` (it also collects the OOF predictions).

    Budget, forward TFLOP: per fold and epoch every labelled image (training or validation) and the fold's extra
    images, plus collect's models x views on every labelled image. `extra_images`: fold k's extra
    (pseudo-labelled) images, [] for none, None where they are not made yet: then counted as all `unlabelled`
    images, an upper bound."""
    labelled = _count(budget.data_dir) or 0
    views = len(tta.parse_tta(cv.DEFAULT_TTA))
    extra = sum(unlabelled if n is None else n for n in extra_images)
    total = budget.epochs * (budget.folds * labelled + extra) + labelled * views * budget.models
    return Stage(name, ("-m", "salt_tf.cv", "train", *train_args, f"--parent={parent}"), what,
                 tflop=total * budget.gflop / 1e3, bound=any(n is None for n in extra_images))


def predict_cost(images: int, models: int, budget: cv.FoldBudget, views: int) -> float:
    """Forward TFLOP of predicting `images` with `models` models and `views` TTA views each."""
    return images * models * views * budget.gflop / 1e3


def plan(o: Options) -> list[Stage]:
    """The stages of the options, in order, with their commands and FLOP budgets.

    Raises:
        flags.Error or cv.CVError (one line): a bad train flag of a round (the train command's own checks).
        kaggle.DataError: no --test_images folder.
    """
    tests, views = len(kaggle.list_images(o.test_images)), len(tta.parse_tta(cv.DEFAULT_TTA))
    round1, round2 = (os.path.join(o.parent, r) for r in (ROUND1, ROUND2))
    recipe = [f"--flagfile={o.recipe}"]
    budget = cv.fold_budget(recipe + o.extra(ROUND1))
    k = budget.folds
    stages = [train_stage(ROUND1, round1, recipe + o.extra(ROUND1), budget, [], tests,
                          f"{k} folds of {o.recipe}, their OOF predictions")]
    final = round1
    if o.pseudo != "none":
        stages += pseudo_stages(o, round1, budget, tests, views)
        labels = (rundir.fold_dir(os.path.join(o.parent, PSEUDO), cv.FOLD_FIELD) if o.pseudo == "leak_free"
                  else os.path.join(o.parent, PSEUDO, SHARED_PSEUDO))
        args = recipe + [f"--extra_data_dir={labels}"]
        if o.round2_init:
            args.append(f"--init_checkpoint={rundir.fold_dir(round1, cv.FOLD_FIELD)}")
        args += o.extra(ROUND2)
        budget2 = cv.fold_budget(args)
        extra = [_count(labels.replace(cv.FOLD_FIELD, str(f))) for f in range(k)]
        stages.append(train_stage(ROUND2, round2, args, budget2, extra, tests,
                                  f"{k} folds trained on the labelled images and the pseudo-labels"))
        stages.append(Stage(COMPARE, ("-m", "salt_tf.cv", "compare", round1, round2),
                            "round 2 - round 1, image by image, with a paired bootstrap interval"))
        final, budget = round2, budget2
    return stages + final_stages(o, final, budget, tests, views)


def pseudo_stages(o: Options, round1: str, budget: cv.FoldBudget, tests: int, views: int) -> list[Stage]:
    """cv pseudo: one stage per fold (leak_free, fold k's model) or one for the fold ensemble (shared)."""
    command = ("-m", "salt_tf.cv", "pseudo")
    if o.pseudo == "shared":
        output = os.path.join(o.parent, PSEUDO, SHARED_PSEUDO)
        return [Stage(PSEUDO, (*command, f"--model_dir={round1}", f"--images={o.test_images}", f"--output={output}",
                               *o.extra(PSEUDO)), "pseudo-labels of the round-1 fold ensemble (leaks, see --help)",
                      predict_cost(tests, budget.folds * budget.models, budget, views), output=output)]
    stages = []
    for k in range(budget.folds):
        output = rundir.fold_dir(os.path.join(o.parent, PSEUDO), k)
        stages.append(Stage(f"{PSEUDO}-{k}", (*command, f"--model_dir={rundir.fold_dir(round1, k)}",
                                              f"--images={o.test_images}", f"--output={output}", *o.extra(PSEUDO)),
                            f"fold {k}'s pseudo-labels, from the one model that never saw its validation images",
                            predict_cost(tests, budget.models, budget, views), output=output))
    return stages


def final_stages(o: Options, final: str, budget: cv.FoldBudget, tests: int, views: int) -> list[Stage]:
    """The final round's evaluate (from its oof.npz: nothing predicted), submit and, with --release_into,
    release."""
    submission = o.submission or os.path.join(o.parent, "submission.csv")
    stages = [Stage(EVALUATE, ("-m", "salt_tf.predict", "evaluate", f"--model_dir={final}", *o.extra(EVALUATE)),
                    "the fold ensemble's combination, threshold, post-processing and gate, chosen by OOF cv"),
              Stage(SUBMIT, ("-m", "salt_tf.predict", "submit", f"--model_dir={final}", f"--images={o.test_images}",
                             f"--output={submission}", *o.extra(SUBMIT)), f"the submission {submission}",
                    predict_cost(tests, budget.folds * budget.models, budget, views))]
    if o.release_into:
        stages.append(Stage(RELEASE, ("-m", "salt_tf.runs", "release", final, f"--into={o.release_into}",
                                      *o.extra(RELEASE)), f"the release {o.release_into}", output=o.release_into))
    return stages


# ---------------------------------------------------------------------------------------------------------
# The status file and the parent folder.


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def check_parent(o: Options, stages: Sequence[Stage]) -> dict:
    """The parent's status (pipeline.json, {} for a new parent), checked against the plan before anything runs.

    Raises:
        PipelineError: the parent is a file, or a folder this command did not make (it holds something but
            the plan's folders and no pipeline.json), or a finished stage's recorded command differs from the
            plan's (one line naming the stage and the fix).
    """
    if os.path.exists(o.parent) and not os.path.isdir(o.parent):
        raise PipelineError(f"--parent={o.parent}: a file; give a folder (new, or one this command made)")
    path = os.path.join(o.parent, rundir.PIPELINE_FILE)
    if not os.path.isfile(path):
        ours = {ROUND1, ROUND2, PSEUDO, rundir.PIPELINE_LOGS, rundir.LOCK_FILE}
        foreign = sorted(set(os.listdir(o.parent)) - ours) if os.path.isdir(o.parent) else []
        if foreign:
            raise PipelineError(f"--parent={o.parent}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
                                f" and no {rundir.PIPELINE_FILE}: not a pipeline folder; give a new folder")
        return {}
    status = rundir.read_json(path)
    for stage in stages:
        recorded = status.get("stages", {}).get(stage.name, {})
        if recorded.get("status") == DONE and recorded.get("command") != stage.command():
            raise PipelineError(f"{stage.name}: finished with another command ({shlex.join(recorded['command'])}); "
                                f"a finished stage is not redone: give a new --parent, or the flags it ran with")
    return status


def stage_record(status: dict, stage: Stage) -> dict:
    """The stage's entry of the status, created pending, its command and budget the plan's."""
    record = status.setdefault("stages", {}).setdefault(stage.name, {"status": PENDING, "attempts": 0,
                                                                      "seconds": 0.0})
    record.update(command=stage.command(), tflop_forward=round(stage.tflop, 1), tflop_upper_bound=stage.bound)
    return record


def write_status(parent: str, status: dict, stages: Sequence[Stage]) -> None:
    """pipeline.json, atomically (rundir.write_json), the stages in plan order."""
    status["plan"] = [s.name for s in stages]
    status["stages"] = {s.name: status["stages"][s.name] for s in stages}
    rundir.write_json(os.path.join(parent, rundir.PIPELINE_FILE), status)


def output_finished(stage: Stage, record: dict) -> bool:
    """Whether a stage that writes one folder whole finished after its last start without the status saying so
    (stopped between the write and the status): its folder exists and is newer than the start."""
    if not stage.output or not os.path.isdir(stage.output) or record.get("status") == DONE:
        return False
    started = record.get("started_unix")
    return started is not None and os.path.getmtime(stage.output) >= started


# ---------------------------------------------------------------------------------------------------------
# Running.


class _Tee:
    """A stage's output: to stdout and appended to its log file (what run_processes writes to)."""

    def __init__(self, log_path: str):
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self.log = open(log_path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        self.log.write(text)

    def flush(self) -> None:
        sys.stdout.flush()
        self.log.flush()


def run_stage(o: Options, stage: Stage, status: dict, stages: Sequence[Stage]) -> int:
    """Runs one stage's command to its end (cv.run_processes: Ctrl-C/SIGTERM stop it cleanly and re-raise),
    with the status written before and after.

    Returns:
        The command's exit status.
    """
    record = stage_record(status, stage)
    record.update(status=RUNNING, attempts=record["attempts"] + 1, started=_now(), started_unix=time.time())
    record.pop("finished", None)
    write_status(o.parent, status, stages)
    if stage.output:  # commands that write a folder whole want its parent to exist (<parent>/pseudo, models/)
        os.makedirs(os.path.dirname(os.path.abspath(stage.output)), exist_ok=True)
    _say(f"pipeline: {stage.name} ({stage.what}), attempt {record['attempts']}: {shlex.join(stage.command())}")
    tee, began, code = _Tee(os.path.join(o.parent, rundir.PIPELINE_LOGS, f"{stage.name}.log")), time.time(), None
    try:
        code = cv.run_processes({stage.name: [sys.executable, *stage.argv]}, 1, out=tee)[stage.name]
    finally:
        tee.log.close()
        record.update(seconds=round(record["seconds"] + time.time() - began, 1), exit_status=code,
                      status=STOPPED if code is None else (DONE if code == 0 else FAILED))
        if code == 0:
            record["finished"] = _now()
        write_status(o.parent, status, stages)
    return code


def run(o: Options, until: str | None) -> int:
    """Plans, checks, then runs every unfinished stage in order (skipping finished ones with a line each).

    Returns:
        0 when every stage (or every stage up to `until`) is done; the failing stage's exit status otherwise
        (1, or 2 when its command refused a flag or path).
    """
    stages = plan(o)
    names = [s.name for s in stages]
    if until is not None and until not in names:
        raise PipelineError(f"--until={until}: not a stage of this plan ({', '.join(names)})")
    status = check_parent(o, stages)
    lock = _lock(o.parent)
    try:
        status.setdefault("created", _now())
        records = {stage.name: stage_record(status, stage) for stage in stages}
        for stage in stages:
            record = records[stage.name]
            if output_finished(stage, record):
                record.update(status=DONE, finished=_now())
                _say(f"pipeline: {stage.name}: its folder {stage.output} was written whole after the last start; "
                     "done")
            if record["status"] == DONE:
                _say(f"pipeline: {stage.name}: done (skipped; finished {record.get('finished', '?')})")
            else:
                code = run_stage(o, stage, status, stages)
                if code:
                    cli.error(f"stage {stage.name} stopped with exit status {code}; its lines above (and "
                              f"{os.path.join(o.parent, rundir.PIPELINE_LOGS, stage.name + '.log')}) say why; "
                              "rerun the same command to resume")
                    return 2 if code == 2 else 1
            if stage.name == until:
                write_status(o.parent, status, stages)
                _say(f"pipeline: stopped after {until} (--until); rerun without it to go on")
                return 0
        write_status(o.parent, status, stages)
        _say(format_plan(stages, status))
        return 0
    finally:
        lock.release()


def _lock(parent: str):
    """The parent's one-writer lock (records.RunDirLock): two pipelines never run one parent."""
    from salt_tf import records

    try:
        return records.RunDirLock(parent)
    except records.RunDirBusy:
        raise PipelineError(f"--parent={parent} is in use by another pipeline process; wait for it or stop it "
                            "(it resumes when rerun)") from None


# ---------------------------------------------------------------------------------------------------------
# The table and the command line.


def format_plan(stages: Sequence[Stage], status: dict) -> str:
    """The plan as a table: stage, status, attempts, hours spent, forward TFLOP budget, what it makes; then the
    total and each command."""
    rows = [("stage", "status", "attempts", "hours", "TFLOP fwd", "makes")]
    total = 0.0
    for stage in stages:
        record = status.get("stages", {}).get(stage.name, {})
        total += stage.tflop
        rows.append((stage.name, record.get("status", PENDING), str(record.get("attempts", 0)),
                     f"{record.get('seconds', 0.0) / 3600:.2f}", ("<= " if stage.bound else "") + f"{stage.tflop:,.1f}",
                     stage.what))
    bound = "<= " if any(s.bound for s in stages) else ""
    rows.append(("total", "", "", f"{sum(status.get('stages', {}).get(s.name, {}).get('seconds', 0.0) for s in stages) / 3600:.2f}",
                 f"{bound}{total:,.1f}", "forward TFLOP: training images x epochs + predicted images x views x models"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows]
    lines += ["", "commands:"] + [f"  {s.name}: {shlex.join(s.command())}" for s in stages]
    return "\n".join(lines)


def dry_run(o: Options) -> int:
    """--dry_run: the plan with the parent's status (if any); writes nothing. Returns 0."""
    stages = plan(o)
    status = check_parent(o, stages)
    _say(format_plan(stages, status))
    _say("(dry run: nothing was run or written)")
    return 0


FLAGS = flags.FlagValues()
define_flags(FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (module docstring)."""
    argv = list(sys.argv if argv is None else argv)
    if any(a in cli.HELP for a in argv[1:]):
        _say("\n\n".join(__doc__.split("\n\n")[:3]) + "\n")
        _say(FLAGS.get_help())
        return 0

    def body() -> int:
        FLAGS.unparse_flags()
        rest = FLAGS(argv)[1:]
        if rest:
            raise PipelineError(f"unexpected argument {' '.join(rest)}: flags take the form --name=value")
        options = Options.from_flags(FLAGS)
        return dry_run(options) if FLAGS.dry_run else run(options, FLAGS.until)

    try:
        return cli.run_reporting(body, (PipelineError, cv.CVError, kaggle.DataError, rundir.RunDirError),
                                 output=lambda: FLAGS.parent or "")
    except KeyboardInterrupt:
        print("stopped: Ctrl-C; the running stage wrote a checkpoint; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    except cv._Stopped:
        print("stopped: SIGTERM; the running stage wrote a checkpoint; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 143


if __name__ == "__main__":
    sys.exit(main())
