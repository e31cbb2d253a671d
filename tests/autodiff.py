"""Gradients by the backend's own autodiff, for tests that compare gradients."""

import keras
import numpy as np
import pytest


def value_and_grads(fn, *args):
    """``fn(*args)`` (a scalar) as a float, and its gradients for every argument (numpy)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        args = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(args)
            y = fn(*args)
        return float(y), [g.numpy() for g in tape.gradient(y, args)]
    if backend == "jax":
        import jax

        y, grads = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
        return float(y), [np.asarray(g) for g in grads]
    if backend == "torch":
        import torch

        args = [torch.tensor(a, requires_grad=True) for a in args]
        y = fn(*args)
        y.backward()
        return float(y), [a.grad.numpy() for a in args]
    pytest.skip(f"no gradient helper for backend {backend}")
