"""The two whole-matrix kernels: dense (the exact masked reference) and fused.

- `dense_attention`: scores, score_mods, pattern and data masks, normalizer, then the
  weighted sum of values, on the whole ``(B, H, Tq, Tk)`` matrix. Every other path
  must agree with it.
- `fused_attention`: `keras.ops.dot_product_attention`, which runs flash kernels on
  GPU/TPU where the backend has them, for the attentions it can compute exactly.

`weighted_sum` (normalizer, dropout, matmul) is shared with `keras_attn.block_sparse`.
"""

import keras
from keras import ops

from keras_attn import devices
from keras_attn.components import NEG_INF
from keras_attn.masks import combine_masks
from keras_attn.masks import pattern_mask_or_none

__all__ = [
    "dense_attention",
    "drop_masked_positions",
    "fused_attention",
    "fused_kernel_is_dense",
    "softmax_weighted_sum",
    "weighted_sum",
]


def fused_kernel_is_dense():
    """Whether `keras.ops.dot_product_attention` forms the whole score matrix here.

    True on a CPU (every backend's kernel there is the plain masked computation);
    False where a GPU or TPU is visible, whose fused kernels may be flash kernels.
    (`keras_attn.devices.Machine.fused_kernel_is_dense` of the machine this runs on.)
    """
    return devices.actual().fused_kernel_is_dense


def weighted_sum(components, logits, value, mask=None, training=None, return_weights=True):
    """``normalizer(logits, mask) @ value``: the attention output and the weights.

    The normalizer and the dropout come from `components`
    (a `keras_attn.components.Components`).

    When the weights are not asked for, plain softmax without active dropout on
    TensorFlow and JAX runs as `softmax_weighted_sum`, whose gradient skips several
    passes over the logits, and no weights are formed (None is returned for them).

    Returns:
        ``(output, weights)``; the weights are None only when not asked for.
    """
    normalizer, dropout = components.normalizer, components.dropout
    if (
        not return_weights
        and normalizer.is_softmax
        and not components.dropout_active(training)
        and keras.backend.backend() in ("tensorflow", "jax")
    ):
        return softmax_weighted_sum(logits, value, mask), None
    weights = normalizer(logits, mask=mask, training=training)
    # The weights in the compute dtype (the logits may be float32 under float16).
    weights = ops.cast(weights, value.dtype)
    dropped = dropout(weights, training=training) if dropout is not None else weights
    return ops.matmul(dropped, value), weights


def softmax_weighted_sum(logits, value, mask=None):
    """``softmax(logits over the allowed keys) @ value``, with a hand-written gradient.

    Equal to `normalizers.Softmax` followed by the matmul: softmax in float32, a row
    with no allowed key gives zeros. The gradient is the one flash attention uses:
    ``dlogits = w * (dO · vᵀ - rowsum(dO * O))``, so the backward pass reads the
    ``(..., Tq, Tk)`` weights twice instead of going through the masks and the
    softmax's own gradient, and fewer logit-sized tensors are kept for it.

    Args:
        logits: ``(..., Tq, Tk)``, any float dtype.
        value: ``(..., Tk, Dv)``.
        mask: Bool, broadcastable to the logits, or None.

    Returns:
        ``(..., Tq, Dv)`` in the value's dtype.
    """
    x = ops.cast(logits, "float32")  # its gradient is cast back to the logits' dtype
    has_key = None
    if mask is not None:
        # Masked outside the custom gradient, which then closes over no tensor of the
        # caller: jax2tf (Keras's SavedModel export on JAX) cannot lower a gradient
        # that captures the caller's traced values. `where`'s own gradient is the mask.
        mask = ops.cast(mask, "bool")
        has_key = ops.any(mask, axis=-1, keepdims=True)  # (..., Tq|1, 1), on the mask's shape
        x = ops.where(mask, x, NEG_INF)

    @ops.custom_gradient
    def attend(x, value):
        weights = ops.softmax(x, axis=-1)
        cast_weights = ops.cast(weights, value.dtype)
        output = ops.matmul(cast_weights, value)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            d_output = ops.cast(upstream, value.dtype)
            d_value = ops.einsum("...qk,...qd->...kd", cast_weights, d_output)
            d_weights = ops.cast(ops.einsum("...qd,...kd->...qk", d_output, value), "float32")
            delta = ops.sum(
                ops.cast(d_output, "float32") * ops.cast(output, "float32"), axis=-1, keepdims=True
            )
            return weights * (d_weights - delta), d_value

        return output, grad

    output = attend(x, value)
    if has_key is not None:
        output = ops.where(has_key, output, ops.zeros_like(output))
    return output


def drop_masked_positions(query, key, value, mask):
    """Zero the queries no key is allowed for and the keys and values no query may see.

    A masked position must have no influence at all, and ``0 * nan`` is nan: a NaN or
    inf in the key or value of a padded position would otherwise reach every output
    through the matmul with its zero weight, and every gradient through the score.
    Selecting with ``where`` (not multiplying) cuts both. Keys masked for some queries
    only are left as they are (they are real data).

    Args:
        query: ``(B, Tq, H, D)``; key ``(B, Tk, H, D)``; value ``(B, Tk, H, Dv)``.
        mask: Bool data mask broadcastable to ``(B, H, Tq, Tk)``, or None.

    Returns:
        ``(query, key, value)``.
    """
    if mask is None:
        return query, key, value
    mask = ops.cast(mask, "bool")
    while len(mask.shape) < 4:
        mask = mask[None]
    if mask.shape[-1] != 1:
        seen = ops.any(mask, axis=-2)  # (B|1, H|1, Tk)
        if seen.shape[1] not in (1, key.shape[2]):
            # Grouped keys (fewer key heads than query heads): seen by any head.
            seen = ops.any(seen, axis=1, keepdims=True)
        seen = ops.expand_dims(ops.transpose(seen, (0, 2, 1)), -1)  # (B|1, Tk, H|1, 1)
        key = ops.where(seen, key, ops.zeros_like(key))
        value = ops.where(seen, value, ops.zeros_like(value))
    if mask.shape[-2] != 1:
        sees = ops.any(mask, axis=-1)  # (B|1, H|1, Tq)
        sees = ops.expand_dims(ops.transpose(sees, (0, 2, 1)), -1)  # (B|1, Tq, H|1, 1)
        query = ops.where(sees, query, ops.zeros_like(query))
    return query, key, value


def dense_attention(
    query, key, value, components, positions, mask=None, training=None, return_weights=True
):
    """The exact masked reference computation.

    Args:
        query: ``(B, H, Tq, D)``.
        key: ``(B, H, Tk, D)``.
        value: ``(B, H, Tk, Dv)``.
        components: The `keras_attn.components.Components` to run.
        positions: `keras_attn.positions.Positions` of the logits.
        mask: Bool data mask broadcastable to ``(B, H, Tq, Tk)`` (padding and
            explicit masks), or None. The pattern's mask is added here.
        return_weights: Whether the caller needs the weights.

    Returns:
        ``(output (B, H, Tq, Dv), weights (B, H, Tq, Tk) or None)``; the weights
        are None only when not asked for.
    """
    logits = components.score(query, key)  # (B, H, Tq, Tk)
    for mod in components.score_mods:
        logits = mod(logits, positions=positions)
    mask = combine_masks(pattern_mask_or_none(components.pattern, positions), mask)
    return weighted_sum(components, logits, value, mask, training, return_weights)


def fused_attention(query, key, value, *, scale, causal, mask=None, flash_attention=None):
    """`keras.ops.dot_product_attention`, with fully masked rows set to zero.

    Args:
        query: ``(B, Tq, H, D)``; key ``(B, Tk, H, D)``; value ``(B, Tk, H, Dv)``.
        causal: Apply the causal mask (``key <= query``, both from position 0).
        mask: Bool data mask broadcastable to ``(B, H, Tq, Tk)``, or None.

    Returns:
        ``(B, Tq, H, Dv)``.
    """
    dtype = query.dtype
    if _fused_logits_overflow(dtype):
        query, key, value = (ops.cast(x, "float32") for x in (query, key, value))
    if mask is None:
        output = ops.dot_product_attention(
            query, key, value, scale=scale, is_causal=causal, flash_attention=flash_attention
        )
        return ops.cast(output, dtype)
    if causal:
        tq, tk = ops.shape(query)[1], ops.shape(key)[1]
        # Starts named: jax2onnx (ONNX export on JAX) takes no arange(n) from Keras.
        rows = ops.expand_dims(ops.arange(0, tq), -1)
        cols = ops.expand_dims(ops.arange(0, tk), 0)
        mask = ops.logical_and(mask, cols <= rows)
    while len(mask.shape) < 4:
        mask = mask[None]
    output = ops.dot_product_attention(
        query, key, value, mask=mask, scale=scale, flash_attention=flash_attention
    )
    # A row with no allowed key gets zeros, as on the other paths. Reduce the mask
    # before broadcasting it: a padding mask (B, 1, 1, Tk) gives a (B, 1, 1, 1) test.
    any_key = ops.any(mask, axis=-1, keepdims=True)  # (B|1, H|1, Tq|1, 1)
    any_key = ops.transpose(any_key, (0, 2, 1, 3))  # (B|1, Tq|1, H|1, 1)
    return ops.cast(ops.where(any_key, output, ops.zeros_like(output)), dtype)


def _fused_logits_overflow(dtype):
    """Whether the fused kernel must run on float32 inputs for float16 ones.

    TensorFlow's kernels (and PyTorch's CPU one) would form float16 logits, which
    overflow at 65504; XLA on a CPU has no float16 matmul with float32 accumulation
    ("F16_F16_F32 is not supported by dot_general on CPU" under jit). JAX's and
    PyTorch's GPU kernels form the logits in float32 themselves.
    """
    if keras.backend.standardize_dtype(dtype) != "float16":
        return False
    return keras.backend.backend() == "tensorflow" or fused_kernel_is_dense()
