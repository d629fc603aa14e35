"""Every command the README shows still runs: its program exists and knows every flag the README passes.

The README is the manual a new user copies from, so a renamed flag or module there is a bug. Each command of
its ```bash blocks is checked against the program itself: the train command's flags are parsed by absl with
all validators (data and run folders substituted, as in test_flagfiles.py); every other program is asked for
its `--help` (of the subcommand, where it has modes) in a subprocess, and each `--flag` the README passes must
appear there.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from salt_tf import flags as salt_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
FLAGS = flags.FLAGS


def readme_commands() -> list[list[str]]:
    """The README's command lines (python/bash ones) from its ```bash blocks, as argument lists."""
    text = open(README, encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):  # `pip install -e . && python -m ...`
                words = shlex.split(part)
                if words and words[0] in ("python", "bash"):
                    commands.append(words)
    return commands


def program_and_flags(words: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(the program's argv prefix incl. a subcommand, the --flags named, all remaining arguments)."""
    if words[:2] == ["python", "-m"]:
        program, rest = [sys.executable, "-m", words[2]], words[3:]
    else:  # python tools/x.py, bash tools/x.sh
        program, rest = [sys.executable if words[0] == "python" else "bash", words[1]], words[2:]
    if rest and re.fullmatch(r"[a-z_]+", rest[0]) and words[2] in ("salt_tf.runs", "salt_tf.predict", "salt_tf.cv",
                                                                                "salt_tf.sweep"):
        program, rest = program + [rest[0]], rest[1:]
    named = [re.match(r"--(?:no)?([\w]+)", w).group(1) for w in rest if w.startswith("--")]
    return program, named, rest


COMMANDS = readme_commands()


def test_readme_has_the_two_quickstart_commands():
    joined = [" ".join(c) for c in COMMANDS]
    assert "python -m salt_tf.train --flagfile=flags/demo.cfg" in joined
    assert "python -m pytest tests" in joined


def test_every_program_exists():
    for words in COMMANDS:
        if words[:2] == ["python", "-m"]:
            module = words[2]
            if module == "pytest":
                continue
            path = os.path.join(REPO_ROOT, *module.split(".")) + ".py"
            assert os.path.isfile(path) or os.path.isfile(path[:-3] + "/__main__.py"), " ".join(words)
        else:
            assert os.path.isfile(os.path.join(REPO_ROOT, words[1])), " ".join(words)


@pytest.mark.parametrize("words", [c for c in COMMANDS if c[:3] == ["python", "-m", "salt_tf.train"]],
                         ids=lambda c: " ".join(c)[:60])
def test_train_commands_parse_and_validate(words, tmp_path, demo_dir):
    salt_flags.define_flags()
    argv = ["train"] + [w for w in words[3:] if not w.startswith(("--data_dir=", "--model_dir="))]
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        if "--help" in argv:
            return  # --help is absl's own
        FLAGS(argv + [f"--data_dir={demo_dir}", f"--model_dir={tmp_path / 'run'}"])


def _help_cases():
    """One case per program (and subcommand) other than train: the union of the flags the README gives it."""
    cases = {}
    for words in COMMANDS:
        if words[:3] == ["python", "-m", "salt_tf.train"] or words[:3] == ["python", "-m", "pytest"]:
            continue
        if words[0] == "bash":
            continue  # shell scripts: existence is checked above, their rows by test_tools
        program, named, _ = program_and_flags(words)
        cases.setdefault(tuple(program), set()).update(named)
    return sorted((list(k), sorted(v)) for k, v in cases.items() if v)


@pytest.mark.parametrize("program,named", _help_cases(), ids=lambda x: " ".join(x[-2:]) if isinstance(x, list) else "")
def test_other_commands_know_their_flags(program, named):
    result = subprocess.run(program + ["--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-2000:]
    missing = [n for n in named if not re.search(rf"--(\[no\])?{n}\b", text)]
    assert not missing, f"{' '.join(program[1:])}: the README passes {missing}, which its --help does not list"
