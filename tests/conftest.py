"""Shared fixtures: small data the project generates itself, and the optional real data."""

import os

import pytest

# Quiet TensorFlow's C++ start-up chatter in test logs; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("SALT_TF_SHARED_DATA",
                             os.path.join(REPO_ROOT, "..", "shared", "data", "tgs_salt"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small synthetic data set in the Kaggle layout (160 labelled, 8 test images)."""
    from salt_tf.data import synthetic

    root = str(tmp_path_factory.mktemp("demo"))
    synthetic.generate(root, num_images=160, seed=123, num_test=8)
    return root


@pytest.fixture(scope="session")
def tiny_run_1_epoch(demo_dir, tmp_path_factory):
    """A finished 1-epoch tiny run (train_helpers.TINY) on demo_dir, trained once for every test module that
    reads one (predict, fold ensembles, --init_checkpoint). Read-only: a test that writes into a run copies it."""
    from train_helpers import run_tiny

    run_dir = str(tmp_path_factory.mktemp("tiny_1_epoch") / "run")
    run_tiny(demo_dir, run_dir, epochs=1)
    return run_dir


@pytest.fixture(scope="session")
def tiny_run_2_epochs(demo_dir, tmp_path_factory):
    """A finished, uninterrupted tiny run with TINY's 2 epochs (16 steps each) on demo_dir, trained once: the
    reference of test_reliability and the run test_train's first test checks. Read-only, as tiny_run_1_epoch."""
    from train_helpers import run_tiny

    run_dir = str(tmp_path_factory.mktemp("tiny_2_epochs") / "run")
    run_tiny(demo_dir, run_dir)
    return run_dir


def shared_data_or_skip():
    if not os.path.isfile(os.path.join(SHARED_DATA, "train.csv")):
        pytest.skip(f"real TGS data not found at {SHARED_DATA} (set SALT_TF_SHARED_DATA to run this check)")
    return SHARED_DATA
