"""Tests of keras_attn.kernels: the dense and fused kernels and the weighted sum, against numpy."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

from keras_attn import kernels
from keras_attn import masks
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import scores
from keras_attn.components import Components
from keras_attn.positions import make_positions
from keras_attn.testing import value_and_grads
from tests.references import np_softmax_attention

RNG = np.random.default_rng(7)


def randn(*shape):
    return RNG.standard_normal(shape).astype("float32")


# -- the kernels against numpy ------------------------------------------------


def test_combine_masks():
    a = np.array([[True, False, True]])
    b = np.array([[True], [False]])
    assert masks.combine_masks(None, None) is None
    np.testing.assert_array_equal(ops.convert_to_numpy(masks.combine_masks(None, a)), a)
    np.testing.assert_array_equal(ops.convert_to_numpy(masks.combine_masks(a, None, b)), a & b)
    ints = masks.combine_masks(np.array([1, 0, 2]))
    assert ops.convert_to_numpy(ints).dtype == bool


def test_dense_attention_matches_numpy_with_pattern_and_mask():
    b, h, tq, tk, d = 2, 3, 5, 6, 4
    q, k, v = randn(b, h, tq, d), randn(b, h, tk, d), randn(b, h, tk, 3)
    mask = RNG.random((b, 1, tq, tk)) > 0.3
    mask[1, 0, 2] = False  # a fully masked row
    pattern = patterns.Local(2)
    positions = make_positions(tq, tk, h)
    components = Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    output, weights = kernels.dense_attention(q, k, v, components, positions, mask=mask)
    i, j = np.arange(tq)[:, None], np.arange(tk)[None]
    allowed = np.broadcast_to(mask & (np.abs(i - j) < 2), (b, h, tq, tk))
    expected, expected_weights = np_softmax_attention(q, k, v, allowed, 0.5)
    np.testing.assert_allclose(ops.convert_to_numpy(weights), expected_weights, atol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(output), expected, atol=1e-5)
    np.testing.assert_array_equal(ops.convert_to_numpy(output)[1, :, 2], 0.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_attention_matches_numpy(causal, with_mask):
    b, h, tq, tk, d = 2, 2, 4, 6, 4
    q, k, v = randn(b, tq, h, d), randn(b, tk, h, d), randn(b, tk, h, d)
    mask = None
    allowed = np.ones((b, h, tq, tk), bool)
    if with_mask:
        mask = RNG.random((b, 1, tq, tk)) > 0.3
        mask[0, 0, 1] = False  # a fully masked row
        allowed = allowed & mask
    if causal:
        allowed = allowed & (np.arange(tk)[None] <= np.arange(tq)[:, None])
    output = kernels.fused_attention(q, k, v, scale=0.3, causal=causal, mask=mask)
    heads_first = [np.swapaxes(x, 1, 2) for x in (q, k, v)]
    expected, _ = np_softmax_attention(*heads_first, allowed, 0.3)
    np.testing.assert_allclose(ops.convert_to_numpy(output), np.swapaxes(expected, 1, 2), atol=1e-5)
    if with_mask:
        np.testing.assert_array_equal(ops.convert_to_numpy(output)[0, 1], 0.0)


# -- softmax_weighted_sum: the hand-written gradient -------------------------------------


@given(
    tq=st.integers(1, 9),
    tk=st.integers(1, 9),
    dv=st.integers(1, 5),
    mask_kind=st.sampled_from(["none", "random", "key_padding", "empty_rows"]),
    seed=st.integers(0, 2**16),
)
def test_softmax_weighted_sum_equals_softmax_then_matmul(tq, tk, dv, mask_kind, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 3, tq, tk)).astype("float32") * 3
    value = rng.normal(size=(2, 3, tk, dv)).astype("float32")
    cot = rng.normal(size=(2, 3, tq, dv)).astype("float32")
    mask = {
        "none": None,
        "random": rng.random((2, 3, tq, tk)) < 0.6,
        "key_padding": rng.random((2, 1, 1, tk)) < 0.7,
        "empty_rows": (rng.random((2, 1, tq, tk)) < 0.6) & (rng.random((2, 1, tq, 1)) < 0.5),
    }[mask_kind]
    _, want_w = np_softmax_attention(
        np.eye(tq, dtype="float32"),
        np.swapaxes(logits, -1, -2),
        value,
        np.ones((tq, tk), bool) if mask is None else mask,
        1.0,
    )
    want_out = want_w @ value
    got_out = ops.convert_to_numpy(kernels.softmax_weighted_sum(logits, value, mask))
    np.testing.assert_allclose(got_out, want_out, atol=1e-5)

    def reference(logits, value):
        weights = normalizers.Softmax()(logits, mask=mask)
        return ops.sum(ops.multiply(ops.matmul(weights, value), cot))

    def fast(logits, value):
        return ops.sum(ops.multiply(kernels.softmax_weighted_sum(logits, value, mask), cot))

    want_y, want_grads = value_and_grads(reference, logits, value)
    got_y, got_grads = value_and_grads(fast, logits, value)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(["d_logits", "d_value"], got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, err_msg=name)
    if mask_kind == "empty_rows":
        empty = ~np.broadcast_to(mask, logits.shape).any(-1)
        assert np.all(got_out[empty] == 0) and np.all(got_grads[0][empty] == 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_softmax_weighted_sum_in_low_precision(dtype):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 2, 5, 7)).astype("float32")
    value = rng.normal(size=(1, 2, 7, 4)).astype("float32")
    mask = rng.random((1, 1, 5, 7)) < 0.7
    got = kernels.softmax_weighted_sum(ops.cast(logits, dtype), ops.cast(value, dtype), mask)
    assert keras.backend.standardize_dtype(got.dtype) == dtype
    _, weights = np_softmax_attention(
        np.eye(5, dtype="float32"), np.swapaxes(logits, -1, -2), value, mask, 1.0
    )
    want = weights @ value
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(got, "float32")), want, atol=3e-2)


def _only(normalizer):
    return Components(scores.ScaledDot(), (), None, normalizer)


def test_weighted_sum_uses_the_normalizer_when_it_is_not_plain_softmax():
    logits = randn(1, 1, 3, 4)
    value = randn(1, 1, 4, 2)
    output, weights = kernels.weighted_sum(_only(normalizers.Sparsemax()), logits, value)
    np.testing.assert_allclose(
        ops.convert_to_numpy(output), ops.convert_to_numpy(weights) @ value, atol=1e-6
    )
    _, none = kernels.weighted_sum(
        _only(normalizers.Softmax()), logits, value, return_weights=False
    )
    assert none is None or keras.backend.backend() not in ("tensorflow", "jax")
    _, weights = kernels.weighted_sum(_only(normalizers.Softmax()), logits, value)
    np.testing.assert_allclose(ops.convert_to_numpy(weights).sum(-1), 1.0, atol=1e-6)


def test_fused_kernel_compiles_in_float16_and_agrees_with_float32():
    # XLA on a CPU has no float16 matmul with float32 accumulation; the fused kernel
    # must still compile under jit with float16 inputs (and TensorFlow's must not form
    # float16 logits), giving float32's numbers to float16 precision.
    q, k, v = (RNG.standard_normal((2, 6, 2, 4)).astype("float32") for _ in range(3))
    want = kernels.fused_attention(q, k, v, scale=0.5, causal=True)

    def f(q, k, v):
        return kernels.fused_attention(q, k, v, scale=0.5, causal=True)

    half = [ops.cast(x, "float16") for x in (q, k, v)]
    if keras.backend.backend() == "jax":
        import jax

        got = jax.jit(f)(*half)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        got = tf.function(f, jit_compile=True)(*half)
    else:
        got = f(*half)
    assert keras.backend.standardize_dtype(got.dtype) == "float16"
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(got, "float32")), ops.convert_to_numpy(want), atol=1e-2
    )


# -- masked positions are selected away before any matmul -------------------------


@pytest.mark.parametrize("key_heads", [4, 2, 1])
def test_drop_masked_positions_zeroes_only_what_no_one_may_see(key_heads):
    # A per-head mask (B, H, Tq, Tk) with grouped keys (fewer key heads): a key is
    # dropped only where no query of any head may see it; real data is kept as it is.
    b, t, h, d = 2, 5, 4, 3
    q = np.full((b, t, h, d), np.nan, "float32")
    k = np.full((b, t, key_heads, d), np.inf, "float32")
    v = np.full((b, t, key_heads, d), np.nan, "float32")
    mask = RNG.random((b, h, t, t)) > 0.5
    mask[:, :, :, 0] = False  # key 0: padding for every query
    mask[:, :, 1, :] = False  # query 1: padding
    q2, k2, v2 = (ops.convert_to_numpy(x) for x in kernels.drop_masked_positions(q, k, v, mask))
    seen = mask.any(axis=(1, 2)) if key_heads != h else mask.any(axis=2).transpose(0, 2, 1)
    seen = seen.reshape(b, t, -1, 1)
    np.testing.assert_array_equal(np.isnan(v2), np.broadcast_to(seen, v2.shape))
    np.testing.assert_array_equal(np.isinf(k2), np.broadcast_to(seen, k2.shape))
    np.testing.assert_array_equal(k2[:, 0], 0.0)
    sees = mask.any(axis=3).transpose(0, 2, 1)[..., None]  # (B, Tq, H, 1)
    np.testing.assert_array_equal(np.isnan(q2), np.broadcast_to(sees, q2.shape))
    np.testing.assert_array_equal(q2[:, 1], 0.0)
