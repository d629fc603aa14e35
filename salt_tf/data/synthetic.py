"""The embedded demo data set: synthetic seismic-like images with salt bodies, in the Kaggle layout.

Sediments show as layered reflectors (folded, dipping, noisy sine layers); salt shows as a body with a
chaotic, low-amplitude texture and a bright boundary reflection, either under a smooth top surface (like
most TGS images) or as a dome/blob. About a third of the images have no salt. The difference between the
two textures is local, so a U-Net learns it, while the noise and folding keep it from being trivial.

Written exactly like the Kaggle download (8-bit RGB images with equal channels, 16-bit masks where salt
exists and 8-bit where empty, train.csv with RLE, depths.csv), so it exercises the real data layer.

    python -m salt_tf.data.synthetic --out=demo_data --num_images=800
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pandas as pd

from salt_tf import IMAGE_SIZE, rundir
from salt_tf.data import kaggle

# Written first into a folder `generate` fills: the folder holds the demo set (ensure_demo_data's permission to
# write over it).
MARKER_FILE = "DEMO_SET"
MARKER_TEXT = "The synthetic demo set of salt_tf (python -m salt_tf.data.synthetic); regenerated at will.\n"


def _smooth_noise(rng: np.random.Generator, sigma: float, shape=(IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma,
                             borderType=cv2.BORDER_REFLECT)
    return field.reshape(shape) / (field.std() + 1e-6)


def _smooth_curve(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """A smooth random 1-D profile of IMAGE_SIZE values with unit standard deviation."""
    return _smooth_noise(rng, sigma, (IMAGE_SIZE, IMAGE_SIZE))[IMAGE_SIZE // 2]


def _salt_mask(rng: np.random.Generator) -> np.ndarray:
    """A salt body: 'top' = salt below a smooth surface, 'blob' = a dome, 'side' = a flank from one side."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    kind = rng.choice(["top", "blob", "side"], p=[0.5, 0.3, 0.2])
    if kind == "top":
        base = rng.uniform(5, 95)
        columns = np.arange(IMAGE_SIZE, dtype=np.float32)
        curve = base + rng.uniform(-0.6, 0.6) * (columns - 50) + 12 * _smooth_curve(rng, 12)
        mask = y > curve[None, :]
    elif kind == "blob":
        cy, cx = rng.uniform(15, 85, size=2)
        radius = rng.uniform(10, 40)
        wobble = 0.35 * radius * _smooth_noise(rng, 10)
        mask = np.hypot(y - cy, (x - cx) * rng.uniform(0.6, 1.4)) + wobble < radius
    else:
        edge = rng.uniform(10, 90) + 10 * _smooth_curve(rng, 12)
        mask = (x < edge[:, None]) if rng.random() < 0.5 else (x > edge[:, None])
    return mask.astype(np.uint8)


def make_example(rng: np.random.Generator, with_salt: bool) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 [101,101], mask uint8 {0,1} [101,101]) pair."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    frequency = rng.uniform(0.25, 0.6)
    dip = rng.uniform(-0.4, 0.4)
    warp = rng.uniform(2, 8) * _smooth_noise(rng, rng.uniform(8, 20))
    amplitude = 1.0 + 0.4 * _smooth_noise(rng, 15)
    sediment = amplitude * np.sin(frequency * (y + dip * x + warp) + rng.uniform(0, 2 * np.pi))
    sediment += 0.35 * _smooth_noise(rng, 1.0)

    mask = _salt_mask(rng) if with_salt else np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    # Ensure a salt image has some salt and is not all salt too often (both occur in TGS, rarely).
    if with_salt and mask.sum() < 20:
        mask[:] = 0
    salt = 0.45 * _smooth_noise(rng, rng.uniform(1.0, 2.0)) + rng.uniform(-0.3, 0.3)
    image = np.where(mask > 0, salt, sediment)
    if mask.any():
        boundary = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(np.float32)
        image += rng.uniform(0.8, 1.8) * cv2.GaussianBlur(boundary, (0, 0), 1.0)
    image += rng.uniform(0.15, 0.4) * rng.standard_normal(image.shape).astype(np.float32)
    image = (image - image.mean()) / (image.std() + 1e-6)
    image = np.clip(120 + rng.uniform(20, 40) * image + rng.uniform(-15, 15), 0, 255)
    return image.astype(np.uint8), mask


def generate(out_dir: str, num_images: int = 800, seed: int = 0, num_test: int = 0,
             empty_fraction: float = 0.35) -> list[str]:
    """Writes `num_images` labelled (and `num_test` unlabelled) examples under out_dir; returns the ids.

    Deterministic for a given seed: the same ids and the same bytes every time.
    """
    rng = np.random.default_rng(seed)
    for folder in ("train/images", "train/masks", "test/images"):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    # First: even a half-written set is then known as the demo's, which ensure_demo_data may write over.
    rundir.write_text(os.path.join(out_dir, MARKER_FILE), MARKER_TEXT)
    rows, depths = [], []
    ids = []
    for k in range(num_images + num_test):
        id_ = f"{rng.integers(16 ** 10):010x}"
        image, mask = make_example(rng, with_salt=rng.random() >= empty_fraction)
        rgb = np.repeat(image[:, :, None], 3, axis=2)
        depths.append((id_, int(rng.integers(50, 960))))
        if k >= num_images:
            rundir.write_png(os.path.join(out_dir, "test", "images", f"{id_}.png"), rgb)
            continue
        # As in the Kaggle download: 16-bit masks where salt exists, 8-bit where empty.
        stored = (mask.astype(np.uint16) * 65535) if mask.any() else mask * 255
        rundir.write_png(os.path.join(out_dir, "train", "images", f"{id_}.png"), rgb)
        rundir.write_png(os.path.join(out_dir, "train", "masks", f"{id_}.png"), stored)
        rows.append((id_, kaggle.rle_encode(mask)))
        ids.append(id_)
    rundir.write_csv(os.path.join(out_dir, kaggle.DEPTHS_FILE), pd.DataFrame(depths, columns=["id", "z"]))
    # train.csv is written last: its presence marks a complete data set (see ensure_demo_data).
    rundir.write_csv(os.path.join(out_dir, kaggle.TRAIN_FILE), pd.DataFrame(rows, columns=["id", "rle_mask"]))
    return ids


def first_id(seed: int) -> str:
    """The first id `generate` gives with this seed (its first draw), which marks a demo set written before
    MARKER_FILE existed."""
    return f"{np.random.default_rng(seed).integers(16 ** 10):010x}"


def foreign_files(out_dir: str, seed: int) -> list[str]:
    """The entries of out_dir that show it is not (only) a demo set `generate` may write over: none when the
    folder is absent or empty, carries MARKER_FILE, or holds an older demo set (train.csv's first id is the
    demo's); else the folder's entries, sorted."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir) or os.path.isfile(os.path.join(out_dir, MARKER_FILE)):
        return []
    train_csv = os.path.join(out_dir, kaggle.TRAIN_FILE)
    try:
        first = pd.read_csv(train_csv, dtype=str, nrows=1)["id"].iloc[0] if os.path.isfile(train_csv) else None
        if first == first_id(seed):
            return []
    except (ValueError, KeyError, IndexError, OSError):  # unreadable or another layout: not the demo's train.csv
        pass
    return sorted(os.listdir(out_dir))


def ensure_demo_data(out_dir: str, num_images: int, seed: int) -> None:
    """Generates the demo set into out_dir unless a complete one of the same size is already there.

    Raises:
        kaggle.DataError: out_dir holds anything but a demo set (e.g. the real Kaggle download): writing the
            demo's train.csv, depths.csv and images into it would replace the user's files.
    """
    foreign = foreign_files(out_dir, seed)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise kaggle.DataError(
            f"--dataset=demo --data_dir={out_dir}: that folder holds files that are not the demo set ({shown}), "
            "which writing the demo set would replace; give --dataset=kaggle to train on them, or an empty or new "
            "--data_dir for the demo set")
    train_csv = os.path.join(out_dir, kaggle.TRAIN_FILE)
    if os.path.isfile(train_csv) and len(pd.read_csv(train_csv)) == num_images:
        return
    generate(out_dir, num_images=num_images, seed=seed, num_test=max(1, num_images // 8))


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic demo data set in the Kaggle layout.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_images", type=int, default=800, help="labelled images")
    parser.add_argument("--num_test", type=int, default=100, help="unlabelled test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    foreign = foreign_files(args.out, args.seed)
    if foreign:
        parser.error(f"--out={args.out} holds files that are not a demo set ({', '.join(foreign[:3])}); give an "
                     "empty or new folder")
    ids = generate(args.out, args.num_images, args.seed, args.num_test)
    print(f"wrote {len(ids)} labelled and {args.num_test} test images to {args.out}")


if __name__ == "__main__":
    main()
