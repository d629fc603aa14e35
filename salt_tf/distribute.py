"""Which tf.distribute strategy trains the run, which worker writes, and the few cross-replica helpers.

    --strategy=default       tf.distribute.get_strategy(): one device, no replicas; the loop's code path is
                             the same, every helper here is then a no-op
    --strategy=mirrored      MirroredStrategy over the local GPUs (or, with none, the local logical CPU
                             devices), or over --devices
    --strategy=multi_worker  MultiWorkerMirroredStrategy; the cluster and this process's place in it come from
                             the TF_CONFIG environment variable, as TensorFlow prescribes

The loop itself (loop.py) stays strategy-agnostic: it creates nothing outside `strategy.scope()`, runs the
per-replica part of a step with `strategy.run` and reduces explicitly with the helpers below.

Only the chief writes the run directory. Every other worker runs the same code with a private temporary
directory as its "run directory" (TensorFlow's multi-worker guide: all workers save, because saving can
involve collective ops, but only the chief's files are kept), deleted when the worker exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


class StrategyError(ValueError):
    """A distribution setting the user can fix (bad TF_CONFIG, missing device, indivisible batch); the
    message is one line naming it and the fix."""


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    is_chief: bool
    task: str = "chief"  # 'worker:1' etc., for messages and the temporary directory's name


def read_tf_config(environ=os.environ) -> dict:
    """The parsed and checked TF_CONFIG: {'cluster': {type: [host:port, ...]}, 'task': {type, index}}."""
    text = environ.get("TF_CONFIG", "")
    if not text.strip():
        raise StrategyError("--strategy=multi_worker needs the TF_CONFIG environment variable (the cluster and "
                            "this worker's task), e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", "
                            "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}'")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise StrategyError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}); see "
                            "docs/scaling.md") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise StrategyError("TF_CONFIG has no cluster.worker list of host:port addresses; set "
                            "\"cluster\": {\"worker\": [\"host1:port\", ...]}")
    for job, addresses in cluster.items():
        if job not in ("chief", "worker"):
            raise StrategyError(f"TF_CONFIG cluster has a '{job}' job; MultiWorkerMirroredStrategy uses only "
                                "'chief' and 'worker'")
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise StrategyError(f"TF_CONFIG cluster.{job} must be a list of 'host:port' strings, got "
                                f"{json.dumps(addresses)}")
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int):
        raise StrategyError(f"TF_CONFIG task must name this process's job and index, one of "
                            f"{', '.join(f'{{type: {j}, index: 0..{len(a) - 1}}}' for j, a in cluster.items())}; "
                            f"got {json.dumps(task)}")
    if not 0 <= task["index"] < len(cluster[task["type"]]):
        raise StrategyError(f"TF_CONFIG task index {task['index']} is outside cluster.{task['type']} (0.."
                            f"{len(cluster[task['type']]) - 1})")
    return config


def worker_role(config: dict | None) -> WorkerRole:
    """The chief is the 'chief' task if the cluster has one, else worker 0 (TensorFlow's convention)."""
    if config is None:
        return WorkerRole(is_chief=True)
    task_type, index = config["task"]["type"], config["task"]["index"]
    has_chief = bool(config["cluster"].get("chief"))
    is_chief = task_type == "chief" or (not has_chief and task_type == "worker" and index == 0)
    return WorkerRole(is_chief=is_chief, task=f"{task_type}:{index}")


def _device_name(spec: str) -> str:
    """'gpu:1', '/GPU:1', '/device:GPU:1' -> '/device:GPU:1'."""
    try:
        parsed = tf.DeviceSpec.from_string(spec if spec.startswith("/") else f"/{spec}")
    except ValueError:
        parsed = None
    if parsed is None or parsed.device_type is None or parsed.device_index is None:
        raise StrategyError(f"--devices: '{spec}' is not a device name; use e.g. GPU:0,GPU:1")
    return f"/device:{parsed.device_type.upper()}:{parsed.device_index}"


def create_strategy(name: str, devices: list[str] = (), config: dict | None = None) -> tf.distribute.Strategy:
    """The tf.distribute strategy for --strategy. Call after determinism.configure (TensorFlow's thread
    pools and devices are fixed by the first strategy or op) and, for multi_worker, before any other op."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        available = [d.name for d in tf.config.list_logical_devices()]
        if devices:
            wanted = [_device_name(d) for d in devices]
            missing = [d for d, w in zip(devices, wanted) if w not in available]
            if missing:
                raise StrategyError(f"--devices={','.join(devices)}: no device {', '.join(missing)} on this "
                                    f"machine; available: {', '.join(available)}")
            if len(set(wanted)) != len(wanted):
                raise StrategyError(f"--devices={','.join(devices)} names a device twice")
        else:
            # MirroredStrategy's own default, except that a CPU machine split into logical devices mirrors
            # over all of them rather than over CPU:0 alone.
            wanted = ([d.name for d in tf.config.list_logical_devices("GPU")]
                      or [d.name for d in tf.config.list_logical_devices("CPU")])
        return tf.distribute.MirroredStrategy(wanted)
    if name == "multi_worker":
        if config is None:
            raise StrategyError("--strategy=multi_worker needs TF_CONFIG")
        # RING: gRPC collectives, the implementation that works between CPU hosts (NCCL needs GPUs).
        # AUTO lets TensorFlow choose NCCL on GPUs.
        implementation = (tf.distribute.experimental.CommunicationImplementation.AUTO
                          if tf.config.list_physical_devices("GPU")
                          else tf.distribute.experimental.CommunicationImplementation.RING)
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))
    raise StrategyError(f"--strategy={name}: expected one of {', '.join(STRATEGIES)}")


def check_global_batch(strategy: tf.distribute.Strategy, batch_size: int, flag: str = "--batch_size") -> int:
    """The per-replica batch; the global batch must split evenly so every replica does the same work."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        lower, upper = batch_size // replicas * replicas, (batch_size // replicas + 1) * replicas
        raise StrategyError(f"{flag}={batch_size} (the global batch) does not divide evenly over {replicas} "
                            f"replicas; use a multiple of {replicas}, e.g. {lower or upper} or {upper}")
    return batch_size // replicas


def write_dir(run_dir: str, role: WorkerRole) -> str:
    """Where this worker writes: the run directory for the chief, a fresh temporary directory otherwise."""
    if role.is_chief:
        return run_dir
    return tempfile.mkdtemp(prefix=f"salt_tf-{role.task.replace(':', '')}-")


def remove_write_dir(path: str, role: WorkerRole) -> None:
    if not role.is_chief:
        shutil.rmtree(path, ignore_errors=True)


def synchronize_batch_norm(model, strategy: tf.distribute.Strategy, synchronized: bool) -> int:
    """Sets Keras 3's BatchNormalization(synchronized=True) on every BN layer of the model: batch statistics
    over the global batch (all-reduced sums in each layer, whose gradients are all-reduced too) instead of
    each replica's own share. With one replica there is nothing to synchronize and the layers are left as
    built (the same bits as ever). Returns the number of layers changed."""
    if not synchronized or strategy.num_replicas_in_sync == 1:
        return 0
    import keras

    layers = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.synchronized = True  # read at call time (keras.ops.moments(..., synchronized=...))
    return len(layers)


def sum_over_replicas(strategy: tf.distribute.Strategy, values):
    """Cross-replica context: the sum over all replicas (of all workers) of each per-replica value, as plain
    tensors in one batched collective. With one replica the values are returned as they are (no op added)."""
    if strategy.num_replicas_in_sync == 1:
        return values
    flat = tf.nest.flatten(values)
    # To this worker's first device (the updates copy from there to its other replicas' variables).
    device = strategy.extended.worker_devices[0]
    reduced = strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, [(v, device) for v in flat])
    return tf.nest.pack_sequence_as(values, [strategy.experimental_local_results(r)[0] for r in reduced])


def average_moving_statistics(strategy: tf.distribute.Strategy, variables) -> None:
    """Cross-replica context: sets every replica's copy of the given variables to their mean over replicas.

    Keras 3 creates batch-norm moving statistics with aggregation NONE, so under a strategy every replica
    updates its own copy from its own batch and the copies drift apart, while evaluation and checkpoints
    read one copy. Averaging after every step keeps them equal: the mean of the replicas' moving means is
    the moving mean of the global batch (equal shares); the mean of their variances misses the spread
    between the replicas' means (as in TF 2's Keras). With one replica: nothing to do, no op added."""
    if strategy.num_replicas_in_sync == 1 or not variables:
        return
    local_copies = strategy.run(lambda: [tf.identity(v) for v in variables])
    device = strategy.extended.worker_devices[0]
    means = strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.MEAN, [(v, device) for v in local_copies])
    for variable, mean in zip(variables, means):
        variable.assign(strategy.experimental_local_results(mean)[0])


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """True if `flag` is True on any worker. Workers must stop at the same step (a signal reaches one of
    them, or reaches them at different steps): one that stopped alone would leave the others waiting in the
    next collective. One worker: the flag itself, no communication."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return flag
    votes = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(1.0 if flag else 0.0))
    return bool(strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None) > 0)
