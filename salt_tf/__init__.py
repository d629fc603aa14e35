"""salt_tf: a deterministic, low-level TensorFlow 2 training system for TGS Salt Identification."""

__version__ = "0.1.0"

from salt_tf import tfstart as _tfstart  # noqa: E402  (no TensorFlow import: it only sets an environment default)

_tfstart.use_pooled_cpu_allocator()

IMAGE_SIZE = 101  # The competition's images and masks are 101x101; the model keeps that size end to end.
