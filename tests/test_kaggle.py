"""The Kaggle data layer: RLE, PNG reading, the labelled set."""

import os

import cv2
import numpy as np
import pandas as pd
import pytest

from salt_tf.data import kaggle
from conftest import shared_data_or_skip


def brute_force_rle(mask):
    """Independent encoder: walk the pixels in column-major order, 1-based."""
    runs, start = [], None
    flat = [mask[r, c] for c in range(mask.shape[1]) for r in range(mask.shape[0])]
    for k, v in enumerate(flat, start=1):
        if v and start is None:
            start = k
        if not v and start is not None:
            runs += [start, k - start]
            start = None
    if start is not None:
        runs += [start, len(flat) + 1 - start]
    return " ".join(map(str, runs))


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 0.95, 1.0])
def test_rle_round_trip_on_random_masks(density):
    rng = np.random.default_rng(int(density * 100))
    for _ in range(20):
        mask = (rng.random((101, 101)) < density).astype(np.uint8)
        encoded = kaggle.rle_encode(mask)
        assert encoded == brute_force_rle(mask)
        np.testing.assert_array_equal(kaggle.rle_decode(encoded), mask)


def test_rle_is_column_major_and_one_based():
    mask = np.zeros((3, 3), np.uint8)
    mask[0, 0] = 1          # pixel 1
    mask[1:3, 1] = 1        # pixels 5, 6 (second column, rows 2-3)
    assert kaggle.rle_encode(mask) == "1 1 5 2"
    np.testing.assert_array_equal(kaggle.rle_decode("1 1 5 2", (3, 3)), mask)


@pytest.mark.parametrize("empty", ["", None, float("nan"), "   "])
def test_rle_empty_means_no_salt(empty):
    assert kaggle.rle_decode(empty).sum() == 0


@pytest.mark.parametrize("bad, message", [
    ("1 2 3", "odd number"),
    ("1 x", "not a whole number"),
    ("0 5", ">= 1"),
    ("5 0", ">= 1"),
    ("10200 5", "past the image"),
    ("1 10 5 3", "overlap"),
    ("20 2 1 2", "overlap"),
    ("1 3 3 2", "overlap"),    # the second run starts on the last pixel of the first
])
def test_rle_malformed_is_a_clear_error(bad, message):
    with pytest.raises(kaggle.DataError, match=message):
        kaggle.rle_decode(bad)


def _write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, array)


def test_read_png_gray_rgb_and_16_bit(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (101, 101), dtype=np.uint8)
    _write(str(tmp_path / "g.png"), gray)
    _write(str(tmp_path / "rgb.png"), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(kaggle.read_png(str(tmp_path / "g.png"), kind="image"), gray)
    np.testing.assert_array_equal(kaggle.read_png(str(tmp_path / "rgb.png"), kind="image"), gray)
    mask = (rng.random((101, 101)) < 0.3).astype(np.uint16)
    _write(str(tmp_path / "m16.png"), mask * 65535)
    _write(str(tmp_path / "m8.png"), (mask * 255).astype(np.uint8))
    for name in ("m16.png", "m8.png"):
        np.testing.assert_array_equal(kaggle.read_png(str(tmp_path / name), kind="mask"), mask)


def test_read_png_16_bit_images(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (101, 101), dtype=np.uint8)
    gray[0, 0], gray[0, 1] = 0, 255
    # A true 16-bit image: its high byte, like every 8-bit image (hand-computed: 0x12AB -> 0x12).
    wide = gray.astype(np.uint16) * 256 + 0xAB
    _write(str(tmp_path / "w16.png"), wide)
    np.testing.assert_array_equal(kaggle.read_png(str(tmp_path / "w16.png"), kind="image"), gray)
    # 8-bit values in a 16-bit file: kept (the high byte would make the image black).
    _write(str(tmp_path / "n16.png"), gray.astype(np.uint16))
    np.testing.assert_array_equal(kaggle.read_png(str(tmp_path / "n16.png"), kind="image"), gray)


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("garbage", "not a readable image"),
    ("truncated", "not a readable image"),
    ("small", "expected 101x101"),
    ("colour", "channels differ"),
])
def test_read_png_bad_files(tmp_path, case, message):
    path = str(tmp_path / "x.png")
    good = cv2.imencode(".png", np.zeros((101, 101), np.uint8))[1].tobytes()
    if case == "empty":
        open(path, "wb").close()
    elif case == "garbage":
        open(path, "wb").write(b"not a png at all")
    elif case == "truncated":
        open(path, "wb").write(good[: len(good) // 2])
    elif case == "small":
        _write(path, np.zeros((50, 101), np.uint8))
    elif case == "colour":
        img = np.zeros((101, 101, 3), np.uint8)
        img[..., 2] = 9
        _write(path, img)
    with pytest.raises(kaggle.DataError, match=message) as info:
        kaggle.read_png(path, kind="image")
    assert path in str(info.value) and "\n" not in str(info.value)


def test_load_labelled_synthetic_agrees_with_train_csv(demo_dir):
    data = kaggle.load_labelled(demo_dir)
    frame = pd.read_csv(os.path.join(demo_dir, "train.csv"), dtype=str, keep_default_na=False)
    assert list(data.ids) == list(frame["id"])
    for k, rle in enumerate(frame["rle_mask"]):
        np.testing.assert_array_equal(kaggle.rle_decode(rle), data.masks[k])
    assert data.images.shape == (160, 101, 101) and data.images.dtype == np.uint8
    assert 0 < (data.coverage() == 0).mean() < 1  # both empty and salt images


def test_train_csv_agrees_with_mask_pngs_on_real_data():
    root = shared_data_or_skip()
    frame = kaggle.read_train_csv(root)
    assert len(frame) == 3200
    for id_, rle in zip(frame["id"], frame["rle_mask"]):
        mask = kaggle.read_png(os.path.join(root, "train", "masks", f"{id_}.png"), kind="mask")
        np.testing.assert_array_equal(kaggle.rle_decode(rle), mask, err_msg=id_)
        assert kaggle.rle_encode(mask) == rle, id_


def test_crlf_and_bom_csv_just_work(tmp_path, demo_dir):
    import shutil

    root = str(tmp_path / "d")
    shutil.copytree(demo_dir, root)
    for name in ("train.csv", "depths.csv"):
        text = open(os.path.join(root, name)).read()
        open(os.path.join(root, name), "wb").write(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    data = kaggle.load_labelled(root)
    reference = kaggle.load_labelled(demo_dir)
    np.testing.assert_array_equal(data.masks, reference.masks)
    np.testing.assert_array_equal(data.depths, reference.depths)


def test_duplicate_ids_and_missing_files(tmp_path, demo_dir):
    import shutil

    root = str(tmp_path / "d")
    shutil.copytree(demo_dir, root)
    csv = os.path.join(root, "train.csv")
    lines = open(csv).read().splitlines()
    open(csv, "w").write("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(kaggle.DataError, match="duplicate id"):
        kaggle.load_labelled(root)
    open(csv, "w").write("\n".join(lines) + "\n")
    first = lines[1].split(",")[0]
    os.remove(os.path.join(root, "train", "masks", f"{first}.png"))
    with pytest.raises(kaggle.DataError, match="missing"):
        kaggle.load_labelled(root)
    with pytest.raises(kaggle.DataError, match="data folder not found"):
        kaggle.load_labelled(str(tmp_path / "nowhere"))


def test_one_depths_reader_for_training_and_prediction(tmp_path):
    """kaggle.read_depths reads the data folder's depths.csv (training) and predict's --depths alike: BOM, CRLF,
    spaces around names and ids; every problem one line naming the file, a missing one with the caller's fix."""
    path = tmp_path / "depths.csv"
    path.write_bytes("\ufeffid , z\r\n a ,120\r\nb,955.5\r\n".encode())
    depths = kaggle.read_depths(str(path))
    assert depths == {"a": 120.0, "b": 955.5}
    np.testing.assert_array_equal(kaggle.depth_array(depths, ["b", "c", "a"]),
                                  np.array([955.5, np.nan, 120.0], np.float32))
    assert kaggle.depth_array(depths, ["a"]).dtype == np.float32
    missing = str(tmp_path / "none.csv")
    with pytest.raises(kaggle.DataError, match=r"none\.csv: file not found; is --data_dir the folder"):
        kaggle.read_depths(missing)
    with pytest.raises(kaggle.DataError, match=r"none\.csv: file not found; pass --depths=<depths\.csv>$"):
        kaggle.read_depths(missing, missing_hint="pass --depths=<depths.csv>")
    for text, message in [("id,z\na,1\na,2\n", "duplicate id 'a'"), ("id,z\na,deep\n", "column z must hold numbers"),
                          ("id,depth\na,1\n", "missing column 'z'"), ("", "not a readable CSV")]:
        path.write_text(text)
        with pytest.raises(kaggle.DataError, match=message):
            kaggle.read_depths(str(path))
    assert kaggle.depths_file_of_images(os.path.join("/data", "tgs", "test", "images")) == \
        os.path.join("/data", "tgs", "depths.csv")


def test_read_image_folder_reads_every_png_in_id_order(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 101, 101), dtype=np.uint8)
    for name, image in zip(("b.png", "a.PNG", "c.png"), images):
        assert cv2.imwrite(str(tmp_path / name), image)
    (tmp_path / "notes.txt").write_text("not an image")
    ids, read, bad = kaggle.read_image_folder(str(tmp_path))
    assert ids == ["a", "b", "c"] and bad == []
    np.testing.assert_array_equal(read, images[[1, 0, 2]])
    (tmp_path / "d.png").write_bytes(b"")
    with pytest.raises(kaggle.DataError, match=r"d\.png: file is empty.*\(--skip_bad predicts the others\)"):
        kaggle.read_image_folder(str(tmp_path))
    ids, _, bad = kaggle.read_image_folder(str(tmp_path), skip_bad=True)
    assert ids == ["a", "b", "c"] and [os.path.basename(p) for p, _ in bad] == ["d.png"]
