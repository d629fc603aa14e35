"""Compares the weights of two run directories epoch by epoch, bit for bit.

    python tools/compare_runs.py runs/a runs/b

Reads each run's fingerprints.json (SHA-256 of every variable after every epoch) and prints the first epoch
at which the weights diverge and which variables differ there, or that they are bit-identical over the
epochs both runs completed. Exit status: 0 identical, 1 diverged, 2 a run directory is unusable.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python tools/compare_runs.py RUN_DIR_A RUN_DIR_B", file=sys.stderr)
        return 2
    from salt_tf import records

    runs = argv[1:]
    fingerprints = []
    for run in runs:
        found = records.read_fingerprints(run)
        if not found:
            print(f"error: {run}: no {records.FINGERPRINTS_FILE}; is it a salt_tf run directory with a "
                  "finished epoch?", file=sys.stderr)
            return 2
        fingerprints.append(found)
    common, epoch, paths = records.first_divergence(*fingerprints)
    if not common:
        print(f"no epoch in common: {runs[0]} has {sorted(fingerprints[0])}, {runs[1]} has "
              f"{sorted(fingerprints[1])}")
        return 1
    if epoch is None:
        print(f"bit-identical weights after each of epochs {common[0]}..{common[-1]} "
              f"({len(fingerprints[0][common[-1]])} variables)")
        return 0
    total = len(set(fingerprints[0][epoch]) | set(fingerprints[1][epoch]))
    print(f"weights diverge at epoch {epoch} (identical before it): {len(paths)} of {total} variables differ")
    for path in paths:
        print(f"  {path}")
    flags_a, flags_b = (os.path.join(r, records.FLAGS_FILE) for r in runs)
    if os.path.isfile(flags_a) and os.path.isfile(flags_b):
        lines_a = set(open(flags_a).read().splitlines())
        lines_b = set(open(flags_b).read().splitlines())
        differing = sorted((lines_a ^ lines_b) - {l for l in lines_a | lines_b if l.startswith("--model_dir")})
        if differing:
            print("flags that differ: " + ", ".join(differing))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
