"""Compiling and timing a step, the same way in every benchmark script.

    step = timing.compiled_step(keras.ops.matmul, a, b)             # forward only
    step = timing.gradient_step(loss, q, k, v, variables=weights)   # forward+backward
    passes = timing.time_passes(step, repeats=5)                    # one warm-up, then 5
    print(passes.median, passes.min, passes.warmup_s)

A step is a function of no arguments that runs the computation once and returns
when it is done: JAX's work is waited for with ``block_until_ready``; on TensorFlow
and PyTorch each result is reduced to one number inside the step and fetched, so
the wait costs no copy of a large result. JAX and TensorFlow compile the step
(``jax.jit``, ``tf.function``); PyTorch runs it eagerly, as Keras runs PyTorch by
default.

Keras is imported inside the functions: the scripts choose the backend
(``KERAS_BACKEND``) after importing this module.
"""

import dataclasses
import statistics
import time


def compile_function(fn, jit_compile=False):
    """`fn` traced and compiled once for the backend: ``jax.jit``, ``tf.function``
    (with XLA if `jit_compile`), or `fn` itself on PyTorch (eager)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=jit_compile)
    return fn


def wait(outputs):
    """Block until `outputs` (a tensor or a structure of them) are computed; returns them
    (as numpy on TensorFlow and PyTorch, where fetching them is the wait)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.block_until_ready(outputs)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)


def _sums(outputs):
    """One number per result tensor, computed where the results are."""
    import keras

    return [keras.ops.sum(t) for t in keras.tree.flatten(outputs)]


def compiled_step(fn, *args, jit_compile=False):
    """A step running ``fn(*args)``, compiled (see `compile_function`).

    On TensorFlow and PyTorch the step reduces each result to its sum before
    fetching it (so no copy of a large result is timed); JAX waits for the
    results themselves.
    """
    import keras

    if keras.backend.backend() == "jax":
        compiled = compile_function(fn, jit_compile)
    else:
        compiled = compile_function(lambda *a: _sums(fn(*a)), jit_compile)
    return lambda: wait(compiled(*args))


def gradient_step(loss, *args, variables=()):
    """A step computing the gradients of the scalar ``loss(*args)`` with respect to every
    argument and every one of `variables` (Keras variables `loss` reads, e.g. a layer's
    ``trainable_variables``): a forward and a backward pass.

    JAX differentiates a pure function of the variables' values (`keras.StatelessScope`)
    under ``jax.jit``; TensorFlow records the pass on a ``tf.GradientTape`` inside a
    ``tf.function``; PyTorch runs ``backward()`` eagerly (and synchronizes CUDA).
    """
    import keras

    variables = list(variables)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def pure(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return loss(*args)

        grad = jax.jit(jax.grad(pure, argnums=tuple(range(len(args) + 1))))
        values = [v.value for v in variables]
        return lambda: jax.block_until_ready(grad(values, *args))
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def grad(*args):
            with tf.GradientTape() as tape:
                tape.watch(args)
                value = loss(*args)
            return _sums(tape.gradient(value, [*args, *variables]))

        return lambda: wait(grad(*args))
    import torch

    args = [a.detach().requires_grad_(True) for a in args]
    tensors = [*args, *(v.value for v in variables)]

    def step():
        for t in tensors:
            t.grad = None
        loss(*args).backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return step


@dataclasses.dataclass(frozen=True)
class Passes:
    """The timed passes of a step.

    Attributes:
        warmup_s: Seconds of the first pass (tracing and compiling included).
        times: Seconds of each timed pass after it.
    """

    warmup_s: float
    times: tuple

    @property
    def median(self):
        return statistics.median(self.times)

    @property
    def min(self):
        return min(self.times)


def time_passes(step, repeats=5, min_seconds=0.0, max_repeats=None, budget_s=None):
    """Run `step` once to warm up (trace, compile), then time it.

    Args:
        step: A function of no arguments that returns when its work is done.
        repeats: Fewest timed passes.
        min_seconds: Keep timing past `repeats` until the passes add up to this
            (short passes are noisy), up to `max_repeats` passes.
        max_repeats: Most passes `min_seconds` may add (default: `repeats`).
        budget_s: Stop once the timed passes add up to more than this many seconds,
            even before `repeats`.

    Returns:
        `Passes`.
    """
    start = time.perf_counter()
    step()
    warmup = time.perf_counter() - start
    max_repeats = repeats if max_repeats is None else max_repeats
    times = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if budget_s is not None and sum(times) > budget_s:
            break
    return Passes(warmup, tuple(times))
