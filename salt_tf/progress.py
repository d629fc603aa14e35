"""Progress of a long loop (the steps of an epoch, the images of a prediction) with rate and time left.

Two displays, chosen by where the output goes:
- a terminal: Keras' `Progbar` (an existing, maintained utility that ships with TensorFlow), redrawn in place
  with the count, a bar, the rate and its own ETA, plus the time left in the whole run when one is known;
- anything else (a log file, CI, a cluster job): one plain log line every `every` items, as before, now with
  the rate and the time left, so `tail -f` of a log says when the epoch and the run will end.

Keras decides "dynamic display" by the platform (any POSIX system counts), not by whether stdout is a
terminal, so in a log its bar would write carriage returns; hence the choice of display is made here, from
`isatty()`, and the bar is used only on a terminal.

Only wall-clock bookkeeping: nothing here touches a tensor, so progress never changes what is computed.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from absl import logging


def format_seconds(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: the time left, at the precision a person plans with."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Reports `done` of `total` items of one loop, live on a terminal, as plain lines otherwise.

    Args:
        total: items in this loop (steps of the epoch, images to predict).
        label: what the loop is, e.g. "epoch 3/24" or "predict"; starts each plain line.
        unit: name of an item, plural in rates ("step" -> "steps/s").
        every: plain mode: a line each time `done` reaches or passes a multiple of `every` (0: none), so
            updates in steps of any size (batches, parts of batches) give the same lines; the terminal bar
            redraws at most 20 times/s.
        items_per_unit: images per item, for an images/s figure (the batch size for steps; 1 for images).
        remaining_after: items still to come after this loop in the same run (later epochs), so the time left
            in the run can be estimated at this loop's rate; None when unknown or irrelevant.
        stream: where the output goes; decides the display (a terminal gets the bar).
        clock: seconds, monotonic (injectable for tests).
        log: the plain-line writer (absl's logging.info by default).
    """

    def __init__(self, total: int, *, label: str, unit: str = "step", every: int = 0, items_per_unit: int = 1,
                 remaining_after: int | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, log: Callable[..., None] = logging.info):
        self.total, self.label, self.unit, self.every = int(total), label, unit, int(every)
        self.items_per_unit, self.remaining_after = items_per_unit, remaining_after
        self.clock, self.log = clock, log
        stream = sys.stdout if stream is None else stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self._bar = None
        if self.live and self.total > 0:
            from keras.utils import Progbar  # noqa: PLC0415 (TensorFlow is loaded by every caller already)

            # Values are shown as given (the caller passes means already), hence no stateless metrics.
            self._bar = Progbar(self.total, unit_name=unit, stateless_metrics=set())
        self._start_time = clock()
        self._start_done: int | None = None
        self._last_done = 0

    def update(self, done: int, values: dict[str, float] | None = None) -> None:
        """Reports that `done` items of `total` are finished; `values` are shown as they are (e.g. mean loss).

        The rate counts only items done since the first update, so a resumed epoch (which starts at its
        saved step) does not look faster than it is.
        """
        if self._start_done is None:  # the first call fixes the origin of the rate
            self._start_done, self._start_time, self._last_done = done, self.clock(), done
            if self._bar is None:
                return
        if self._bar is not None:
            shown = [(k, float(v)) for k, v in (values or {}).items()]
            run_left = self._run_seconds_left(done)
            if run_left is not None:
                shown.append(("run_left_min", run_left / 60))
            self._bar.update(done, shown, finalize=done >= self.total)
        elif self.every and done < self.total and done // self.every > self._last_done // self.every:
            self.log("%s", self.line(done, values))
        self._last_done = done

    def line(self, done: int, values: dict[str, float] | None = None) -> str:
        """The plain progress line for `done` items, e.g. `epoch 2/12 step 40/88  loss 0.61  31.2 img/s ...`."""
        parts = [f"{self.label} {self.unit} {done}/{self.total}"]
        parts += [f"{name} {value:.4f}" for name, value in (values or {}).items()]
        rate = self._rate(done)
        if rate:
            images = self.items_per_unit > 1 or self.unit == "image"
            parts.append(f"{rate * self.items_per_unit:.1f} img/s" if images else f"{rate:.2f} {self.unit}s/s")
            parts.append(f"{format_seconds((self.total - done) / rate)} left")
            run_left = self._run_seconds_left(done)
            if run_left is not None:
                parts.append(f"run {format_seconds(run_left)} left")
        return "  ".join(parts)

    def _rate(self, done: int) -> float | None:
        """Items per second since the first update, or None before there is one to measure."""
        elapsed = self.clock() - self._start_time
        counted = done - (self._start_done or 0)
        return counted / elapsed if counted > 0 and elapsed > 0 else None

    def _run_seconds_left(self, done: int) -> float | None:
        """Time left in this loop and the ones after it, at this loop's rate (None when unknown)."""
        rate = self._rate(done)
        if rate is None or self.remaining_after is None:
            return None
        return (self.total - done + self.remaining_after) / rate
