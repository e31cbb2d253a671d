"""Devices and precision: where a model runs and in which dtype.

`distribution(name)` returns a `Distribution` whose ``scope()`` the model is built
and compiled in: tf.distribute strategies on TensorFlow (``mirrored``: all GPUs,
else all logical CPUs; ``tpu``; ``multiworker``), `keras.distribution.DataParallel`
on JAX (``data_parallel``). `configure_precision` sets the global dtype policy
(``--mixed-precision``); `split_cpu` splits the host CPU into logical devices, to
try ``--distribute`` on a machine without accelerators.
"""

import contextlib
import functools
import os

import keras

from examples.common.run import RunError

DISTRIBUTE_CHOICES = ("none", "mirrored", "tpu", "multiworker", "data_parallel")
PRECISION_CHOICES = ("float32", "mixed_float16", "mixed_bfloat16")


def configure_precision(mode):
    """Set the global dtype policy (``None`` = float32). Returns the policy name."""
    policy = mode or "float32"
    if policy not in PRECISION_CHOICES:
        raise RunError(
            f"Unknown precision {mode!r}; use one of {PRECISION_CHOICES}. Received: {mode}"
        )
    keras.config.set_dtype_policy(policy)
    return policy


def split_cpu(count):
    """Split the host CPU into `count` logical devices (TensorFlow; call before any op)."""
    if count is None or count <= 1:
        return
    if keras.backend.backend() == "jax":
        import jax

        if len(jax.devices()) < count:
            raise RunError(
                f"JAX sees {len(jax.devices())} device(s); set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={count} before starting Python. "
                f"Received: cpu_devices={count}"
            )
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or ()) == count:
        return  # already split so (a second run in the same process)
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as e:
        raise RunError(f"Too late to split the CPU (TensorFlow already started): {e}") from e


class Distribution:
    """Where a model runs. Build and compile the model inside ``scope()``.

    Attributes:
        name: The ``--distribute`` value.
        num_replicas: Number of devices the batch is split over.
    """

    def __init__(self, name, scope_factory=contextlib.nullcontext, num_replicas=1, devices=()):
        self.name = name
        self._scope_factory = scope_factory
        self.num_replicas = num_replicas
        self.devices = list(devices)

    def scope(self):
        return self._scope_factory()

    def describe(self):
        return f"{self.name} over {self.num_replicas} device(s) {self.devices}"

    @property
    def needs_full_batches(self):
        """Whether every batch must split evenly over the devices: JAX's DataParallel
        shards each batch as it is (tf.distribute handles a short last batch)."""
        return self.name == "data_parallel"

    def held_out(self, dataset, batch_size):
        """`dataset` of held-out batches, cut to full batches where `needs_full_batches`
        (the last, short batch of up to ``batch_size - 1`` examples is left out)."""
        if not self.needs_full_batches:
            return dataset
        return dataset.unbatch().batch(batch_size, drop_remainder=True)


def distribution(name):
    """The `Distribution` for a ``--distribute`` value on the current backend.

    Raises:
        RunError: the backend does not offer `name`, or the devices are missing
            (``tpu`` without a TPU).
    """
    backend = keras.backend.backend()
    if name in (None, "none"):
        if backend == "jax":
            keras.distribution.set_distribution(None)  # what an earlier run set
        return Distribution("none")
    if backend == "tensorflow":
        return _tf_distribution(name)
    if backend == "jax":
        if name != "data_parallel":
            raise RunError(
                f"On the JAX backend use --distribute data_parallel "
                f"(keras.distribution.DataParallel). Received: distribute={name!r}"
            )
        import jax

        devices = jax.devices()
        # Set globally, not in a scope: `fit` shards each batch by the distribution
        # active when it runs, not the one the model was built under.
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return Distribution(name, contextlib.nullcontext, len(devices), [str(d) for d in devices])
    raise RunError(f"--distribute is supported on tensorflow and jax. Received: backend={backend}")


# One strategy per name and process: two MirroredStrategy objects in one process
# share the keys of their collective ops, so a second run's gradient all-reduce
# would meet the first run's (a shape mismatch that aborts training).
@functools.cache
def _tf_distribution(name):
    import tensorflow as tf

    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            raise RunError(
                "--distribute tpu needs a TPU, and none was found "
                f"(TPUClusterResolver: {type(e).__name__}: {e}). Received: distribute='tpu'"
            ) from None
        strategy = tf.distribute.TPUStrategy(resolver)
        devices = [d.name for d in tf.config.list_logical_devices("TPU")]
    elif name == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        devices = [f"workers from TF_CONFIG: {os.environ.get('TF_CONFIG', 'unset (1 worker)')}"]
    else:
        raise RunError(
            "On the TensorFlow backend use --distribute none, mirrored, tpu or multiworker "
            f"(data_parallel is JAX's). Received: distribute={name!r}"
        )
    return Distribution(name, strategy.scope, strategy.num_replicas_in_sync, devices)
