"""Coverage-stratified split and k-fold."""

import numpy as np
import pandas as pd
import pytest

from salt_tf.data import splits


def fake_ids_and_coverage(n=3200, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"{k:010x}" for k in rng.permutation(10 ** 6)[:n]]
    coverage = np.where(rng.random(n) < 0.39, 0.0, rng.random(n) ** 2)
    return ids, coverage


def test_coverage_class_edges():
    np.testing.assert_array_equal(splits.coverage_class([0, 1e-4, 0.1, 0.1001, 0.5, 0.99, 1.0]),
                                  [0, 1, 1, 2, 5, 10, 10])


def test_split_is_stratified_exact_and_stable():
    ids, coverage = fake_ids_and_coverage()
    frame = splits.stratified_split(ids, coverage, 400, seed=7)
    assert (frame["role"] == "val").sum() == 400
    classes = splits.coverage_class(coverage)
    val = (frame["role"] == "val").to_numpy()
    for c in range(splits.NUM_COVERAGE_CLASSES):
        train_share = np.mean(classes[~val] == c)
        val_share = np.mean(classes[val] == c)
        assert abs(train_share - val_share) < 0.01, c
    again = splits.stratified_split(ids, coverage, 400, seed=7)
    pd.testing.assert_frame_equal(frame, again)
    # The order ids are listed in does not change who validates.
    order = np.random.default_rng(3).permutation(len(ids))
    shuffled = splits.stratified_split([ids[k] for k in order], coverage[order], 400, seed=7)
    assert set(shuffled.loc[shuffled.role == "val", "id"]) == set(frame.loc[frame.role == "val", "id"])
    other = splits.stratified_split(ids, coverage, 400, seed=8)
    assert set(other.loc[other.role == "val", "id"]) != set(frame.loc[frame.role == "val", "id"])


def test_kfold_partitions_and_stratifies():
    ids, coverage = fake_ids_and_coverage(1000)
    frame = splits.kfold(ids, coverage, 5, seed=1)
    counts = frame["fold"].value_counts()
    assert sorted(counts.index) == [0, 1, 2, 3, 4] and counts.max() - counts.min() <= 1
    classes = splits.coverage_class(coverage)
    for c in range(splits.NUM_COVERAGE_CLASSES):
        per_fold = np.bincount(frame["fold"][classes == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1


def test_split_csv_round_trip(tmp_path):
    ids, coverage = fake_ids_and_coverage(200)
    ids[0] = "0050766ae2"  # leading zeros must survive the CSV
    frame = splits.stratified_split(ids, coverage, 0.2, seed=0)
    path = str(tmp_path / "split.csv")
    splits.write_split(frame, path)
    pd.testing.assert_frame_equal(splits.read_split(path), frame, check_dtype=False)


@pytest.mark.parametrize("size", [0, 200, 1000])
def test_bad_val_size(size):
    ids, coverage = fake_ids_and_coverage(200)
    with pytest.raises(ValueError, match="--val_images"):
        splits.stratified_split(ids, coverage, size, seed=0)
