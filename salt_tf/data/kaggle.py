"""The Kaggle TGS Salt layout: ids, images, masks, depths and run-length encoding.

    <root>/train/images/<id>.png   101x101 image (8-bit; gray or RGB with equal channels)
    <root>/train/masks/<id>.png    101x101 mask (16-bit where salt exists, 8-bit where empty)
    <root>/train.csv               id,rle_mask
    <root>/depths.csv              id,z
    <root>/test/images/<id>.png    unlabelled images

No TensorFlow here: this module turns files into NumPy arrays, and every problem a user can cause
(missing file, unreadable PNG, wrong size, malformed RLE, duplicate ids) is a `DataError` with one line
naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterable, Sequence

import cv2
import numpy as np
import pandas as pd
from absl import logging

from salt_tf import IMAGE_SIZE


class DataError(ValueError):
    """A problem with the user's data files; the message is one line naming the file and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Run-length encoding, exactly as the competition defines it: pixels numbered from 1, top to bottom then
# left to right (column-major), pairs "start length", runs in increasing order, "" for an empty mask.


def rle_encode(mask: np.ndarray) -> str:
    """Encodes a 2-D binary mask as the competition's run-length string."""
    pixels = np.asarray(mask, dtype=bool).flatten(order="F")
    padded = np.concatenate([[False], pixels, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-based positions where runs start/end
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))


def rle_decode(rle: str | float | None, shape: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE),
               what: str = "rle_mask") -> np.ndarray:
    """Decodes a run-length string into a uint8 {0,1} mask of `shape`.

    Pandas reads an empty rle_mask cell as NaN, so NaN/None/"" all mean "no salt". A malformed string
    (odd count, non-integers, zero length, runs out of range, overlapping or unordered) raises DataError.
    """
    height, width = shape
    mask = np.zeros(height * width, dtype=np.uint8)
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return mask.reshape((width, height)).T
    tokens = str(rle).split()
    if not tokens:
        return mask.reshape((width, height)).T
    if len(tokens) % 2:
        raise DataError(f"{what}: run-length string has an odd number of values ({len(tokens)}); "
                        "it must be 'start length' pairs")
    values = []
    for token in tokens:
        try:
            values.append(int(token))
        except ValueError:
            raise DataError(f"{what}: run-length value {token!r} is not a whole number") from None
    values = np.array(values, dtype=np.int64)
    starts, lengths = values[0::2], values[1::2]
    if (starts < 1).any() or (lengths < 1).any():
        raise DataError(f"{what}: run-length starts must be >= 1 and lengths >= 1")
    ends = starts + lengths - 1
    if ends.max() > height * width:
        raise DataError(f"{what}: a run ends at pixel {ends.max()}, past the image's {height * width} pixels")
    if (starts[1:] <= ends[:-1]).any():
        raise DataError(f"{what}: runs overlap or are not in increasing order")
    for start, length in zip(starts, lengths):
        mask[start - 1:start - 1 + length] = 1
    return mask.reshape((width, height)).T


# ---------------------------------------------------------------------------------------------------------
# PNG reading.


_reported_8_bit_in_16: list[str] = []


def _warn_once_8_bit_in_16(path: str) -> None:
    if not _reported_8_bit_in_16:
        _reported_8_bit_in_16.append(path)
        logging.warning("%s: a 16-bit image whose values are all <= 255; read as 8-bit values (later files like "
                        "it are not reported)", path)


def read_png(path: str, *, kind: str) -> np.ndarray:
    """Reads a 101x101 image (kind='image', uint8) or mask (kind='mask', uint8 {0,1}).

    Images may be gray or RGB/RGBA with equal colour channels (Kaggle ships RGB); masks may be 8- or
    16-bit. A 16-bit image is scaled to 8 bits (its high byte), unless all its values are <= 255: then they are
    8-bit values in a 16-bit file and are kept as they are (a warning names the first such file). Anything else
    is a DataError naming the file.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not raw:
        raise DataError(f"{path}: file is empty; re-download or remove it")
    array = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise DataError(f"{path}: not a readable image (truncated or not a PNG); re-download or remove it")
    if array.ndim == 3:
        channels = array.shape[2]
        if channels not in (3, 4):
            raise DataError(f"{path}: unexpected {channels}-channel image; expected gray or RGB")
        colour = array[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise DataError(f"{path}: colour channels differ; expected a gray image stored as gray or equal RGB")
        array = colour[..., 0]
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: size {array.shape[1]}x{array.shape[0]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    if kind == "mask":
        return (array > 0).astype(np.uint8)
    if array.dtype == np.uint16:
        if int(array.max()) <= 255:
            # 8-bit values saved in a 16-bit file (some tools widen without rescaling): taking the high byte
            # would make the image black, so the values are kept, and the first such file is reported.
            _warn_once_8_bit_in_16(path)
            array = array.astype(np.uint8)
        else:  # a true 16-bit image: keep 8 bits of dynamic range like the rest
            array = (array >> 8).astype(np.uint8)
    if array.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {array.dtype}; expected 8- or 16-bit")
    return array


# ---------------------------------------------------------------------------------------------------------
# The labelled set.


@dataclasses.dataclass
class LabelledSet:
    """Images, masks and depths of a labelled set, row i belonging to ids[i]."""

    ids: np.ndarray       # [N] str
    images: np.ndarray    # [N, 101, 101] uint8
    masks: np.ndarray     # [N, 101, 101] uint8 in {0,1}
    depths: np.ndarray    # [N] float32, feet (NaN where depths.csv has no entry)

    def coverage(self) -> np.ndarray:
        """Fraction of salt pixels per image."""
        return self.masks.reshape(len(self.ids), -1).mean(axis=1)

    def subset(self, ids: Sequence[str]) -> "LabelledSet":
        index = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise DataError(f"ids not in the data set: {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}")
        rows = np.array([index[i] for i in ids], dtype=np.int64)
        return LabelledSet(self.ids[rows], self.images[rows], self.masks[rows], self.depths[rows])


DEPTHS_FILE = "depths.csv"
TRAIN_FILE = "train.csv"
_CHECK_DATA_DIR = "is --data_dir the folder of the Kaggle download?"


def _check_folder(flag: str) -> str:
    """The fix a missing layout file names: check the folder `flag` gave."""
    return _CHECK_DATA_DIR if flag == "--data_dir" else \
        f"is {flag} a folder in the Kaggle layout (train.csv, depths.csv, train/images, train/masks)?"


def _read_csv(path: str, columns: Iterable[str], missing_hint: str = _CHECK_DATA_DIR) -> pd.DataFrame:
    """A CSV of the layout as strings, checked: present (else `missing_hint` is the fix named), readable, with
    `columns` (names stripped), ids stripped and unique."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; {missing_hint}")
    try:
        # utf-8-sig drops a BOM; pandas handles CRLF line ends itself. Ids stay strings ("0050766ae2").
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            encoding_errors="replace")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    frame.columns = [c.strip() for c in frame.columns]
    for column in columns:
        if column not in frame.columns:
            raise DataError(f"{path}: missing column {column!r}; expected columns {', '.join(columns)}")
    frame["id"] = frame["id"].str.strip()
    duplicated = frame["id"][frame["id"].duplicated()].unique()
    if len(duplicated):
        raise DataError(f"{path}: duplicate id {duplicated[0]!r} ({len(duplicated)} duplicated in all)")
    return frame


def read_depths(path: str, missing_hint: str = _CHECK_DATA_DIR) -> dict[str, float]:
    """A depths CSV (`id,z`, as Kaggle's depths.csv) as {id: depth in feet}.

    Args:
        path: the CSV file (`<root>/depths.csv` of a data folder, or predict's --depths).
        missing_hint: the fix a missing file's error names (default: check --data_dir).

    Returns:
        The depth of each id of the file.

    Raises:
        DataError: missing, unreadable, without the columns id and z, a duplicate id, or a z that is not a
            number (one line naming the file).
    """
    frame = _read_csv(path, ("id", "z"), missing_hint)
    try:
        return dict(zip(frame["id"], frame["z"].astype(float)))
    except ValueError:
        raise DataError(f"{path}: column z must hold numbers") from None


def depth_array(depths: dict[str, float], ids: Sequence[str]) -> np.ndarray:
    """The depths of `ids` as float32 [N], NaN where `depths` has none."""
    return np.array([depths.get(i, np.nan) for i in ids], dtype=np.float32)


def depths_file_of_images(images_dir: str) -> str:
    """The depths.csv of an image folder in the Kaggle layout: <root>/test/images -> <root>/depths.csv."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(images_dir))), DEPTHS_FILE)


def image_folder_depths(images_dir: str, given: str | None, required: bool) -> dict[str, float] | None:
    """The depths of an unlabelled image folder: the --depths CSV `given`, else the Kaggle layout's depths.csv
    next to it (depths_file_of_images).

    Args:
        images_dir: the image folder (e.g. <root>/test/images).
        given: the --depths flag ("" or None: not given).
        required: a model needs the depths, so a missing file is an error; otherwise a missing layout file
            gives None (a given file must exist either way).

    Returns:
        {id: z}, or None when not required and neither file exists.
    """
    path = given or depths_file_of_images(images_dir)
    if not required and not given and not os.path.isfile(path):
        return None
    return read_depths(path, missing_hint="pass --depths=<depths.csv> for a --use_depth model")


def read_train_csv(root: str, flag: str = "--data_dir") -> pd.DataFrame:
    """train.csv as a frame with columns id, rle_mask (strings; '' for no salt); `flag` names the folder's flag
    in the error of a missing file."""
    return _read_csv(os.path.join(root, TRAIN_FILE), ("id", "rle_mask"), _check_folder(flag))


def train_ids(root: str, skipped: list | None = None, flag: str = "--data_dir") -> list[str]:
    """The labelled ids, in train.csv order, checked against the image and mask folders.

    With a `skipped` list (lenient mode), ids whose files are missing are left out and recorded there as
    (id, reason) instead of raising; image or mask files without a partner are ignored with a record too.
    """
    ids = list(read_train_csv(root, flag)["id"])
    on_disk = {}
    for folder in ("images", "masks"):
        directory = os.path.join(root, "train", folder)
        if not os.path.isdir(directory):
            raise DataError(f"{directory}: folder not found; expected the Kaggle layout train/{folder}/<id>.png")
        on_disk[folder] = {os.path.splitext(n)[0] for n in os.listdir(directory) if n.endswith(".png")}
    for folder in ("images", "masks"):
        missing = [i for i in ids if i not in on_disk[folder]]
        if not missing:
            continue
        message = (f"{os.path.join(root, 'train', folder, missing[0] + '.png')}: listed in train.csv but missing "
                   f"({len(missing)} missing in all)")
        if skipped is None:
            raise DataError(message)
        missing = set(missing)
        skipped.extend((i, f"{os.path.join(root, 'train', folder, i + '.png')}: listed in train.csv but missing")
                       for i in ids if i in missing)
        ids = [i for i in ids if i not in missing]
    for folder, other in (("masks", "images"), ("images", "masks")):
        extra = sorted(on_disk[folder] - on_disk[other])
        if not extra:
            continue
        partner = other[:-1]
        message = (f"{os.path.join(root, 'train', folder, extra[0] + '.png')}: has no matching {partner} "
                   f"({len(extra)} such files); remove it or add the {partner}")
        if skipped is None:
            raise DataError(message)
        skipped.extend((i, f"{os.path.join(root, 'train', folder, i + '.png')}: has no matching {partner}")
                       for i in extra)
    return ids


def load_labelled(root: str, ids: Sequence[str] | None = None, skipped: list | None = None,
                  flag: str = "--data_dir") -> LabelledSet:
    """Loads images, masks and depths of the labelled set (all of train.csv, or `ids`); `flag` is the flag that
    named `root` (--data_dir, --extra_data_dir), for the errors.

    Every mask PNG is checked against its train.csv run-length string. Strict by default: the first bad
    file raises DataError. With a `skipped` list, bad examples are left out and recorded there as
    (id, reason) — the `--nostrict` mode.
    """
    if not os.path.isdir(root):
        fix = "--data_dir=<Kaggle download> or --dataset=demo" if flag == "--data_dir" else \
            f"{flag}=<a folder in the Kaggle layout>"
        raise DataError(f"{root}: data folder not found; pass {fix}")
    all_ids = train_ids(root, skipped, flag)
    ids = all_ids if ids is None else list(ids)
    depths = read_depths(os.path.join(root, DEPTHS_FILE), _check_folder(flag))
    rles = dict(zip(*[read_train_csv(root, flag)[c] for c in ("id", "rle_mask")]))
    kept, images, masks = [], [], []
    for i in ids:
        try:
            image = read_png(os.path.join(root, "train", "images", f"{i}.png"), kind="image")
            mask_path = os.path.join(root, "train", "masks", f"{i}.png")
            mask = read_png(mask_path, kind="mask")
            if not np.array_equal(rle_decode(rles.get(i), what=f"train.csv rle_mask of id {i}"), mask):
                raise DataError(f"{mask_path}: differs from its rle_mask in train.csv; one of them is corrupt")
        except DataError as e:
            if skipped is None:
                raise
            skipped.append((i, str(e)))
            continue
        kept.append(i)
        images.append(image)
        masks.append(mask)
    if not kept:
        raise DataError(f"{root}: no usable labelled images")
    return LabelledSet(np.array(kept, dtype=object), np.stack(images), np.stack(masks), depth_array(depths, kept))


def list_images(directory: str) -> list[str]:
    """Ids of the PNG files in a folder (e.g. test/images), sorted."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: folder not found")
    return sorted(os.path.splitext(n)[0] for n in os.listdir(directory) if n.lower().endswith(".png"))


def read_image_folder(directory: str, skip_bad: bool = False) -> tuple[list[str], np.ndarray, list]:
    """Every PNG image of an unlabelled folder (e.g. <root>/test/images), sorted by id.

    Every file is read before anything else happens, so a bad one stops the caller before it writes.

    Args:
        directory: the folder.
        skip_bad: leave unreadable files out (and return them) instead of raising.

    Returns:
        (ids, images uint8 [N,101,101], bad: [(path, reason)] of the files left out).

    Raises:
        DataError: no folder, no PNG, none readable, or (without skip_bad) an unreadable file, naming it and
            how many are bad.
    """
    ids = list_images(directory)
    if not ids:
        raise DataError(f"{directory}: no PNG images")
    names = {os.path.splitext(n)[0]: n for n in os.listdir(directory) if n.lower().endswith(".png")}
    kept, images, bad = [], [], []
    for id_ in ids:
        path = os.path.join(directory, names[id_])
        try:
            images.append(read_png(path, kind="image"))
            kept.append(id_)
        except DataError as e:
            bad.append((path, str(e)))
    if bad and not skip_bad:
        extra = f"; {len(bad)} of {len(ids)} files are unreadable" if len(bad) > 1 else ""
        raise DataError(f"{bad[0][1]}{extra} (--skip_bad predicts the others)")
    if not kept:
        raise DataError(f"{directory}: none of the {len(ids)} PNG files is readable")
    return kept, np.stack(images), bad


def fingerprint(root: str, ids: Sequence[str]) -> str:
    """SHA-256 over the ids and the bytes of their image and mask files: changes when any input changes."""
    digest = hashlib.sha256()
    for i in sorted(ids):
        digest.update(i.encode())
        for folder in ("images", "masks"):
            with open(os.path.join(root, "train", folder, f"{i}.png"), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()
