"""Scores against numpy references: dot, scaled_dot, general, additive, cosine."""

import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn import plugins
from keras_attn import scores

# (query shape, key shape): arbitrary leading dims and Tq != Tk.
SHAPES = [
    ((2, 3, 5, 4), (2, 3, 7, 4)),
    ((4, 5, 6), (4, 3, 6)),
    ((6, 8), (6, 8)),
]


def _inputs(query_shape, key_shape, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=query_shape).astype("float32")
    key = rng.normal(size=key_shape).astype("float32")
    return query, key


def _np(x):
    return ops.convert_to_numpy(x)


# numpy references, written from the papers' formulas.


def ref_dot(q, k):
    return np.einsum("...qd,...kd->...qk", q.astype("float64"), k.astype("float64"))


def ref_scaled_dot(q, k, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return ref_dot(q, k) * scale


def ref_general(q, k, w):
    return np.einsum("...qd,de,...ke->...qk", q, w, k, dtype="float64")


def ref_additive(q, k, w_q, w_k, b, v):
    hidden = np.tanh(
        (q @ w_q)[..., :, None, :] + (k @ w_k)[..., None, :, :] + b
    )  # (..., Tq, Tk, U)
    return np.einsum("...qku,u->...qk", hidden, v)


def ref_cosine(q, k, scale, epsilon=1e-6):
    qn = q / (np.linalg.norm(q, axis=-1, keepdims=True) + epsilon)
    kn = k / (np.linalg.norm(k, axis=-1, keepdims=True) + epsilon)
    return scale * ref_dot(qn, kn)


# Numbers.


@pytest.mark.parametrize("query_shape,key_shape", SHAPES)
def test_dot(query_shape, key_shape):
    q, k = _inputs(query_shape, key_shape)
    score = scores.Dot()
    out = _np(score(q, k))
    assert score.compute_output_shape(query_shape, key_shape) == out.shape
    np.testing.assert_allclose(out, ref_dot(q, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query_shape,key_shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 0.25, 3.0])
def test_scaled_dot(query_shape, key_shape, scale):
    q, k = _inputs(query_shape, key_shape)
    score = scores.ScaledDot(scale=scale)
    out = _np(score(q, k))
    assert score.compute_output_shape(query_shape, key_shape) == out.shape
    np.testing.assert_allclose(out, ref_scaled_dot(q, k, scale), rtol=1e-5, atol=1e-5)


def test_scaled_dot_default_scale_is_inverse_sqrt_depth():
    q, k = _inputs((3, 16), (5, 16))
    default = _np(scores.ScaledDot()(q, k))
    explicit = _np(scores.ScaledDot(scale=0.25)(q, k))
    np.testing.assert_allclose(default, explicit, rtol=1e-6)
    np.testing.assert_allclose(default, _np(scores.Dot()(q, k)) / 4.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query_shape,key_shape", SHAPES)
def test_general(query_shape, key_shape):
    q, k = _inputs(query_shape, key_shape)
    score = scores.General()
    out = _np(score(q, k))
    kernel = _np(score.kernel)
    depth = query_shape[-1]
    assert kernel.shape == (depth, depth)
    assert len(score.trainable_weights) == 1
    assert score.compute_output_shape(query_shape, key_shape) == out.shape
    np.testing.assert_allclose(out, ref_general(q, k, kernel), rtol=1e-5, atol=1e-5)


def test_general_with_identity_kernel_is_dot():
    q, k = _inputs((2, 4, 3), (2, 6, 3))
    score = scores.General(kernel_initializer="identity")
    np.testing.assert_allclose(_np(score(q, k)), ref_dot(q, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query_shape,key_shape", SHAPES)
@pytest.mark.parametrize("units", [None, 3])
def test_additive(query_shape, key_shape, units):
    q, k = _inputs(query_shape, key_shape)
    score = scores.Additive(units=units)
    score.build(query_shape, key_shape)
    depth = query_shape[-1]
    u = units or depth
    rng = np.random.default_rng(1)
    # Random values everywhere, the bias included (it starts at zero).
    w_q, w_k = rng.normal(size=(depth, u)), rng.normal(size=(depth, u))
    b, v = rng.normal(size=(u,)), rng.normal(size=(u,))
    score.query_kernel.assign(w_q.astype("float32"))
    score.key_kernel.assign(w_k.astype("float32"))
    score.bias.assign(b.astype("float32"))
    score.v.assign(v.astype("float32"))
    assert len(score.trainable_weights) == 4
    out = _np(score(q, k))
    assert score.compute_output_shape(query_shape, key_shape) == out.shape
    np.testing.assert_allclose(out, ref_additive(q, k, w_q, w_k, b, v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("query_shape,key_shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_cosine(query_shape, key_shape, scale):
    q, k = _inputs(query_shape, key_shape)
    score = scores.Cosine(scale=scale)
    out = _np(score(q, k))
    assert score.compute_output_shape(query_shape, key_shape) == out.shape
    np.testing.assert_allclose(out, ref_cosine(q, k, scale), rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(out) <= scale * (1 + 1e-6))


def test_cosine_ignores_vector_length():
    q, k = _inputs((2, 4, 3), (2, 5, 3))
    score = scores.Cosine(scale=2.0)
    np.testing.assert_allclose(_np(score(q * 7.0, k * 0.5)), _np(score(q, k)), rtol=1e-4, atol=1e-5)


def test_cosine_zero_vectors_give_zero_logits_not_nan():
    q, k = _inputs((4, 3), (5, 3))
    q[1] = 0.0
    k[2] = 0.0
    out = _np(scores.Cosine()(q, k))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(out[:, 2], 0.0)


def test_cosine_trainable_scale():
    q, k = _inputs((2, 4, 3), (2, 5, 3))
    fixed = scores.Cosine(scale=5.0)
    fixed(q, k)
    assert fixed.trainable_weights == []

    learned = scores.Cosine(scale=5.0, trainable_scale=True)
    out = _np(learned(q, k))
    assert len(learned.trainable_weights) == 1
    # Kept in log space: the weight starts at log(scale) and gives the same logits.
    np.testing.assert_allclose(_np(learned.log_scale), math.log(5.0), rtol=1e-6)
    np.testing.assert_allclose(out, ref_cosine(q, k, 5.0), rtol=1e-5, atol=1e-5)
    learned.log_scale.assign(math.log(2.0))
    np.testing.assert_allclose(_np(learned(q, k)), ref_cosine(q, k, 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["dot", "scaled_dot", "general", "additive", "cosine"])
def test_mixed_precision(name, dtype):
    keras.config.set_dtype_policy(f"mixed_{dtype}")
    score = plugins.resolve("score", name)
    q, k = _inputs((2, 4, 8), (2, 6, 8))
    out = score(q, k)
    # float16 overflows at 65504: dot products keep float32 logits under a float16 policy.
    dot_product = name in ("dot", "scaled_dot", "general")
    expected = "float32" if dtype == "float16" and dot_product else dtype
    assert keras.backend.standardize_dtype(out.dtype) == expected
    # The same score in float32, with the same weights.
    twin = plugins.get("score", name)(dtype="float32")
    twin(q, k)
    twin.set_weights(score.get_weights())
    want = _np(twin(q, k))
    tolerance = {"float16": 1e-2, "bfloat16": 6e-2}[dtype]
    np.testing.assert_allclose(_np(out), want, rtol=tolerance, atol=tolerance * np.abs(want).max())


@pytest.mark.parametrize("name", ["dot", "scaled_dot", "general"])
def test_float16_dot_products_beyond_65504_are_finite(name):
    keras.config.set_dtype_policy("mixed_float16")
    score = plugins.resolve("score", name)
    q = np.full((1, 2, 64), 60.0, "float32")  # q · k = 230400, / 8 = 28800 scaled
    out = _np(score(q, q))
    if name == "general":
        # q · W rounds to float16 on the way (values near 1500): a percent.
        expected, rtol = ref_general(q, q, _np(score.kernel)), 2e-2
    else:
        expected = np.full((1, 2, 2), 230400.0 / (8.0 if name == "scaled_dot" else 1.0))
        rtol = 1e-3
    np.testing.assert_allclose(out, expected, rtol=rtol)


# Property test: the scaled dot product for random sizes and scales.


@given(
    # A few shapes (JAX compiles once per shape); values and scales vary freely.
    tq=st.sampled_from([1, 5]),
    tk=st.sampled_from([1, 6]),
    depth=st.sampled_from([1, 8]),
    scale=st.one_of(st.none(), st.floats(0.01, 10.0)),
    seed=st.integers(0, 2**16),
)
def test_scaled_dot_property(tq, tk, depth, scale, seed):
    q, k = _inputs((2, tq, depth), (2, tk, depth), seed)
    out = _np(scores.ScaledDot(scale=scale)(q, k))
    np.testing.assert_allclose(out, ref_scaled_dot(q, k, scale), rtol=1e-4, atol=1e-4)


# The registry (config round trips: tests/test_round_trips.py).


@pytest.mark.parametrize(
    "name,cls",
    [
        ("dot", scores.Dot),
        ("scaled_dot", scores.ScaledDot),
        ("general", scores.General),
        ("additive", scores.Additive),
        ("cosine", scores.Cosine),
    ],
)
def test_resolve_by_name(name, cls):
    assert name in plugins.names("score")
    assert plugins.get("score", name) is cls
    score = plugins.resolve("score", name)
    assert type(score) is cls and isinstance(score, keras_attn.Score)
    assert plugins.resolve("score", score) is score


def test_resolve_wrong_kind_raises():
    from keras_attn import normalizers
    from keras_attn import patterns

    for other in (normalizers.Softmax(), patterns.Causal()):
        with pytest.raises(keras_attn.ComponentKindError, match="Expected a score"):
            plugins.resolve("score", other)
    with pytest.raises(keras_attn.ComponentKindError):
        plugins.resolve("normalizer", scores.Dot())


def test_unknown_score_name_lists_the_registered_ones():
    with pytest.raises(keras_attn.UnknownComponentError, match="scaled_dot"):
        plugins.resolve("score", "dott")


# Bad arguments.


@pytest.mark.parametrize(
    "cls,kwargs,arg",
    [
        (scores.ScaledDot, {"scale": 0.0}, "scale=0.0"),
        (scores.ScaledDot, {"scale": -1.0}, "scale=-1.0"),
        (scores.Additive, {"units": 0}, "units=0"),
        (scores.Additive, {"units": -2}, "units=-2"),
        (scores.Additive, {"units": 2.5}, "units=2.5"),
        (scores.Cosine, {"scale": 0.0}, "scale=0.0"),
        (scores.Cosine, {"scale": -3.0}, "scale=-3.0"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, arg):
    with pytest.raises(ValueError, match=f"Received: {arg}"):
        cls(**kwargs)
