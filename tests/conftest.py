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


def shared_data_or_skip():
    if not os.path.isfile(os.path.join(SHARED_DATA, "train.csv")):
        pytest.skip(f"real TGS data not found at {SHARED_DATA} (set SALT_TF_SHARED_DATA to run this check)")
    return SHARED_DATA
