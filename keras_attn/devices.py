"""One answer about the machine: what it runs on and which kernels it can take.

`keras_attn.dispatch.plan` decides a path from the components, the call and a
`Machine`; it never asks the backend itself. `current()` probes the machine once
(the backend, JAX's or PyTorch's default platform, whether FlexAttention and Splash
import, the Pallas opt-in). Tests and users construct a `Machine` to plan as on
other hardware, e.g. ``Machine(backend="jax", platform="gpu")``, and pass it to
`keras_attn.dispatch.plan`, or make every layer plan with it for a while with
`assume`.
"""

import contextlib
import dataclasses
import functools
import importlib
import os

import keras

__all__ = ["PALLAS_ENV_VAR", "Machine", "actual", "assume", "current", "exporting", "pallas_mode"]

PALLAS_ENV_VAR = "KERAS_ATTN_PALLAS"
PLATFORMS = ("cpu", "gpu", "tpu")


def pallas_mode(value=None):
    """``None`` (off, the default), ``"gpu"`` or ``"interpret"``, from `PALLAS_ENV_VAR`.

    Args:
        value: The setting to read; defaults to the environment variable's value.

    Raises:
        ValueError: An unknown value.
    """
    value = os.environ.get(PALLAS_ENV_VAR, "") if value is None else value
    value = str(value).strip().lower()
    if value in ("", "0", "false", "off", "no", "none"):
        return None
    if value in ("1", "true", "on", "yes", "gpu"):
        return "gpu"
    if value == "interpret":
        return "interpret"
    raise ValueError(
        f"{PALLAS_ENV_VAR} must be 0, 1 or interpret (the Pallas block-sparse kernel: off, "
        f"on where JAX sees a GPU, or also on a CPU in interpret mode). Received: {value!r}"
    )


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the planner may assume about the machine.

    Attributes:
        backend: Keras's backend: ``"jax"``, ``"tensorflow"`` or ``"torch"``.
        platform: Where the backend runs by default: ``"cpu"``, ``"gpu"`` (CUDA) or
            ``"tpu"``.
        flex_attention: Whether PyTorch's FlexAttention imports (torch >= 2.5).
        splash_attention: Whether JAX's Splash attention imports.
        pallas: The Pallas block-sparse kernel's opt-in (`pallas_mode`): None,
            ``"gpu"`` or ``"interpret"``.
        native_kernels: Whether the native and Pallas kernels may be planned at all
            (`keras_attn.dispatch.run` plans again without them when one fails).

    Raises:
        ValueError: an unknown backend, platform or Pallas mode.
    """

    backend: str
    platform: str = "cpu"
    flex_attention: bool = True
    splash_attention: bool = True
    pallas: str | None = None
    native_kernels: bool = True

    def __post_init__(self):
        if self.backend not in ("jax", "tensorflow", "torch", "numpy", "openvino"):
            raise ValueError(
                "`backend` must be one of 'jax', 'tensorflow', 'torch'. "
                f"Received: backend={self.backend!r}"
            )
        if self.platform not in PLATFORMS:
            raise ValueError(
                f"`platform` must be one of {PLATFORMS}. Received: platform={self.platform!r}"
            )
        pallas_mode(self.pallas)

    @property
    def fused_kernel_is_dense(self):
        """Whether `keras.ops.dot_product_attention` forms the whole score matrix here.

        True on a CPU (every backend's kernel there is the plain masked computation);
        False on a GPU or TPU, whose fused kernels may be flash kernels.
        """
        return self.platform == "cpu"

    def cudnn_window(self, dtype):
        """Whether cuDNN's sliding-window kernel takes heads of `dtype` (JAX, a GPU, 16-bit)."""
        return (
            self.backend == "jax"
            and self.platform == "gpu"
            and dtype is not None
            and keras.backend.standardize_dtype(dtype) in ("float16", "bfloat16")
        )

    @property
    def flex_attention_is_fast(self):
        """Whether FlexAttention runs compiled with a backward pass (PyTorch on CUDA)."""
        return self.backend == "torch" and self.flex_attention and self.platform == "gpu"

    @property
    def flex_attention_forward(self):
        """Whether compiled FlexAttention runs a forward pass here (PyTorch, any platform).

        On a CPU it has no backward pass: the plan takes it there only for calls that
        need no gradient (`keras_attn.dispatch.Call.needs_grad`).
        """
        return self.backend == "torch" and self.flex_attention

    def splash(self, dtype):
        """Whether Splash attention runs compiled for heads of `dtype` (JAX, a TPU, f32/bf16)."""
        return (
            self.backend == "jax"
            and self.splash_attention
            and self.platform == "tpu"
            and dtype is not None
            and keras.backend.standardize_dtype(dtype) in ("float32", "bfloat16")
        )

    @property
    def pallas_block_sparse(self):
        """Whether the opt-in Pallas block-sparse kernel runs here (JAX; a GPU unless interpret)."""
        if self.backend != "jax" or self.pallas is None:
            return False
        return self.pallas == "interpret" or self.platform == "gpu"

    @property
    def pallas_interpret(self):
        """Whether the Pallas kernel runs in interpret mode (no GPU)."""
        return self.platform != "gpu"


def _imports(module):
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@functools.cache
def _probe(backend):
    platform = "cpu"
    if backend == "jax":
        import jax

        platform = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(
            jax.default_backend(), "cpu"
        )
    elif backend == "tensorflow":
        import tensorflow as tf

        for kind in ("GPU", "TPU"):
            if tf.config.list_logical_devices(kind):
                platform = kind.lower()
    elif backend == "torch":
        import torch

        platform = "gpu" if torch.cuda.is_available() else "cpu"
    return platform, (
        backend == "torch" and _imports("torch.nn.attention.flex_attention"),
        backend == "jax"
        and _imports("jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel"),
    )


_assumed = []


def exporting():
    """Whether the call is being traced for an export (PyTorch's ``torch.export`` or
    ``torch.onnx``, what Keras's ``model.export`` uses on that backend).

    A native kernel (FlexAttention) has no op in the exported formats, so an
    exported model takes a portable path (`keras_attn.dispatch.run` plans without
    native kernels while this is True). False on the other backends, whose exports
    trace the portable paths planned for their CPU or GPU.
    """
    if keras.backend.backend() != "torch":
        return False
    import torch

    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def actual():
    """The `Machine` this process really runs on (an `assume` does not change it).

    Kernels ask it how to run (cuDNN or XLA, Pallas compiled or interpreted); the
    planner asks `current`.
    """
    backend = keras.backend.backend()
    platform, (flex, splash) = _probe(backend)
    return Machine(backend, platform, flex, splash, pallas_mode())


def current():
    """The `Machine` this process runs on (probed once per backend), or the one `assume`d.

    The Pallas opt-in is read from `PALLAS_ENV_VAR` at each call.
    """
    return _assumed[-1] if _assumed else actual()


@contextlib.contextmanager
def assume(machine):
    """Within the block, every plan is made for `machine` (a `Machine`).

    For tests and for reading what a model would run on other hardware
    (``layer.last_plan``); the kernels chosen must still run here to be called.
    """
    if not isinstance(machine, Machine):
        raise TypeError(f"`assume` takes a Machine. Received: {machine!r}")
    _assumed.append(machine)
    try:
        yield machine
    finally:
        _assumed.pop()
