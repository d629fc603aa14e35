"""Gradients of a tensor with three or more consumers are summed two at a time (determinism.configure).

With TensorFlow's single 3- or 4-input AddN the gradients varied across processes (--se_type=scse
--deep_supervision --hypercolumn --input_size=128, real data, first step); with two-input sums they did not.
"""

import numpy as np
import tensorflow as tf

from salt_tf import determinism


def test_three_or_more_gradients_are_summed_two_at_a_time():
    determinism.use_pairwise_gradient_aggregation()
    x = tf.Variable(np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(2, 3, 4))

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(x * 3.0) + tf.reduce_sum(tf.sin(x)) + tf.reduce_sum(x * x) + tf.reduce_mean(x)
        return tape.gradient(loss, x)

    graph = gradient.get_concrete_function().graph
    widths = [len(op.inputs) for op in graph.get_operations() if op.type == "AddN"]
    assert widths and max(widths) == 2, widths
    expected = ((3.0 + np.cos(x.numpy())) + 2.0 * x.numpy()) + 1.0 / 24
    np.testing.assert_allclose(gradient().numpy(), expected, rtol=1e-6)
