"""tools/timing.py, the benchmark tools' one timing helper, against a callable whose duration is known."""

import time

from tool_modules import import_tool

timing = import_tool("timing")


def test_rates_count_warmup_and_timed_calls_and_measure_the_sleep():
    calls = []

    def work():
        calls.append(time.perf_counter())
        time.sleep(0.02)

    rates = timing.rates(work, images_per_call=8, calls=3, repeats=4, warmup=2)
    assert len(calls) == 2 + 3 * 4 and len(rates) == 4
    # 8 images per 0.02 s call = at most 400 images/s; sleeping never returns early, scheduling only adds time.
    assert all(100 < rate <= 400 for rate in rates), rates


def test_median_rate_is_the_median_of_the_blocks():
    durations = iter([0.0] + [0.01, 0.04, 0.02])  # the warm-up call, then one call per block

    def work():
        time.sleep(next(durations))

    rate = timing.median_rate(work, images_per_call=1, calls=1, repeats=3, warmup=1)
    # Blocks of 0.01, 0.04, 0.02 s (plus overhead): median block 0.02 s = 50/s, the others 100/s and 25/s.
    # A mean would give ~58/s, the fastest block 100/s, the slowest 25/s.
    assert 25 < rate <= 50, rate
