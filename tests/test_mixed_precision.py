"""Mixed precision: no NaN or inf, zeros for fully masked rows, float32 normalization."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import normalizers

POLICIES = ["mixed_float16", "mixed_bfloat16"]
# Worst relative rounding of one cast from float32 (half an ulp), per compute dtype.
HALF_ULP = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
# Tolerance against the same layer in float32 (several roundings along the way).
TOLERANCE = {"float16": 1e-2, "bfloat16": 6e-2}

RNG = np.random.default_rng(3)
X = RNG.standard_normal((2, 6, 8)).astype("float32")
C = RNG.standard_normal((2, 7, 8)).astype("float32")
QMASK = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
VMASK = np.array([[1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], bool)  # batch 1: no key


def twin_in_float32(layer, make, inputs, **call_kwargs):
    """The same layer in float32, with the same weights."""
    twin = make(dtype="float32")
    twin(*inputs, **call_kwargs)
    twin.set_weights(layer.get_weights())
    return twin


def check_finite_and_empty_rows(output, weights, compute_dtype):
    assert keras.backend.standardize_dtype(output.dtype) == compute_dtype
    output = ops.convert_to_numpy(ops.cast(output, "float32"))
    assert np.isfinite(output).all()
    if weights is not None:
        assert keras.backend.standardize_dtype(weights.dtype) == compute_dtype
        weights = ops.convert_to_numpy(ops.cast(weights, "float32"))
        assert np.isfinite(weights).all()
        np.testing.assert_array_equal(weights[1], 0.0)  # batch 1 has no allowed key
        np.testing.assert_array_equal(weights[0, :, :, 4:], 0.0)  # masked keys
    return output, weights


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("normalizer", ["softmax", "hard", "topk", "sparsemax"])
def test_dense_path_for_each_normalizer(policy, normalizer):
    keras.config.set_dtype_policy(policy)
    compute_dtype = keras.config.dtype_policy().compute_dtype

    def make(**kwargs):
        return keras_attn.Attention(num_heads=2, normalizer=normalizer, pattern="causal", **kwargs)

    layer = make()
    call_kwargs = dict(query_mask=QMASK, value_mask=VMASK, return_attention_scores=True)
    output, weights = layer(X, C, **call_kwargs)
    assert layer.last_path == "dense"
    output, weights = check_finite_and_empty_rows(output, weights, compute_dtype)

    twin = twin_in_float32(layer, make, (X, C), **call_kwargs)
    expected, expected_weights = (ops.convert_to_numpy(t) for t in twin(X, C, **call_kwargs))
    rows = np.ones(weights.shape[:-1], bool)
    if normalizer == "hard":
        # Near-ties may pick another key in low precision: compare the clear rows only.
        soft = keras_attn.Attention(num_heads=2, pattern="causal", dtype="float32")
        soft(X, C)
        soft.set_weights(twin.get_weights())
        _, p = soft(X, C, **call_kwargs)
        top2 = np.sort(ops.convert_to_numpy(p), -1)[..., -2:]
        empty = top2[..., 1] == 0
        rows = (top2[..., 1] > 1.1 * top2[..., 0]) | empty
        assert rows[~empty].mean() > 0.5
    np.testing.assert_allclose(weights[rows], expected_weights[rows], atol=TOLERANCE[compute_dtype])
    clear_queries = rows.all(axis=1)  # (B, Tq): every head clear
    np.testing.assert_allclose(
        output[clear_queries], expected[clear_queries], atol=3 * TOLERANCE[compute_dtype]
    )


@pytest.mark.parametrize("policy", POLICIES)
def test_fused_path(policy):
    keras.config.set_dtype_policy(policy)
    compute_dtype = keras.config.dtype_policy().compute_dtype

    def make(**kwargs):
        return keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, **kwargs)

    layer = make()
    call_kwargs = dict(query_mask=QMASK, value_mask=VMASK, use_causal_mask=True)
    output = layer(X, C, **call_kwargs)
    assert layer.last_path == "fused"
    output, _ = check_finite_and_empty_rows(output, None, compute_dtype)
    dense = ops.convert_to_numpy(
        ops.cast(layer(X, C, return_attention_scores=True, **call_kwargs)[0], "float32")
    )
    twin = twin_in_float32(layer, make, (X, C), **call_kwargs)
    expected = ops.convert_to_numpy(twin(X, C, **call_kwargs))
    # Fully masked rows give an output of just the bias, as in float32.
    bias = ops.convert_to_numpy(twin.weights[-1])
    np.testing.assert_allclose(output[1], np.broadcast_to(bias, output[1].shape), atol=1e-2)
    np.testing.assert_allclose(output, expected, atol=3 * TOLERANCE[compute_dtype])
    np.testing.assert_allclose(output, dense, atol=3 * TOLERANCE[compute_dtype])


@pytest.mark.parametrize("policy", POLICIES)
def test_large_logits_do_not_overflow(policy):
    # Logits far beyond float16's range of exp: masking constants and the softmax must
    # stay finite.
    keras.config.set_dtype_policy(policy)
    layer = keras_attn.Attention(num_heads=1, score="dot", normalizer="softmax")
    big = 30.0 * X
    output, weights = layer(big, value_mask=VMASK[:, :6], return_attention_scores=True)
    output = ops.convert_to_numpy(ops.cast(output, "float32"))
    weights = ops.convert_to_numpy(ops.cast(weights, "float32"))
    assert np.isfinite(output).all() and np.isfinite(weights).all()
    np.testing.assert_allclose(weights[0].sum(-1), 1.0, atol=1e-2)
    np.testing.assert_array_equal(weights[1], 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_softmax_is_computed_in_float32(dtype):
    # Long rows: a softmax computed in low precision accumulates errors far beyond one
    # rounding of the float32 result; computed in float32, each weight is off by at
    # most half an ulp of `dtype`.
    logits = ops.cast(RNG.standard_normal((4, 512)) * 3, dtype)
    exact = ops.convert_to_numpy(ops.cast(logits, "float32")).astype(np.float64)
    exact = np.exp(exact - exact.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    bound = (HALF_ULP[dtype] + 1e-6) * exact + 1e-7

    weights = normalizers.Softmax(dtype=f"mixed_{dtype}")(logits)
    assert keras.backend.standardize_dtype(weights.dtype) == dtype
    error = np.abs(ops.convert_to_numpy(ops.cast(weights, "float32")) - exact)
    assert (error <= bound).all()

    # The bound can fail: a softmax computed in `dtype` throughout breaks it.
    e = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True))
    low = ops.convert_to_numpy(ops.cast(e / ops.sum(e, axis=-1, keepdims=True), "float32"))
    assert not (np.abs(low - exact) <= bound).all()
