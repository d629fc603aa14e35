"""`python tests/logical_cpus_train.py N [train flags]`: the train command with this machine's CPU split into
N logical devices, so MirroredStrategy has N devices to mirror over on a CPU-only machine. The split must
happen before TensorFlow initializes, hence a process of its own."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

if __name__ == "__main__":
    count = int(sys.argv.pop(1))
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    from salt_tf import flags as salt_flags, train

    salt_flags.define_flags()
    flags.adopt_module_key_flags(salt_flags)
    app.run(train.main, flags_parser=train.parse_flags)
