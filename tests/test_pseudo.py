"""Pseudo-labels: the confidence rules on hand-made probability maps, the labelled folder they make, and
training on it with --extra_data_dir (training only, fingerprinted)."""

import os

import numpy as np
import pandas as pd
import pytest

from salt_tf import pseudo, rundir
from salt_tf.data import kaggle
from train_helpers import run_tiny


def test_confidence_rules_on_hand_made_maps():
    p = np.zeros((4, 10, 10), np.float32)
    p[0] = 0.05                           # certain everywhere: band 1, margin |0.1 - 1| = 0.9
    p[1, :5], p[1, 5:] = 0.5, 0.95        # half uncertain: band 0.5, margin (0 + 0.9) / 2 = 0.45
    p[2, :, :5], p[2, :, 5:] = 0.2, 0.8   # the band's edges count as uncertain: band 0, margin 0.6
    p[3] = 0.85                           # 3 pixels in the band out of 100: band 0.97
    p[3, 0, :3] = 0.3
    np.testing.assert_allclose(pseudo.confidence(p, "band"), [1.0, 0.5, 0.0, 0.97], atol=1e-6)
    np.testing.assert_allclose(pseudo.confidence(p, "margin"), [0.9, 0.45, 0.6, (97 * 0.7 + 3 * 0.4) / 100],
                               atol=1e-6)
    np.testing.assert_allclose(pseudo.confidence(p, "band", band=(0.1, 0.4)), [1.0, 1.0, 0.5, 0.97], atol=1e-6)
    table = pseudo.table(["a", "b", "c", "d"], pseudo.confidence(p), p > 0.5, min_confidence=0.9)
    assert table["kept"].tolist() == [True, False, False, True]
    assert table["salt_pixels"].tolist() == [0, 50, 50, 97]


def _pseudo_folder(demo_dir, output, keep=4):
    """A labelled folder from the demo set's unlabelled test images with hand-made masks (a square each)."""
    images = os.path.join(demo_dir, "test", "images")
    ids = kaggle.list_images(images)
    masks = np.zeros((len(ids), 101, 101), bool)
    for k in range(len(ids)):
        masks[k, 10 * k:10 * k + 30, 20:60] = k % 2 == 0
    confidence = np.where(np.arange(len(ids)) < keep, 1.0, 0.5)
    frame = pseudo.table(ids, confidence, masks, 0.9)
    pseudo.write_folder(output, frame, {i: os.path.join(images, f"{i}.png") for i in ids}, masks,
                        kaggle.read_depths(os.path.join(demo_dir, kaggle.DEPTHS_FILE)))
    return ids[:keep], masks[:keep]


def test_write_folder_makes_a_kaggle_labelled_set(demo_dir, tmp_path):
    output = str(tmp_path / "pl")
    kept, masks = _pseudo_folder(demo_dir, output)
    data = kaggle.load_labelled(output)   # also checks every mask PNG against its train.csv RLE
    assert data.ids.tolist() == kept
    np.testing.assert_array_equal(data.masks, masks)
    for i in kept:
        with open(os.path.join(demo_dir, "test", "images", f"{i}.png"), "rb") as a, \
                open(os.path.join(output, "train", "images", f"{i}.png"), "rb") as b:
            assert a.read() == b.read()
    assert pd.read_csv(os.path.join(output, "depths.csv"), dtype={"id": str})["id"].tolist() == kept
    assert len(pd.read_csv(os.path.join(output, pseudo.CONFIDENCE_FILE))) == 8
    with pytest.raises(kaggle.DataError, match="exists"):
        pseudo.check_output(output)


def test_extra_data_trains_only_and_changes_the_fingerprint(demo_dir, tmp_path):
    extra = str(tmp_path / "pl")
    kept, _ = _pseudo_folder(demo_dir, extra)
    model_dir = str(tmp_path / "run")
    run_tiny(demo_dir, model_dir, epochs=1, extra_data_dir=extra)
    split = pd.read_csv(os.path.join(model_dir, rundir.SPLIT_FILE), dtype={"id": str})
    assert set(split["id"]) == set(kaggle.train_ids(demo_dir)) and not set(kept) & set(split["id"])
    data = rundir.read_json(os.path.join(model_dir, rundir.RECORD_FILE))["data"]
    assert data["val_images"] == 32 and data["train_images"] == 160 - 32 + len(kept)
    labelled = kaggle.fingerprint(demo_dir, kaggle.train_ids(demo_dir))
    assert data["labelled_fingerprint"] == labelled and data["fingerprint"] != labelled
    assert data["extra"] == [{"dir": extra, "fingerprint": kaggle.fingerprint(extra, kept), "images": len(kept)}]
    # The same command resumes (a finished run: nothing to train); edited extra data does not.
    assert run_tiny(demo_dir, model_dir, epochs=1, extra_data_dir=extra)["epochs_completed"] == 1
    rundir.write_png(os.path.join(extra, "train", "images", f"{kept[0]}.png"), np.zeros((101, 101), np.uint8))
    with pytest.raises(kaggle.DataError, match="extra_data_dir.*holds other images"):
        run_tiny(demo_dir, model_dir, epochs=1, extra_data_dir=extra)


def test_extra_data_sharing_ids_with_the_labelled_set_stops_before_writing(demo_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    with pytest.raises(kaggle.DataError, match=f"--extra_data_dir={demo_dir}: 160 of its ids are also in"):
        run_tiny(demo_dir, model_dir, epochs=1, extra_data_dir=demo_dir)
    assert not os.path.exists(model_dir)
