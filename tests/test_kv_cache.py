"""Tests of keras_attn.kv_cache: writes land in the right slots, and writes that do not
fit raise (known index) or poison the step with NaN (traced index), never clamp."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import kv_cache

RNG = np.random.default_rng(5)
B, S, H, D = 2, 6, 2, 3


def randn(*shape):
    return RNG.standard_normal(shape).astype("float32")


def compiled(fn):
    """`fn` traced by the backend's compiler, so that its index is not known."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    pytest.skip(f"no tracing compiler for backend {backend}")


def test_a_write_lands_in_its_slots_and_marks_them():
    cache = np.zeros((B, 2, S, H, D), "float32")
    key, value = randn(B, 2, H, D), randn(B, 2, H, D)
    keys, values, new_cache, filled = kv_cache.update(cache, key, value, 3)
    keys, values = ops.convert_to_numpy(keys), ops.convert_to_numpy(values)
    np.testing.assert_array_equal(keys[:, 3:5], key)
    np.testing.assert_array_equal(values[:, 3:5], value)
    np.testing.assert_array_equal(keys[:, :3], 0.0)
    np.testing.assert_array_equal(ops.convert_to_numpy(filled)[0, 0, 0], [True] * 5 + [False])


@pytest.mark.parametrize("index", [5, 6, -1, np.int64(5)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_known_index_that_does_not_fit_raises(index, as_tensor):
    # Keras's slice update clamps the start: index 5 with 2 new keys would write to
    # slots 4..5, silently. A known index is checked instead.
    cache = np.zeros((B, 2, S, H, D), "float32")
    key = randn(B, 2, H, D)
    if as_tensor:
        index = ops.convert_to_tensor(int(index), "int32")
    with pytest.raises(ValueError, match=r"cache_update_index \+ T <= S .*S=6.*Received: "):
        kv_cache.update(cache, key, key, index)


@pytest.mark.parametrize("index", [0, 4])
def test_a_known_index_that_fits_exactly_is_fine(index):
    cache = np.zeros((B, 2, S, H, D), "float32")
    key = randn(B, 2, H, D)
    keys, _, _, _ = kv_cache.update(cache, key, key, index)
    np.testing.assert_array_equal(ops.convert_to_numpy(keys)[:, index : index + 2], key)


def test_a_traced_index_writes_where_it_fits():
    cache = np.zeros((B, 2, S, H, D), "float32")
    key, value = randn(B, 2, H, D), randn(B, 2, H, D)
    keys, _, _, filled = compiled(kv_cache.update)(cache, key, value, np.int32(4))
    np.testing.assert_array_equal(ops.convert_to_numpy(keys)[:, 4:], key)
    assert ops.convert_to_numpy(filled).all()


@pytest.mark.parametrize("index", [5, 6, -1])
def test_a_traced_index_that_does_not_fit_poisons_with_nan(index):
    # The documented behaviour where the index cannot be checked: NaN, not a clamped write.
    cache = np.zeros((B, 2, S, H, D), "float32")
    key, value = randn(B, 2, H, D), randn(B, 2, H, D)
    keys, values, new_cache, filled = compiled(kv_cache.update)(cache, key, value, np.int32(index))
    assert ops.convert_to_numpy(filled).all()  # every slot counts, the NaN ones too
    assert np.isnan(ops.convert_to_numpy(keys)).any()
    assert np.isnan(ops.convert_to_numpy(values)).any()
    # No real key was written to a wrong slot.
    assert not np.isin(key, ops.convert_to_numpy(keys)).any()


def test_a_layer_decoding_past_the_end_of_its_cache():
    layer = keras_attn.Attention(num_heads=H, key_dim=D)
    x = randn(B, 1, 8)
    layer(x, x)
    cache = ops.zeros(layer.cache_shape(B, S))
    last, cache = layer(x, cache=cache, cache_update_index=S - 1, use_causal_mask=True)
    with pytest.raises(ValueError, match="cache_update_index=6"):
        layer(x, cache=cache, cache_update_index=S, use_causal_mask=True)

    def step(x, cache, index):
        return layer(x, cache=cache, cache_update_index=index, use_causal_mask=True)

    out, _ = compiled(step)(x, cache, np.int32(S))
    assert np.isnan(ops.convert_to_numpy(out)).all()  # loudly wrong, never silently
    out, _ = compiled(step)(x, cache, np.int32(S - 1))  # the same write again: it fits
    np.testing.assert_allclose(ops.convert_to_numpy(out), ops.convert_to_numpy(last), atol=1e-6)


@pytest.mark.parametrize(
    "shape", [(B, 2, S, H + 1, D), (B, 2, S, H, D + 1), (B, 3, S, H, D), (B, S, H, D)]
)
def test_a_cache_of_the_wrong_shape_says_what_was_expected(shape):
    with pytest.raises(ValueError, match=rf"\(B, 2, S, {H}, {D}\).*Received: cache.shape="):
        kv_cache.check_cache(np.zeros(shape, "float32"), H, D, D)


def test_a_layer_rejects_a_cache_for_other_heads():
    layer = keras_attn.Attention(num_heads=2, key_dim=4)
    x = randn(1, 3, 8)
    layer(x)
    wrong = np.zeros((1, 2, 10, 3, 4), "float32")  # 3 heads for a 2-head layer
    with pytest.raises(ValueError, match=r"\(B, 2, S, 2, 4\).*cache_shape"):
        layer(x, cache=wrong, cache_update_index=0)
    right = np.zeros(layer.cache_shape(1, 10), "float32")
    assert tuple(layer(x, cache=right, cache_update_index=0)[1].shape) == right.shape
