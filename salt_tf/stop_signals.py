"""SIGINT and SIGTERM of a training process: the first one asks the run to stop at the next safe point, a
second one stops it at once.

Why the first signal only records itself: Python's default SIGINT handler raises KeyboardInterrupt wherever
the main thread happens to be, and TensorFlow/Keras code running at that moment may catch it. A start-up
SIGINT was lost that way once (the test run trained to the end and exited 0). So the train command installs
one StopSignals before it imports TensorFlow and keeps it for the whole process: start-up checks it between
its phases (`raise_if_requested`), the training loop after every step (salt_tf.loop.Trainer). TF-free.
"""

from __future__ import annotations

import signal

from absl import logging

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The stop request of one process: None until SIGINT or SIGTERM arrives, then that signal's number."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Handles SIGINT and SIGTERM from now on (main thread only).

        Returns:
          True if this call installed the handlers, False if they already were (the caller must then leave
          `restore` to whoever installed them).
        """
        if self.installed:
            # Again: TensorFlow's runtime may have replaced the process-level handler since (a multi-worker
            # strategy's SIGTERM watcher did: CI's two-worker SIGTERM test trained to the end).
            for signum in SIGNALS:
                signal.signal(signum, self._on_signal)
            return False
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return True

    def restore(self) -> None:
        """Puts back the handlers that were there before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def request(self, signum: int) -> None:
        """Records a stop request (a signal here, or another worker's, which the loop learns by a vote)."""
        if self.signum is None:
            self.signum = signum

    def raise_if_requested(self) -> None:
        """Between start-up phases: a pending request stops the process now (nothing trained yet to save).

        Raises:
          KeyboardInterrupt: a signal has arrived (the train command turns it into one `stopped:` line).
        """
        if self.signum is not None:
            raise KeyboardInterrupt

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now, the last checkpoint stands
            raise KeyboardInterrupt
        self.request(signum)
        logging.warning("%s received: finishing the current step, then writing a checkpoint",
                        signal.Signals(signum).name)
