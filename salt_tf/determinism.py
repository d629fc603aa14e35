"""The one `--deterministic` switch, and the weights fingerprint that proves it works.

Seeds alone do not make TensorFlow training repeatable. `configure()` applies, in one place, everything a
run needs to be bit-identical across processes and across resume, and returns a record of what it applied
(written to the run directory). Call it before TensorFlow executes its first op: thread-pool sizes are fixed
at that point.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random

import numpy as np
import tensorflow as tf


def configure(seed: int, deterministic: bool) -> dict:
    """Seeds Python, NumPy and TensorFlow; with `deterministic`, also makes TensorFlow's ops and their
    scheduling deterministic. Returns what was applied."""
    applied = {"seed": seed, "deterministic": deterministic}
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)  # Keras initializers draw from the global TF seed (keras.utils.set_random_seed
    # does these three too; done directly so the record says exactly what was set).
    import keras

    keras.utils.set_random_seed(seed)
    if deterministic:
        # Ops with several kernels pick deterministic ones, or raise instead of silently racing.
        tf.config.experimental.enable_op_determinism()
        applied["op_determinism"] = True
        # Independent ops of the step graph running concurrently change the order in which oneDNN's
        # primitives see their thread pool, and with it how they split reductions: measured here to give
        # different weights across processes. One inter-op thread removes that; intra-op parallelism
        # (the 2 cores inside each convolution) is kept.
        use_pairwise_gradient_aggregation()
        applied["gradient_aggregation"] = "pairwise"
        # Grappler's arithmetic optimizer rewrites a tree of two-input sums into one N-input AddN, undoing
        # the pairwise sums: the step graph of --se_type=scse --hypercolumn --deep_supervision had no AddN of
        # more than 3 inputs before it and 11 3-input, 12 4-input and a 6-input AddN after it. Measured (24
        # processes of that model at width 8, 8 at a time, one step each): 4 different gradients with the
        # optimizer on (21 processes alike), all 24 alike with it off; the recipe's step time unchanged (1.9 s
        # per batch of 32 either way, 2-core AVX-512 EPYC).
        tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
        applied["grappler_arithmetic_optimization"] = False
        try:
            tf.config.threading.set_inter_op_parallelism_threads(1)
            applied["inter_op_threads"] = 1
        except RuntimeError:
            applied["inter_op_threads"] = "unchanged: TensorFlow was already initialized"
    applied["intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads()
    applied["onednn"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    return applied


def ordered_sum(tensors):
    """The sum of same-shaped tensors left to right, two at a time: ((t0 + t1) + t2) + ...

    What to use instead of `tf.add_n` of 3+ tensors in anything a training step computes: TensorFlow's CPU
    AddN accumulates into whichever input buffer it may reuse at run time and moves that input to the front,
    so its summation order, and the bits, can change between processes (see `use_pairwise_gradient_aggregation`).
    A sum of two is the same in either order. (`configure` keeps grappler from merging the chain back.)
    """
    from tensorflow.python.ops import gen_math_ops

    tensors = list(tensors)
    total = tensors[0]
    for tensor in tensors[1:]:
        total = gen_math_ops.add_n([total, tensor])
    return total


def use_pairwise_gradient_aggregation() -> None:
    """Makes GradientTape sum the gradients of a tensor with three or more consumers two at a time.

    TensorFlow aggregates them with one AddN, whose CPU kernel accumulates into whichever input buffer it may
    reuse and moves that input to the front of the sum (README, "Reproducibility"): with 3+ inputs the
    summation order, and so the bits, can change with the run-time state across processes (measured on real
    data: --deep_supervision --hypercolumn --se_type=scse --input_size=128 at width 8 gave different gradients
    at the first step, its graph having 3- and 4-input AddNs; with this hook, identical in two processes). A
    sum of two is the same in either order, so a chain of two-input sums is reproducible, as long as grappler's
    arithmetic optimizer does not merge the chain back into one AddN (it does: `configure` turns it off; 24
    processes side by side still gave 4 different gradients with the hook alone). One and two gradients are
    aggregated exactly as before.
    """
    from tensorflow.python import pywrap_tfe
    from tensorflow.python.eager import backprop

    default = backprop._aggregate_grads

    def aggregate(gradients):
        if len(gradients) > 2 and all(isinstance(g, tf.Tensor) for g in gradients):
            return ordered_sum(gradients)
        return default(gradients)

    pywrap_tfe.TFE_Py_RegisterVSpace(backprop._default_vspace._replace(aggregate_fn=aggregate))


def environment() -> dict:
    """Versions and machine, for the run record."""
    build = tf.sysconfig.get_build_info()
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "cuda": build.get("cuda_version"),
        "cudnn": build.get("cudnn_version"),
    }


def variable_fingerprints(variables) -> dict[str, str]:
    """SHA-256 of the exact bytes (with dtype and shape) of each variable, keyed by its path."""
    fingerprints = {}
    for variable in variables:
        name = getattr(variable, "path", None) or variable.name
        value = np.ascontiguousarray(variable.numpy())
        digest = hashlib.sha256(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
        fingerprints[name] = digest.hexdigest()
    return fingerprints


def combined_fingerprint(fingerprints: dict[str, str]) -> str:
    """One SHA-256 over per-variable fingerprints in path order."""
    digest = hashlib.sha256()
    for name, value in sorted(fingerprints.items()):
        digest.update(name.encode() + value.encode())
    return digest.hexdigest()


def weights_fingerprint(variables) -> str:
    """Equal for two sets of variables iff every weight is bit-equal (same paths, dtypes, shapes, bytes)."""
    return combined_fingerprint(variable_fingerprints(variables))

