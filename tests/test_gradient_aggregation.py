"""Gradients of a tensor with three or more consumers are summed two at a time (determinism.configure).

With TensorFlow's single 3- or 4-input AddN the gradients varied across processes (--se_type=scse
--deep_supervision --hypercolumn --input_size=128, real data, first step); with two-input sums they did not.
"""

import numpy as np
import tensorflow as tf

from salt_tf import determinism


def test_three_or_more_gradients_are_summed_two_at_a_time():
    determinism.configure(seed=0, deterministic=True)
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


def test_the_multi_output_train_step_has_only_two_input_gradient_sums():
    """The model whose runs were not bit-identical (scSE + hypercolumn + deep supervision, padded input):
    once determinism is configured, no gradient sum in its compiled train step has more than two inputs."""
    import keras

    from salt_tf import losses, model as model_lib, step as step_lib

    determinism.configure(seed=0, deterministic=True)
    config = model_lib.ModelConfig(base_width=4, depth=2, blocks_per_level=1, se_ratio=2, se_type="scse",
                                   hypercolumn=True, deep_supervision=True, input_size=104)
    step = step_lib.TrainStep(model_lib.build_model(config), keras.optimizers.Adam(1e-3),
                              losses.build_losses(losses.LossConfig(loss="bce:1,lovasz_sym_elu:1"),
                                                  deep_supervision=True), batch_size=2)
    images = tf.zeros([2, 101, 101, 1])
    graph = tf.function(step.step_function(0)).get_concrete_function(images, images).graph

    def addn_widths(graph):
        widths = [len(op.inputs) for op in graph.get_operations() if op.type == "AddN"]
        for function in graph._functions.values():  # the gradient of a nested function lives in its own graph
            widths += [len(op.inputs) for op in function.graph.get_operations() if op.type == "AddN"]
        return widths

    widths = addn_widths(graph)
    assert widths and max(widths) == 2, sorted(widths)[-5:]
