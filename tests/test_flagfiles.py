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
# Flagfiles of another command than train, each parsed by its command below.
PIPELINE_FLAGFILES = ("pipeline.cfg",)
FLAGFILES = sorted(p for p in glob.glob(os.path.join(REPO_ROOT, "flags", "*.cfg"))
                   if os.path.basename(p) not in PIPELINE_FLAGFILES)


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


@pytest.mark.parametrize("name", PIPELINE_FLAGFILES)
def test_pipeline_flagfile_parses_and_its_rounds_pass_the_train_checks(name, demo_dir):
    """The pipeline's flags parse (python -m salt_tf.competition), and each round's train command line, as the
    plan builds it, passes every train validator (the data folder is the machine's: the demo set here)."""
    from salt_tf import competition, cv

    competition.FLAGS.unparse_flags()
    competition.FLAGS(["competition", f"--flagfile={os.path.join(REPO_ROOT, 'flags', name)}", "--parent=p"])
    options = competition.Options.from_flags(competition.FLAGS)
    assert os.path.isfile(os.path.join(REPO_ROOT, options.recipe)), options.recipe
    recipe = [f"--flagfile={os.path.join(REPO_ROOT, options.recipe)}", f"--data_dir={demo_dir}"]
    for extra in (options.extra("round1"), options.extra("round2") + ["--init_checkpoint=r1/fold-{fold}"]):
        assert cv.fold_budget(recipe + extra).folds >= 2
    competition.FLAGS.unparse_flags()


def test_readme_names_only_existing_flagfiles():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    named = set(re.findall(r"flags/[\w.-]+\.cfg", readme))
    assert named and all(os.path.isfile(os.path.join(REPO_ROOT, name)) for name in named), named
