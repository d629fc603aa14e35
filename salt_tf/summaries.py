"""TensorBoard event files of a run: <run_dir>/events/{train,val}.

The loop decides when to write; this module only knows how.
"""

from __future__ import annotations

import os

import tensorflow as tf


class Summaries:
    def __init__(self, run_dir: str):
        events = os.path.join(run_dir, "events")
        self.train = tf.summary.create_file_writer(os.path.join(events, "train"))
        self.val = tf.summary.create_file_writer(os.path.join(events, "val"))

    @staticmethod
    def scalars(writer, values: dict, step: int) -> None:
        with writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    @staticmethod
    def text(writer, name: str, value: str, step: int) -> None:
        with writer.as_default(step=step):
            tf.summary.text(name, value)

    def flush(self) -> None:
        self.train.flush()
        self.val.flush()

    def close(self) -> None:
        self.train.close()
        self.val.close()
