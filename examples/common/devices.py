"""Devices and precision: where a model runs and in which dtype.

`distribution(name)` returns a `Distribution` whose ``scope()`` the model is built
and compiled in: tf.distribute strategies on TensorFlow (``mirrored``: all GPUs,
else all logical CPUs; ``tpu``; ``multiworker``), keras.distribution on JAX
(``data_parallel``; ``model_parallel``, and ``--context-parallel N`` with either).
`configure_precision` sets the global dtype policy (``--mixed-precision``);
`split_cpu` splits the host CPU into logical devices, to try ``--distribute`` on a
machine without accelerators; `initialize_processes` joins the processes of one
run across hosts (``--num-processes``, JAX).

On JAX, ``model_parallel`` or ``--context-parallel N`` lays the devices out as a
``data x seq x model`` mesh: the batch split over ``data``, the sequence over
``seq`` (N devices; the attention layers are given
``keras_attn.ContextParallel(axis="seq")`` by `examples.common.cli`) and the heads
over ``model`` (``--model-parallel M``, by default the most devices that divide
the heads), with the layout of `keras_attn.layout_map` for the attention and
Megatron's for the MLP (``mlp_in`` split by its outputs, ``mlp_out`` by its
inputs: one all-reduce per block). The blocks' outputs are sharded along the
sequence, so activations between blocks take ``1 / N`` of a device each.
"""

import contextlib
import functools
import math
import os

import keras

from examples.common.run import RunError
from keras_attn import layouts

DISTRIBUTE_CHOICES = ("none", "mirrored", "tpu", "multiworker", "data_parallel", "model_parallel")
MESH_AXES = ("data", "seq", "model")  # the mesh of model_parallel and --context-parallel
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
        mesh: The ``data x seq x model`` `keras.distribution.DeviceMesh` of
            ``model_parallel`` and ``--context-parallel``, else None.
        num_processes: Processes taking part (JAX's multi-process runtime), else 1.
    """

    def __init__(
        self,
        name,
        scope_factory=contextlib.nullcontext,
        num_replicas=1,
        devices=(),
        mesh=None,
        num_processes=1,
    ):
        self.name = name
        self._scope_factory = scope_factory
        self.num_replicas = num_replicas
        self.devices = list(devices)
        self.mesh = mesh
        self.num_processes = num_processes

    def scope(self):
        return self._scope_factory()

    def describe(self):
        where = f"{self.name} over {self.num_replicas} device(s) {self.devices}"
        if self.mesh is not None:
            axes = " x ".join(f"{a} {n}" for a, n in zip(MESH_AXES, self.mesh.shape, strict=True))
            where = f"{self.name} over {len(self.devices)} device(s), mesh {axes}"
        if self.num_processes > 1:
            where += f", {self.num_processes} processes"
        return where

    @property
    def needs_full_batches(self):
        """Whether every batch must split evenly over the devices: JAX's keras.distribution
        shards each batch as it is (tf.distribute handles a short last batch)."""
        return self.name in ("data_parallel", "model_parallel")

    def held_out(self, dataset, batch_size):
        """`dataset` of held-out batches, cut to full batches where `needs_full_batches`
        (the last, short batch of up to ``batch_size - 1`` examples is left out)."""
        if not self.needs_full_batches:
            return dataset
        return dataset.unbatch().batch(batch_size, drop_remainder=True)

    def check(self, model):
        """Raise ValueError if `model`'s heads do not split over the mesh's model axis."""
        if self.mesh is not None and self.mesh.shape[MESH_AXES.index("model")] > 1:
            layouts.check_layout(model, self.mesh, "model")

    @contextlib.contextmanager
    def outside(self):
        """Run without the mesh (the steps after training: decoding with a KV cache,
        heatmaps of lengths that do not split over ``seq``); the weights stay where
        they are."""
        if self.mesh is None:
            yield
            return
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)


def initialize_processes(num_processes=None, process_id=None, coordinator=None):
    """Join this process to a run over `num_processes` processes (JAX), before any JAX op.

    `keras.distribution.initialize` over JAX's multi-process runtime: every process
    runs the same command with its own `process_id`; process 0 listens at
    `coordinator` (``host:port``). The CPU's collectives go through gloo (TCP), so
    processes on machines without accelerators take part too.

    Returns:
        The number of processes (1 where `num_processes` is None or 1: nothing done).

    Raises:
        RunError: a backend other than JAX, or a missing or invalid process id or
            coordinator.
    """
    if num_processes is None or num_processes == 1:
        return 1
    backend = keras.backend.backend()
    received = (
        f"Received: num_processes={num_processes}, process_id={process_id}, "
        f"coordinator={coordinator!r}"
    )
    if backend != "jax":
        raise RunError(
            "--num-processes needs the JAX backend (keras.distribution.initialize). On "
            "TensorFlow use --distribute multiworker with TF_CONFIG. "
            f"{received}, backend={backend!r}"
        )
    if num_processes < 1 or process_id is None or not 0 <= process_id < num_processes:
        raise RunError(f"--process-id must be one of 0..{num_processes - 1}. {received}")
    if not coordinator or ":" not in coordinator:
        raise RunError(
            f"--coordinator must be the host:port of process 0 (the same for all). {received}"
        )
    _initialize(num_processes, process_id, coordinator)
    return num_processes


@functools.cache  # JAX's runtime starts once per process
def _initialize(num_processes, process_id, coordinator):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(coordinator, num_processes, process_id)


def distribution(name, context_parallel=1, model_parallel=None, heads=None):
    """The `Distribution` for a ``--distribute`` value on the current backend.

    Args:
        name: The ``--distribute`` value.
        context_parallel: Devices the sequence is split over (JAX; 1: none).
        model_parallel: Devices the heads are split over (``model_parallel``; None:
            the most devices that divide `heads` and the devices left).
        heads: ``(num_heads, num_key_value_heads)`` of the model, or None.

    Raises:
        RunError: the backend does not offer `name` or context parallelism, the
            devices are missing (``tpu`` without a TPU), or do not split as asked.
    """
    backend = keras.backend.backend()
    context_parallel = context_parallel or 1
    received = (
        f"Received: distribute={name!r}, context_parallel={context_parallel}, "
        f"model_parallel={model_parallel}"
    )
    if name == "model_parallel" or context_parallel > 1 or (model_parallel or 1) > 1:
        if backend != "jax":
            raise RunError(
                "--distribute model_parallel, --model-parallel and --context-parallel need "
                "the JAX backend (keras.distribution lays out weights and sequences only "
                "there). Set KERAS_BACKEND=jax, or use data parallelism: --distribute "
                f"mirrored, tpu or multiworker on TensorFlow. {received}, backend={backend!r}"
            )
        if name not in ("data_parallel", "model_parallel"):
            raise RunError(
                "--context-parallel splits the sequence over devices: pass --distribute "
                "data_parallel (the other devices split the batch) or model_parallel "
                f"(they split the heads too). {received}"
            )
        if name == "data_parallel" and (model_parallel or 1) > 1:
            raise RunError(f"--model-parallel needs --distribute model_parallel. {received}")
        return _mesh_distribution(name, context_parallel, model_parallel, heads)
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
                f"(keras.distribution.DataParallel) or model_parallel. Received: "
                f"distribute={name!r}"
            )
        import jax

        devices = jax.devices()
        # Set globally, not in a scope: `fit` shards each batch by the distribution
        # active when it runs, not the one the model was built under.
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return Distribution(
            name, contextlib.nullcontext, len(devices), [str(d) for d in devices],
            num_processes=jax.process_count(),
        )  # fmt: skip
    raise RunError(f"--distribute is supported on tensorflow and jax. Received: backend={backend}")


def _mesh_distribution(name, context_parallel, model_parallel, heads):
    """`keras.distribution.ModelParallel` on a ``data x seq x model`` mesh of all devices."""
    import jax

    devices = jax.devices()  # every process's, in process order
    count = len(devices)
    if model_parallel is None:
        model_parallel = 1
        if name == "model_parallel" and heads and count % context_parallel == 0:
            model_parallel = math.gcd(count // context_parallel, *[h for h in heads if h])
    if context_parallel < 1 or model_parallel < 1 or count % (context_parallel * model_parallel):
        raise RunError(
            f"{count} device(s) do not split into --context-parallel {context_parallel} x "
            f"--model-parallel {model_parallel} (their product must divide the device "
            f"count; the rest split the batch). Received: context_parallel="
            f"{context_parallel}, model_parallel={model_parallel}, devices={count}"
        )
    shape = (count // (context_parallel * model_parallel), context_parallel, model_parallel)
    mesh = keras.distribution.DeviceMesh(shape, MESH_AXES, devices)
    layout = layouts.layout_map(mesh, model_axis="model")
    # Megatron's MLP: the first layer split by its outputs, the second by its inputs.
    layout[r"(?:.+/)?mlp_in/kernel"] = (None, "model")
    layout[r"(?:.+/)?mlp_in/bias"] = ("model",)
    layout[r"(?:.+/)?mlp_out/kernel"] = ("model", None)
    if context_parallel > 1:
        layout[r"(?:.+/)?block_\d+/output"] = ("data", "seq", None)  # (B, T, E)
    # Set globally (as data_parallel): `fit` shards each batch by the active distribution.
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="data")
    )
    return Distribution(
        name, contextlib.nullcontext, shape[0], [str(d) for d in devices], mesh=mesh,
        num_processes=jax.process_count(),
    )  # fmt: skip


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
