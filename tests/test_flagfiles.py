"""The shipped flagfiles parse and pass every validator: a user's first command must not die on a typo."""

import glob
import os
import re

import pytest
from absl import flags
from absl.testing import flagsaver

from salt_tf import flags as salt_flags

FLAGS = flags.FLAGS
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(REPO_ROOT, "flags", "*.cfg")))


def test_there_are_flagfiles():
    assert len(FLAGFILES) >= 3, FLAGFILES


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfile_parses_and_validates(path, tmp_path, demo_dir):
    salt_flags.define_flags()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        # Where the data and the run live depends on the machine; everything else is checked as written
        # (an unknown flag or a failing cross-flag validator raises here).
        FLAGS(["train", f"--flagfile={path}", f"--data_dir={demo_dir}", f"--model_dir={tmp_path / 'run'}"])
        assert FLAGS.model_dir == str(tmp_path / "run")


def test_readme_names_only_existing_flagfiles():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    named = set(re.findall(r"flags/[\w.-]+\.cfg", readme))
    assert named and all(os.path.isfile(os.path.join(REPO_ROOT, name)) for name in named), named
