"""Cached decoding in tests: a layer run chunk by chunk with a KV cache, against one pass.

`decode_with_cache` is the loop every test of a cache needs (prefill, then one token at
a time, the index of later steps a tensor as in a compiled generation loop);
`assert_decodes_like_one_pass` compares it with the uncached causal pass.
"""

import numpy as np
from keras import ops


def chunks(length, prefill):
    """``(start, stop)`` of each call: `prefill` tokens, then one token at a time."""
    if not 1 <= prefill <= length:
        raise ValueError(f"Expected 1 <= prefill <= length={length}. Received: prefill={prefill}")
    return [(0, prefill), *((i, i + 1) for i in range(prefill, length))]


def decode_with_cache(layer, x, prefill=1, step_kwargs=None, **call_kwargs):
    """Run `x` ``(B, T, dim)`` through `layer` with a KV cache of ``T`` slots.

    Args:
        layer: A keras_attn attention layer (it has ``cache_shape``).
        x: ``(B, T, dim)`` numpy inputs, queries and keys alike.
        prefill: Tokens of the first call, written at the Python int index 0; every
            later call writes one token at a tensor index.
        step_kwargs: Optional ``(start, stop) -> dict`` of call arguments of one call
            (e.g. the segment ids of its tokens).
        **call_kwargs: Call arguments of every call (e.g. ``use_causal_mask=True``).

    Returns:
        ``(outputs, cache)``: the outputs of every call concatenated along ``T``,
        ``(B, T, out_dim)``, and the final cache ``(B, 2, T, H_kv, D)``, in numpy.
    """
    batch, length = x.shape[:2]
    cache = ops.zeros(layer.cache_shape(batch, length))
    outputs = []
    for start, stop in chunks(length, prefill):
        index = start if start == 0 else ops.convert_to_tensor(start, "int32")
        extra = step_kwargs(start, stop) if step_kwargs else {}
        out, cache = layer(
            x[:, start:stop], cache=cache, cache_update_index=index, **call_kwargs, **extra
        )
        outputs.append(ops.convert_to_numpy(ops.cast(out, "float32")))
    return np.concatenate(outputs, axis=1), ops.convert_to_numpy(cache)


def assert_decodes_like_one_pass(
    layer, x, prefill=1, atol=1e-5, full_kwargs=None, step_kwargs=None, reference=None
):
    """Assert that cached decoding of `x` gives the outputs of one causal pass.

    Args:
        layer, x, prefill, step_kwargs: As in `decode_with_cache` (every call is causal).
        atol: Absolute tolerance.
        full_kwargs: Extra call arguments of the uncached pass.
        reference: The layer that computes the uncached pass (default `layer`), e.g.
            Keras's own layer with the same weights.

    Returns:
        ``(outputs, cache)`` of the cached decoding, in numpy.
    """
    reference = layer if reference is None else reference
    full = reference(x, use_causal_mask=True, **(full_kwargs or {}))
    full = ops.convert_to_numpy(ops.cast(full, "float32"))
    decoded, cache = decode_with_cache(
        layer, x, prefill, step_kwargs=step_kwargs, use_causal_mask=True
    )
    np.testing.assert_allclose(decoded, full, atol=atol, err_msg="cached decoding != one pass")
    return decoded, cache
