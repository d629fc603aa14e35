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
    from salt_tf import run_table, rundir

    run_a, run_b = argv[1:]
    weights = run_table.weights_comparison(run_a, run_b)
    for missing in weights["missing"]:
        print(f"error: {missing}: no {rundir.FINGERPRINTS_FILE}; is it a salt_tf run directory with a "
              "finished epoch?", file=sys.stderr)
        return 2
    common, epoch = weights["epochs_compared"], weights["first_divergence"]
    if not common:
        print(f"no epoch in common between {run_a} and {run_b}")
        return 1
    if epoch is None:
        print(f"bit-identical weights after each of epochs {common[0]}..{common[-1]} "
              f"({weights['total_variables']} variables)")
        return 0
    print(f"weights diverge at epoch {epoch} (identical before it): {len(weights['variables'])} of "
          f"{weights['total_variables']} variables differ")
    for path in weights["variables"]:
        print(f"  {path}")
    flags_a, flags_b = (os.path.join(r, rundir.FLAGS_FILE) for r in (run_a, run_b))
    if os.path.isfile(flags_a) and os.path.isfile(flags_b):
        a, b = (rundir.read_flagfile(r) for r in (run_a, run_b))
        differing = [f"--{name}: {a.get(name)} -> {b.get(name)}" for name in sorted(set(a) | set(b))
                     if name not in run_table.IGNORED_FLAGS and a.get(name) != b.get(name)]
        if differing:
            print("flags that differ: " + ", ".join(differing))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
