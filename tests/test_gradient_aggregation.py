"""Gradients of a tensor with three or more consumers are summed two at a time (determinism.configure).

With TensorFlow's single 3- or 4-input AddN the gradients varied across processes (--se_type=scse
--deep_supervision --hypercolumn --input_size=128, real data, first step); with two-input sums they did not, as
long as grappler's arithmetic optimizer (off under --deterministic) does not merge them back.
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


def _optimized_graph(concrete_function):
    """The GraphDef grappler makes of a concrete function with this process's optimizer options (those the
    function runtime applies when it runs it), function library included."""
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow.python.eager import context
    from tensorflow.python.grappler import tf_optimizer

    graph = concrete_function.graph
    meta_graph = tf.compat.v1.train.export_meta_graph(graph_def=graph.as_graph_def(), graph=graph)
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(t.name for t in concrete_function.outputs)
    meta_graph.collection_def["train_op"].CopyFrom(fetch)
    return tf_optimizer.OptimizeGraph(context.context().config, meta_graph)


def addn_arities(graph_def):
    """{number of data inputs: how many AddN nodes have it}, over the graph and its function library."""
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    arities = {}
    for node in nodes:
        if node.op == "AddN":
            count = sum(not name.startswith("^") for name in node.input)
            arities[count] = arities.get(count, 0) + 1
    return arities


def test_the_train_step_grappler_runs_sums_two_tensors_at_a_time():
    """The model whose runs were not bit-identical (scSE + hypercolumn + deep supervision with 3 side outputs)
    and a 3-term loss: once determinism is configured, no AddN in the train step has more than two inputs, in
    the graph grappler makes of it, the one that runs. The traced graph is not enough: it had only two-input
    gradient sums while grappler's arithmetic optimizer merged them into 3-, 4- and 6-input AddNs (and 24
    processes gave 4 different gradients)."""
    import keras

    from salt_tf import losses, model as model_lib, step as step_lib

    determinism.configure(seed=0, deterministic=True)
    config = model_lib.ModelConfig(base_width=4, depth=3, blocks_per_level=1, se_ratio=2, se_type="scse",
                                   hypercolumn=True, deep_supervision=True)
    step = step_lib.TrainStep(model_lib.build_model(config), keras.optimizers.Adam(1e-3),
                              losses.build_losses(losses.LossConfig(loss="bce:1,dice:1,lovasz_sym_elu:1"),
                                                  deep_supervision=True), batch_size=2)
    spec = tf.TensorSpec([2, 101, 101, 1], tf.float32)
    concrete = tf.function(step.step_function(0)).get_concrete_function(spec, spec)
    traced = addn_arities(concrete.graph.as_graph_def())
    assert traced.get(2, 0) >= 20, traced  # the two-at-a-time gradient sums, there to be merged
    optimized = addn_arities(_optimized_graph(concrete))
    assert optimized.get(2, 0) >= 20 and max(optimized) == 2, optimized
