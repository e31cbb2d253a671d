"""Native kernels: a backend's own exact kernel for an attention it can express.

These are kernels only: `keras_attn.dispatch.plan` decides when one runs (the
"native" path) and `keras_attn.dispatch.attend` calls it. Each computes exactly what
the dense path computes, or is not chosen.

- JAX: ``jax.nn.dot_product_attention`` with a sliding window
  (``local_window_size``), which runs cuDNN's flash kernel on an NVIDIA GPU
  (``implementation="cudnn"``; bfloat16/float16 inputs) and XLA elsewhere.
"""

import keras
from keras import ops

from keras_attn.patterns import Local

__all__ = ["jax_local_attention", "jax_window", "jax_cudnn_available"]


def jax_window(pattern):
    """``(left, right)`` for ``local_window_size`` if `pattern` is exactly a sliding window.

    `keras_attn.patterns.Local(window)` lets query i see keys ``|i - j| < window``:
    ``(window - 1, window - 1)``, or ``(window - 1, 0)`` when causal. None for any
    other pattern (a subclass that overrides ``mask`` included).
    """
    if not isinstance(pattern, Local) or type(pattern).mask is not Local.mask:
        return None
    reach = pattern.window - 1
    return (reach, 0 if pattern.causal else reach)


def jax_cudnn_available(dtype):
    """Whether cuDNN's kernel can run here for inputs of `dtype` (a GPU, 16-bit inputs)."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    dtype = keras.backend.standardize_dtype(dtype)
    return jax.default_backend() == "gpu" and dtype in ("float16", "bfloat16")


def jax_local_attention(query, key, value, *, scale, window):
    """Sliding-window attention by ``jax.nn.dot_product_attention``.

    Args:
        query: ``(B, T, H, D)``; key ``(B, T, K, D)``; value ``(B, T, K, D)``, with
            ``H`` a multiple of ``K`` (grouped-query attention), queries and keys at
            the same positions (no cache offset, ``Tq == Tk``).
        scale: Factor of the logits.
        window: ``(left, right)``: query i sees keys ``i - left .. i + right``.

    Returns:
        ``(B, T, H, D)`` in the query's dtype. Every query sees at least itself, so
        no row is empty.
    """
    import jax

    # cuDNN's kernel on a GPU (where `jax_cudnn_available` let the plan choose this);
    # XLA elsewhere (tests on a CPU).
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    left, right = window
    return jax.nn.dot_product_attention(
        query,
        key,
        value,
        scale=scale,
        is_causal=right == 0,
        local_window_size=(left, right),
        implementation=implementation,
    ).astype(ops.convert_to_tensor(query).dtype)
