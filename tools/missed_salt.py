"""Where the salt goes missing, and what post-processing could win back: issue 36's missed-salt measures.

    python tools/missed_salt.py --oof=runs/v2/round1                     # a CV parent's out-of-fold predictions
    python tools/missed_salt.py --model_dir=models/salt-recipe           # a run's (or release's) validation split
    python tools/missed_salt.py --model_dir=runs/recipe --data_dir=../shared/data/tgs_salt --threshold=0.48

The probabilities come from oof.npz (`cv collect`: every labelled image predicted by the fold that never saw it,
and the image head's probability where the folds have one), or from the models of --model_dir on their run's
validation images (split.csv) with flip TTA, as `predict evaluate` predicts them (their mean for several). At
--threshold (default 0.5), the command prints:

  missed salt      salt images predicted empty; how many score at some lower threshold (each at its own best of
                   0.02, 0.04, ...: ensemble.error_breakdown's "rescuable") and the score if each did, an upper
                   bound for any threshold rule; the image head's probability on them against true-empty images
  rescue rules     where the mask comes out empty: threshold at r instead, only where the head says >= g and only
                   masks of >= m pixels; the best by the score on these images, with the images won and lost
  small masks      salt images with at most 10 % coverage: predicted empty / salt in the wrong place (score 0) /
                   partly right / exact; the IoU quartiles of the partly right; their score at a per-image best
                   threshold
  size thresholds  a threshold of its own for masks predicted with 1..B pixels (B in --size_bands), its best
                   gain on these images

Everything is chosen on the images it is scored on, so every gain is optimistic (an upper bound); a rule worth
keeping must then win by cv in `predict evaluate`, which fits the post-processing on other folds of the images.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

RESCUE_THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
RESCUE_HEAD = (0.0, 0.3, 0.5, 0.7)
RESCUE_MIN_PIXELS = (0, 50, 200, 500)
GRID = np.round(np.arange(0.02, 0.99, 0.02), 2)  # the thresholds a per-size best is chosen from


def rescue(truth, probabilities, head, threshold: float, r: float, g: float, m: int) -> np.ndarray:
    """Masks [N,H,W] at `threshold`, where a mask comes out empty (and the head says >= g, if there is a head)
    thresholded at r instead, then emptied again if it has fewer than m pixels."""
    masks = probabilities > threshold
    n = len(masks)
    use = ~masks.reshape(n, -1).any(axis=1)
    if head is not None:
        use &= head >= g
    masks[use] = probabilities[use] > r
    small = use & (masks.reshape(n, -1).sum(axis=1) < m)
    masks[small] = False
    return masks


def rescue_rules(truth, probabilities, head, threshold: float) -> list[dict]:
    """Every rescue rule of the grid against the plain threshold: its mean-score difference, images won, images
    lost, images without salt given salt; the best (largest difference, then fewest changes) first."""
    from salt_tf import metrics

    truth = np.asarray(truth, bool)
    base = metrics.image_scores(truth, probabilities > threshold)
    has_salt = truth.reshape(len(truth), -1).any(axis=1)
    rows = []
    heads = RESCUE_HEAD if head is not None else (0.0,)
    for r in [r for r in RESCUE_THRESHOLDS if r < threshold]:
        for g in heads:
            for m in RESCUE_MIN_PIXELS:
                masks = rescue(truth, probabilities, head, threshold, r, g, m)
                scores = metrics.image_scores(truth, masks)
                rows.append({"r": r, "g": g, "m": m, "difference": float(scores.mean() - base.mean()),
                             "won": int((scores > base).sum()), "lost": int((scores < base).sum()),
                             "false_salt": int((~has_salt & masks.reshape(len(masks), -1).any(axis=1)).sum())})
    return sorted(rows, key=lambda row: (-row["difference"], row["won"] + row["lost"]))


def small_masks(truth, probabilities, threshold: float) -> dict:
    """The salt images of coverage group "small" (metrics.COVERAGE_GROUPS): how they fare at `threshold`."""
    from salt_tf import ensemble, metrics

    truth = np.asarray(truth, bool)
    n = len(truth)
    low, high = metrics.COVERAGE_GROUPS["small"]
    classes = metrics.coverage_class(truth.reshape(n, -1).mean(axis=1))
    small = (classes >= low) & (classes <= high)
    masks = probabilities > threshold
    scores = metrics.image_scores(truth, masks)
    predicted = masks.reshape(n, -1).any(axis=1)
    inter = (truth & masks).reshape(n, -1).sum(axis=1)
    union = (truth | masks).reshape(n, -1).sum(axis=1)
    partly = small & (scores > 0) & (scores < 1)
    best = ensemble.best_lower_threshold_scores(truth[small], probabilities[small], 1.0)  # 0.02 .. 0.98
    return {"images": int(small.sum()), "score": float(scores[small].mean()) if small.any() else float("nan"),
            "empty": int((small & ~predicted).sum()), "wrong_place": int((small & predicted & (scores == 0)).sum()),
            "partly": int(partly.sum()), "exact": int((small & (scores == 1)).sum()),
            "partly_iou_quartiles": [float(q) for q in np.quantile(inter[partly] / union[partly], [0.25, 0.5, 0.75])]
            if partly.any() else [],
            "best_threshold_score": float(best.mean()) if small.any() else float("nan")}


def size_thresholds(truth, probabilities, threshold: float, bands) -> list[dict]:
    """For each band B: the images whose mask at `threshold` has 1..B pixels, given their own best threshold of
    GRID instead (chosen on them); the gain in mean score over all images."""
    from salt_tf import metrics

    truth = np.asarray(truth, bool)
    n = len(truth)
    pixels = (probabilities > threshold).reshape(n, -1).sum(axis=1)
    base = metrics.image_scores(truth, probabilities > threshold)
    rows = []
    for band in bands:
        members = (pixels > 0) & (pixels <= band)
        best_gain, best_t = 0.0, threshold
        if members.any():
            for t in GRID:
                gain = (metrics.image_scores(truth[members], probabilities[members] > t).sum()
                        - base[members].sum()) / n
                if gain > best_gain:
                    best_gain, best_t = float(gain), float(t)
        rows.append({"band": int(band), "images": int(members.sum()), "threshold": best_t, "gain": best_gain})
    return rows


def head_quantiles(truth, head, missed) -> dict:
    """The head's probability quartiles (and 90th percentile) on missed images and on true-empty images."""
    truth = np.asarray(truth, bool)
    empty = ~truth.reshape(len(truth), -1).any(axis=1)
    q = [0.25, 0.5, 0.75, 0.9]
    return {name: [float(v) for v in np.quantile(head[sel], q)] if sel.any() else []
            for name, sel in (("missed", missed), ("empty", empty))}


def report(truth, probabilities, head, threshold: float, bands) -> dict:
    """Prints the four parts of the module docstring; returns them."""
    from salt_tf import ensemble

    truth = np.asarray(truth, bool)
    masks = probabilities > threshold
    b = ensemble.error_breakdown(truth, masks, probabilities, threshold)
    n = len(truth)
    missed = truth.reshape(n, -1).any(axis=1) & ~masks.reshape(n, -1).any(axis=1)
    print(f"{n} images at threshold {threshold:g}: score {b['all']:.4f}; false salt {b['false_salt_images']}; "
          f"missed salt {b['missed_images']}, of which {b['rescuable_images']} score at some lower threshold "
          f"(each at its own best: {b['with_missed_rescued']:.4f} at most)")
    result = {"breakdown": b}
    if head is not None:
        result["head"] = head_quantiles(truth, head, missed)
        print("image head, quartiles and 90th percentile: missed salt "
              + " ".join(f"{v:.2f}" for v in result["head"]["missed"]) + "; true empty "
              + " ".join(f"{v:.2f}" for v in result["head"]["empty"]))
    result["rescue"] = rescue_rules(truth, probabilities, head, threshold)
    print("rescue rules (empty mask -> threshold r, if head >= g, if >= m px), best 5 by score on these images, "
          "then the best that changes any image:")
    changing = [row for row in result["rescue"] if row["won"] + row["lost"]]
    shown = result["rescue"][:5]
    for row in shown + [row for row in changing[:1] if row not in shown]:
        print(f"  r {row['r']:.2f} g {row['g']:.1f} m {row['m']:>3}: {row['difference']:+.4f}  won {row['won']} "
              f"lost {row['lost']}  false salt {row['false_salt']}")
    s = result["small"] = small_masks(truth, probabilities, threshold)
    if not s["images"]:
        print("small masks: none among these images")
    else:
        print(f"small masks: {s['images']} images, score {s['score']:.4f}: {s['empty']} predicted empty, "
              f"{s['wrong_place']} salt in the wrong place, {s['partly']} partly right (IoU quartiles "
              + " ".join(f"{v:.2f}" for v in s["partly_iou_quartiles"]) + f"), {s['exact']} exact; "
              f"each at its own best threshold {s['best_threshold_score']:.4f}")
    result["sizes"] = size_thresholds(truth, probabilities, threshold, bands)
    for row in result["sizes"]:
        print(f"masks of 1..{row['band']} px ({row['images']} images): own threshold {row['threshold']:.2f}, "
              f"{row['gain']:+.4f}")
    print("every figure is chosen on the images it is scored on: an upper bound, not a cv score")
    return result


def load(args):
    """(truth [N,101,101] bool, probabilities [N,101,101], head [N] or None) of --oof or --model_dir."""
    if args.oof:
        from salt_tf import oof, rundir

        arrays = oof.load(os.path.join(args.oof, rundir.OOF_FILE))
        return arrays["masks"].astype(bool).reshape(arrays["probabilities"].shape), arrays["probabilities"], \
            arrays.get("has_salt")
    from salt_tf import exports, rundir, tfstart
    from salt_tf.data import kaggle, splits

    # Every check a user can fail first, without TensorFlow: the models, the split, the data.
    entries = exports.find_exports(args.model_dir)
    run = args.model_dir
    split = splits.read_split(os.path.join(run, rundir.SPLIT_FILE))
    data = kaggle.load_labelled(args.data_dir or rundir.data_dir(run), list(split.loc[split["role"] == "val", "id"]))
    tfstart.import_tensorflow()  # the commands' quiet start (no CUDA notices)
    from salt_tf import pipeline, tta

    predictions = []
    for entry in entries:
        inputs, truth = pipeline.to_arrays(data, exports.restore(entry).use_depth)
        predictions.append(tta.predict_with_head(entry.model, inputs, batch_size=64, tta=tta.parse_tta(args.tta)))
    heads = [h for _, h in predictions if h is not None]
    return (np.asarray(truth).reshape(-1, *predictions[0][0].shape[1:]) > 0.5, np.mean([p for p, _ in predictions], 0),
            np.mean(heads, 0) if len(heads) == len(predictions) else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--oof", help="a CV parent with oof.npz (python -m salt_tf.cv collect)")
    source.add_argument("--model_dir", help="a run directory or release with split.csv: its validation images")
    parser.add_argument("--data_dir", help="with --model_dir: the labelled folder (default: the run's own)")
    parser.add_argument("--tta", default="hflip", help="with --model_dir: the views, as predict's --tta")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--size_bands", default="100,300,1000", help="comma-separated pixel counts")
    args = parser.parse_args(argv)
    try:
        bands = [int(b) for b in args.size_bands.split(",")]
        if not 0 < args.threshold < 1:
            raise ValueError(f"--threshold={args.threshold}: give a probability in (0, 1)")
        truth, probabilities, head = load(args)
    except (ValueError, FileNotFoundError) as e:  # every salt_tf error a user can cause is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(truth, np.asarray(probabilities, np.float32), head, args.threshold, bands)
    return 0

if __name__ == "__main__":
    sys.exit(main())
