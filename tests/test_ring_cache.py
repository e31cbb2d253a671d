"""The ring cache of causal sliding-window layers (keras_attn.kv_cache.read_write_ring).

A cache of `window` slots decodes any number of tokens in constant memory and gives
the numbers of the uncached causal pass (and of a full-length cache) at every step,
with rope, grouped heads, chunked prefills and indices beyond the cache size.
"""

import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import kv_cache
from keras_attn import patterns


def randn(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _np(x):
    return ops.convert_to_numpy(x)


def decode(layer, x, cache, chunks):
    outs = []
    for start, stop in chunks:
        index = start if start == 0 else ops.convert_to_tensor(start, "int32")
        out, cache = layer(x[:, start:stop], cache=cache, cache_update_index=index)
        outs.append(_np(out))
    return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize(
    "make",
    [
        dict(num_heads=2, key_dim=4),
        dict(num_heads=4, key_dim=4, num_key_value_heads=2, position_encoding="rope"),
        dict(num_heads=2, key_dim=4, score_mods=["relative_position"]),
    ],
    ids=["plain", "gqa_rope", "relative_position"],
)
@pytest.mark.parametrize("prefill", [1, 3, 9])
def test_ring_cache_decodes_like_one_pass_far_past_its_size(make, prefill):
    window, length = 4, 30  # 7.5 windows
    x = randn(2, length, 8)
    layer = keras_attn.Attention(pattern=patterns.Local(window, causal=True), **make)
    want = _np(layer(x))
    shape = layer.cache_shape(2, length)
    assert shape[2] == window  # memory of the window, not of the length
    chunks = [(0, prefill), *((i, i + 1) for i in range(prefill, length))]
    got, cache = decode(layer, x, ops.zeros(shape), chunks)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert tuple(cache.shape) == shape


def test_ring_cache_equals_a_full_cache_and_keeps_the_latest_keys():
    window, length = 3, 11
    x = randn(1, length, 8)
    layer = keras_attn.LocalAttention(window=window, causal=True, num_heads=2, key_dim=4)
    layer(x)
    chunks = [(0, 2), *((i, i + 1) for i in range(2, length))]
    ring, ring_cache = decode(layer, x, ops.zeros(layer.cache_shape(1, length)), chunks)
    full, _ = decode(layer, x, ops.zeros(kv_cache.cache_shape(1, length, 2, 4)), chunks)
    np.testing.assert_allclose(ring, full, atol=1e-5)
    keys = _np(layer.key_dense(x))  # (1, T, H, D): no position encoding here
    for p in range(length - window, length):  # slot p % window holds position p
        np.testing.assert_allclose(_np(ring_cache)[0, 0, p % window], keys[0, p], atol=1e-6)


def test_a_sliding_window_drop_in_with_the_causal_mask_uses_the_ring():
    x = randn(1, 12, 8)
    layer = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, sliding_window=3)
    want = _np(layer(x, x, use_causal_mask=True))
    assert layer.cache_shape(1, 12)[2] == 12  # two-sided without the causal mask
    cache = ops.zeros(layer.cache_shape(1, 12, use_causal_mask=True))
    assert tuple(cache.shape) == (1, 2, 3, 2, 4)  # with it, a ring of the window
    outs = []
    for t in range(12):
        step = x[:, t : t + 1]
        out, cache = layer(step, step, use_causal_mask=True, cache=cache, cache_update_index=t)
        outs.append(_np(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), want, atol=1e-5)


def test_a_window_sized_cache_with_masks_is_a_full_cache_until_it_is_full():
    # KerasHub passes masks with every cached call: a cache of exactly `window` slots
    # is then read as the full cache it is while the tokens fit, and past that (a ring,
    # whose slots do not keep their positions) masks are a clear error.
    x = randn(1, 4, 8)
    layer = keras_attn.LocalAttention(window=4, causal=True, num_heads=1, key_dim=4)
    want = _np(layer(x))
    cache = ops.zeros(layer.cache_shape(1, 10))
    assert cache.shape[2] == 4
    outs = []
    for t in range(4):
        mask = np.ones((1, 1, 4), bool)
        mask[..., t + 1 :] = False  # the slots written so far, as KerasHub's mask says
        out, cache = layer(x[:, t : t + 1], cache=cache, cache_update_index=t, attention_mask=mask)
        outs.append(_np(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"cache of 4 slots .* up to position 4"):
        layer(x[:, :1], cache=cache, cache_update_index=4, value_mask=np.ones((1, 1), bool))


def test_other_patterns_keep_a_full_cache():
    layer = keras_attn.LocalAttention(window=3, num_heads=1, key_dim=4)  # two-sided
    layer(randn(1, 4, 8))
    assert layer.cache_shape(1, 10)[2] == 10
    assert kv_cache.ring_window(patterns.Local(3, causal=True) | patterns.GlobalTokens(1)) is None


def test_cache_shape_refuses_a_value_dim_no_cache_can_hold():
    layer = keras_attn.Attention(num_heads=2, key_dim=4, value_dim=8)
    layer(randn(1, 3, 8))
    with pytest.raises(ValueError, match="key_dim == value_dim. Received: key_dim=4, value_dim=8"):
        layer.cache_shape(1, 10)
