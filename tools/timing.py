"""The one way the benchmark tools time a callable (bench.py, torch_twin.py, bench_predict.py): untimed warm-up
calls (tracing, compilation, first-touch allocation), then `repeats` timed blocks of `calls` calls; the median
block is the figure, so one block slowed by another process does not move it. And the one way they measure the
machine's ceiling, TensorFlow's square matmul rate, so every tool's "/ ceiling" divides by the same figure."""

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


def tf_matmul_gflops(tf, size: int = 4096, repeats: int = 3, dtype=None) -> float:
    """TensorFlow's square matmul rate, GFLOP/s: the ceiling every tool's "/ ceiling" divides by.

    `tf.reduce_sum(tf.matmul(a, a))` in a tf.function (the sum keeps the host copy to one scalar), 5 calls per
    timed block, the median of `repeats` blocks after one warm-up call.

    Args:
      tf: the caller's tensorflow module (this module imports no framework, so torch_twin's PyTorch child can
        use it without starting TensorFlow).
      size: the matrices' side (4096 by default; a small one for smoke tests).
      repeats: timed blocks.
      dtype: the operands' dtype (default float32; bench.py's bfloat16 step is measured against bfloat16).

    Returns:
      2 * size**3 FLOPs per call times calls per second, over 1e9.
    """
    a = tf.cast(tf.random.normal([size, size]), dtype or tf.float32)
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, a)))
    return median_rate(lambda: matmul().numpy(), 1, 5, repeats, warmup=1) * 2 * size ** 3 / 1e9
