"""The command-line style of salt_tf: absl flags, subcommands, one-line errors.

Every command parses its flags with absl (`train` with absl's global FLAGS and `app.run`; the others with a
private `flags.FlagValues` per command, so one process can import them all). A command with modes is a
`Program` of `Subcommand`s, run by `main`:

    python -m salt_tf.predict submit --model_dir=runs/a --images=... --output=...
    python -m salt_tf.predict evaluate --model_dir=runs/a
    python -m salt_tf.runs diff runs/a runs/b --plot=ab.png

`<program> --help` lists the subcommands, `<program> <subcommand> --help` that subcommand's flags only. A
subcommand may pass the arguments it does not define on to another command (`cv train` to each fold's train
command: `Subcommand.passes_on`).
Anything a user can get wrong (a flag, a missing or stray argument, an unknown subcommand, a path the command
cannot use) is ONE line on stderr, `error: ...`, and exit status 2, before anything is written; a failing
write is one line and exit status 1.

Also here: the flags that choose a run's models, shared by `predict` and `serving` (`define_model_flags`).
This module imports no TensorFlow and nothing of salt_tf.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Sequence

from absl import flags

# The flags that the helpers below define belong to the command that calls them (its --help lists them
# under its own name), not to this module.
flags.disclaim_key_flags()

HELP = ("--help", "-h", "--helpfull")


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One mode of a command: its flags (in a FlagValues of its own) and what it runs.

    Attributes:
        name: the word after the program, e.g. "submit".
        summary: one line saying what it does (the program's --help, `python -m salt_tf`).
        usage: the arguments after the name, shown by its --help, e.g. "--model_dir=RUN --images=DIR".
        define_flags: registers its flags in the FlagValues it is given.
        run: `run(flag_values, *arguments)` -> exit status.
        arguments: names of its positional arguments, in order (e.g. ("RUN_A", "RUN_B")); none by default.
        description: printed by its --help between the usage line and the flags.
        passes_on: for a subcommand that hands every argument it does not define to another command (cv train:
            each fold's train command), the help of those arguments (printed by its --help after its own
            flags; called only then, so it may be slow); `run(flag_values, others)` then gets them as one list.
            None: every argument is its own.
    """

    name: str
    summary: str
    usage: str
    define_flags: Callable[[flags.FlagValues], None]
    run: Callable[..., int]
    arguments: tuple[str, ...] = ()
    description: str = ""
    passes_on: Callable[[], str] | None = None


@dataclasses.dataclass(frozen=True)
class Program:
    """A command with subcommands, e.g. `python -m salt_tf.predict`.

    Attributes:
        module: its module, e.g. "salt_tf.predict" (run as `python -m <module>`).
        overview: printed by `--help` above the list of subcommands.
        commands: its subcommands.
        user_errors: exception types whose message is one line naming the path or flag and the fix (exit 2).
        writes: whether it writes files: a failing write (OSError) is then one line with exit status 1.
        old_form: for a command line that does not start with a subcommand, the one line naming the new form
            of an old command line (None: not an old form).
    """

    module: str
    overview: str
    commands: tuple[Subcommand, ...]
    user_errors: tuple[type, ...] = ()
    writes: bool = False
    old_form: Callable[[list[str]], str | None] | None = None

    @property
    def command_line(self) -> str:
        return f"python -m {self.module}"


def main(program: Program, argv: Sequence[str]) -> int:
    """Runs the subcommand `argv` names.

    Args:
        program: the command.
        argv: the command line, the program name first (sys.argv).

    Returns:
        The exit status: the subcommand's, 0 after a --help, 2 for a user's error, 1 for a failing write.
    """
    argv = list(argv)
    command = _choose(program, argv)
    if not isinstance(command, Subcommand):
        return command
    if any(a in HELP for a in argv[2:]):
        print_subcommand_help(program, command)
        return 0

    def body():
        flag_values, arguments = parse(program, command, argv)
        return command.run(flag_values, *arguments)

    return run_reporting(body, program.user_errors, (lambda: "") if program.writes else None)


def _choose(program: Program, argv: list[str]) -> Subcommand | int:
    """The subcommand argv[1] names; else an exit status, after the overview (--help) or one error line."""
    by_name = {c.name: c for c in program.commands}
    first = argv[1] if len(argv) > 1 else None
    if first in by_name:
        return by_name[first]
    if first is not None and any(a in HELP for a in argv[1:]):
        print(overview_help(program), flush=True)
        return 0
    message = program.old_form(argv) if program.old_form and first is not None else None
    if message is None:
        if first is None:
            reason = "a command is needed"
        elif first.startswith("-"):
            reason = f"the command comes before the flags ({first})"
        else:
            reason = f"unknown command {first!r}"
        message = (f"{program.command_line}: {reason}; the commands are {', '.join(by_name)} "
                   f"(`{program.command_line} --help` describes them)")
    error(message)
    return 2


def parse(program: Program, command: Subcommand, argv: list[str]) -> tuple[flags.FlagValues, list[str]]:
    """Parses a subcommand's flags (argv[2:]) into a new FlagValues of its own.

    Returns:
        (the parsed flags, the positional arguments, as many as `command.arguments` names).

    Raises:
        flags.Error: a bad flag, or a missing or stray argument (one line).
    """
    flag_values = flags.FlagValues()
    command.define_flags(flag_values)
    who = f"{program.command_line} {command.name}"
    if command.passes_on is not None:
        own, others = split_own(flag_values, argv[2:])
        flag_values([who] + own)
        return flag_values, [others]
    remaining = flag_values([who] + argv[2:])
    return flag_values, _positional(remaining[1:], command.arguments, who, f"{command.name} {command.usage}")


def split_own(flag_values: flags.FlagValues, args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the arguments that set a flag of `flag_values`, all the others), each in its order.

    An own flag takes its value after '=' (a boolean may also be --name or --noname): the word after a bare
    --name could as well be an argument of the other command.

    Raises:
        flags.Error: an own flag that is not a boolean, without '=' (one line).
    """
    own, others = [], []
    for arg in args:
        name = arg[2:].partition("=")[0] if arg.startswith("--") else ""
        negated = name.startswith("no") and name[2:] in flag_values and flag_values[name[2:]].boolean
        if name not in flag_values and not negated:
            others.append(arg)
            continue
        if "=" not in arg and not (negated or flag_values[name].boolean):
            raise flags.Error(f"give --{name}=VALUE (one argument)")
        own.append(arg)
    return own, others


def _positional(arguments: list[str], names: Sequence[str], who: str = "", usage: str = "") -> list[str]:
    """The arguments left after the flags, which must be one per name of `names`; else flags.Error (one line
    naming `who` needs what, and its `usage`)."""
    if len(arguments) > len(names):
        raise flags.Error(f"unexpected arguments: {' '.join(arguments[len(names):])}; flags take the form "
                          "--name=value")
    if len(arguments) < len(names):
        raise flags.Error(f"{who} needs {' '.join(names[len(arguments):])} (usage: {usage})")
    return arguments


def overview_help(program: Program) -> str:
    """The program's --help: its overview, one line per subcommand, and how to get a subcommand's flags."""
    width = max(len(c.name) for c in program.commands)
    lines = [program.overview.strip(), "", "commands:"]
    lines += [f"  {c.name.ljust(width)}  {c.summary}" for c in program.commands]
    lines += ["", f"`{program.command_line} <command> --help` lists the flags of one command."]
    return "\n".join(lines)


def print_subcommand_help(program: Program, command: Subcommand) -> None:
    """A subcommand's --help: usage, description, and its flags only."""
    flag_values = flags.FlagValues()
    command.define_flags(flag_values)
    text = f"usage: {program.command_line} {command.name} {command.usage}\n\n{command.summary}\n"
    if command.description:
        text += f"\n{command.description.strip()}\n"
    text += "\n" + flag_values.get_help().lstrip("\n")
    if command.passes_on is not None:
        text += "\n\n" + command.passes_on()
    print(text, flush=True)


def parse_single(argv: Sequence[str], flag_values: flags.FlagValues, doc: str) -> bool:
    """Parses the argv of a command without subcommands (serving) into `flag_values`.

    Args:
        argv: the command line, the program name first.
        flag_values: the command's flags, defined.
        doc: the command's docstring; its first two paragraphs head --help.

    Returns:
        False when it printed the help: nothing more to do.

    Raises:
        flags.Error: a bad flag, a stray argument or a missing --model_dir (one line).
    """
    if any(a in HELP for a in argv[1:]):
        print("\n\n".join(doc.split("\n\n")[:2]) + "\n", flush=True)
        print(flag_values.get_help(), flush=True)
        return False
    flag_values.unparse_flags()
    _positional(flag_values(list(argv))[1:], ())
    require_model_dir(flag_values)
    return True


def run_reporting(body: Callable[[], int], user_errors: tuple[type, ...],
                  output: Callable[[], str] | None = None) -> int:
    """Runs a command's body and turns a user's error into one line on stderr.

    Args:
        body: the command; returns its exit status.
        user_errors: exception types that are the user's to fix (exit 2); absl's flags.Error always is one.
        output: for a command that writes: the path to name when a failing write (OSError, exit 1) names
            none. None: an OSError is not caught.

    Returns:
        The exit status.
    """
    try:
        return body()
    except (flags.Error, *user_errors) as e:
        error(str(e))
        return 2
    except OSError as e:
        if output is None:
            raise
        where = e.filename or output()
        error(f"cannot write{' ' + str(where) if where else ''}: {e.strerror or e}; check the folder's permissions "
              "and free space")
        return 1


def error(message: str) -> None:
    """The one line of a command that stops: `error: <message>` on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Flags shared by the commands that load a run's models (predict submit/evaluate, serving).


def define_model_flags(flag_values: flags.FlagValues, what: str = "", combine: bool = True,
                       cv_parent: bool = False) -> None:
    """--model_dir and --tta; with `combine` also --threshold and --use_ensemble (how the models are combined).

    Args:
        flag_values: the command's flags.
        what: ends the first words of the --tta help, "Test-time augmentation<what>" (e.g. " in the graph").
        combine: the command applies ensemble.json: define --threshold and --use_ensemble, and --tta defaults
            to ensemble.json's TTA.
        cv_parent: the command also takes a cross-validation parent (a fold ensemble) as --model_dir.
    """
    fv = dict(flag_values=flag_values)
    parent = (", or a cross-validation parent (python -m salt_tf.cv: every fold's models, each fold the mean of "
              "its own, the folds weighing the same)") if cv_parent else ""
    flags.DEFINE_string("model_dir", None, "A run directory (its snapshots if any, else its export/) or one "
                        f"export folder (model.json + weights){parent}.", **fv)
    default = "the TTA of the run's ensemble.json, else hflip" if combine else "hflip"
    flags.DEFINE_string("tta", "hflip", f"Test-time augmentation{what}: 'none', or views averaged with the "
                        f"identity from hflip,vflip. Default: {default}.", **fv)
    if not combine:
        return
    flags.DEFINE_float("threshold", None, "Probability threshold; overrides ensemble.json and the export's "
                       "validation threshold.", lower_bound=0.0, upper_bound=0.999, **fv)
    parent = "; a CV parent without one: the threshold and TTA of its oof.json (cv collect)" if cv_parent else ""
    flags.DEFINE_boolean("use_ensemble", True, "Use <model_dir>/ensemble.json (written by `python -m "
                         f"salt_tf.predict evaluate`) when present: its combination, threshold and TTA{parent}.",
                         **fv)


def require_model_dir(flag_values: flags.FlagValues) -> None:
    """Raises flags.Error (one line) when --model_dir is not given."""
    if not flag_values.model_dir:
        raise flags.IllegalFlagValueError("--model_dir is required: a run directory or an export folder")
