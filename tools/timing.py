"""The one way the benchmark tools time a callable (bench.py, torch_twin.py): untimed warm-up calls (tracing,
compilation, first-touch allocation), then `repeats` timed blocks of `calls` calls; the median block is the
figure, so one block slowed by another process does not move it."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def rates(fn: Callable[[], object], images_per_call: int, calls: int, repeats: int, warmup: int = 1) -> list[float]:
    """Images per second of each timed block.

    Args:
      fn: the work of one call; it must block until done (e.g. end in `.numpy()`).
      images_per_call: images one call processes (1 with a FLOP count scaled by the caller).
      calls: calls per timed block.
      repeats: timed blocks.
      warmup: untimed calls first.

    Returns:
      `repeats` rates, in the order measured.
    """
    for _ in range(warmup):
        fn()
    measured = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        measured.append(images_per_call * calls / (time.perf_counter() - start))
    return measured


def median_rate(fn: Callable[[], object], images_per_call: int, calls: int, repeats: int, warmup: int = 1) -> float:
    """The median of `rates(...)`: images (or units) per second."""
    return statistics.median(rates(fn, images_per_call, calls, repeats, warmup))
