"""salt_tf: a deterministic, low-level TensorFlow 2 training system for TGS Salt Identification."""

__version__ = "0.1.0"

import os as _os

# TensorFlow's BFC pool as its CPU allocator unless the environment chose (TF_CPU_ALLOCATOR_USE_BFC=false restores
# TensorFlow's default): measured 1.84x on predict submit, no bit changed. Set here, before TensorFlow's first tensor
# can exist, and without importing anything of salt_tf (the package's import stays bare); the why and the figures:
# salt_tf.tfstart.CPU_ALLOCATOR_VARIABLE.
CPU_ALLOCATOR_VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"
_os.environ.setdefault(CPU_ALLOCATOR_VARIABLE, "true")

IMAGE_SIZE = 101  # The competition's images and masks are 101x101; the model keeps that size end to end.
