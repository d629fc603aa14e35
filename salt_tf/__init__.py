"""salt_tf: a deterministic, low-level TensorFlow 2 training system for TGS Salt Identification."""

__version__ = "0.1.0"

import os as _os

# TensorFlow's BFC pool as its CPU allocator unless the environment chose (TF_CPU_ALLOCATOR_USE_BFC=false restores
# TensorFlow's default). Set here, before TensorFlow's first tensor can exist, without importing anything (the
# package's import stays bare: tests/test_cli.py, tests/test_rundir.py). Why: TensorFlow's
# default CPU allocator hands every large buffer back to the kernel when it is freed, and the next model call faults
# the same memory in again page by page. Measured on the 2-core AVX2 EPYC (89.5 GFLOP/s matmul ceiling),
# `predict submit` of models/salt-recipe on 640 test images with flip TTA: 16.8 million minor page faults and 44 of
# 103 CPU-seconds in the kernel; with the pool 0.19 million and 3 s, the model calls 56.2 -> 32.9 s (1.71x); on the
# 6,000 test images end to end 603.6 -> 327.8 s. The pool keeps what it has grown to until the process ends and
# changes no arithmetic: the probabilities, and a run's weights, hash the same with and without it
# (tests/test_predict.py, tests/test_determinism.py). It must be set before TensorFlow creates its CPU allocator (at
# its first tensor), hence here.
CPU_ALLOCATOR_VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"
_os.environ.setdefault(CPU_ALLOCATOR_VARIABLE, "true")

IMAGE_SIZE = 101  # The competition's images and masks are 101x101; the model keeps that size end to end.
