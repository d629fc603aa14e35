"""`python -m salt_tf` lists every command, instantly (no TensorFlow), and agrees with the commands themselves;
salt_tf.cli's one-line errors for a subcommand's arguments, and a subcommand that passes arguments on."""

import os
import subprocess
import sys

import pytest
from absl import flags

from salt_tf import cli, cv, predict, runs
from train_helpers import REPO_ROOT


def _listing(*args):
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "salt_tf", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_python_m_salt_tf_lists_the_commands_without_importing_tensorflow():
    result = _listing()
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "keras", "numpy", "absl")], imported
    assert [m for m in imported if m.startswith("salt_tf")] == ["salt_tf"]
    lines = result.stdout.splitlines()
    # Each subcommand of predict, runs and cv on a line of its own, with its own one-line summary, and no other.
    for program in (predict.PROGRAM, runs.PROGRAM, cv.PROGRAM):
        listed = [line.split()[3] for line in lines if line.split()[:3] == ["python", "-m", program.module]]
        assert listed == [c.name for c in program.commands], (program.module, listed)
        for command in program.commands:
            line = next(line for line in lines if line.split()[:4] == ["python", "-m", program.module, command.name])
            assert line.endswith(command.summary), line
    # Every module with a command line (`if __name__ == "__main__"`) is listed.
    entry_points = set()
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, "salt_tf")):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(".py") and name != "__main__.py" and 'if __name__ == "__main__":' in open(path).read():
                entry_points.add(os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, "."))
    listed = {line.split()[2] for line in lines if line.startswith("  python -m ")}
    assert listed == entry_points, (listed, entry_points)
    assert _listing("--help").stdout == result.stdout


def test_python_m_salt_tf_with_an_argument_is_one_line():
    result = _listing("predict")
    assert result.returncode == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith("error: python -m salt_tf lists the commands"), errors


def _program(calls):
    def define(flag_values):
        flags.DEFINE_integer("n", 1, "A number.", lower_bound=0, flag_values=flag_values)

    def run(flag_values, a, b):
        calls.append((flag_values.n, a, b))
        return 0

    return cli.Program(module="demo", overview="A demo.", commands=(
        cli.Subcommand("pair", "takes two arguments", "A B [--n=N]", define, run, arguments=("A", "B")),))


@pytest.mark.parametrize("argv,expected", [
    (["pair", "x"], "python -m demo pair needs B (usage: pair A B [--n=N])"),
    (["pair", "x", "y", "z"], "unexpected arguments: z; flags take the form --name=value"),
    (["pair", "x", "y", "--n=-1"], "--n=-1"),
    (["pear"], "python -m demo: unknown command 'pear'; the commands are pair (`python -m demo --help` describes "
               "them)"),
])
def test_subcommand_argument_errors_are_one_line(argv, expected, capsys):
    calls = []
    assert cli.main(_program(calls), ["demo"] + argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and calls == [] and err.count("\n") == 1 and expected in err, err


def test_subcommand_gets_its_flags_and_arguments_in_any_order(capsys):
    calls = []
    assert cli.main(_program(calls), ["demo", "pair", "--n=3", "x", "y"]) == 0
    assert cli.main(_program(calls), ["demo", "pair", "x", "--n", "4", "y"]) == 0
    assert calls == [(3, "x", "y"), (4, "x", "y")]
    assert cli.main(_program(calls), ["demo", "pair", "--help"]) == 0 and len(calls) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m demo pair A B [--n=N]\n\ntakes two arguments\n") and "--n: A number." in out


def _passing_program(calls):
    def define(flag_values):
        flags.DEFINE_string("parent", None, "The parent.", flag_values=flag_values)
        flags.DEFINE_boolean("quick", False, "Be quick.", flag_values=flag_values)

    def run(flag_values, others):
        calls.append((flag_values.parent, flag_values.quick, others))
        return 0

    return cli.Program(module="demo", overview="A demo.", commands=(
        cli.Subcommand("train", "passes the rest on", "--parent=P [other flags]", define, run,
                       passes_on=lambda: "OTHER FLAGS: --folds, --epochs"),))


def test_a_passing_subcommand_takes_its_own_flags_and_passes_the_others_on_in_order(capsys):
    calls = []
    argv = ["demo", "train", "--flagfile=f.cfg", "--parent=p", "--folds=5", "stray", "--noquick", "--epochs", "3"]
    assert cli.main(_passing_program(calls), argv) == 0
    assert cli.main(_passing_program(calls), ["demo", "train", "--quick", "--parent=q"]) == 0
    assert calls == [("p", False, ["--flagfile=f.cfg", "--folds=5", "stray", "--epochs", "3"]), ("q", True, [])]
    # Its own flag without '=': the next word could be the other command's; one line, nothing run.
    assert cli.main(_passing_program(calls), ["demo", "train", "--parent", "p", "--folds=5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: give --parent=VALUE (one argument)\n" and len(calls) == 2
    # Its --help: its own flags, then the help of the flags it passes on.
    assert cli.main(_passing_program(calls), ["demo", "train", "--folds=5", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--parent: The parent." in out and out.rstrip().endswith("OTHER FLAGS: --folds, --epochs")
