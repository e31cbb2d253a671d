"""Tests of keras_attn.engine: the path choice, and the fused and dense paths agreeing."""

import logging

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn import engine
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import score_mods
from keras_attn import scores
from keras_attn.positions import make_positions
from tests.autodiff import value_and_grads

RNG = np.random.default_rng(7)


def randn(*shape):
    return RNG.standard_normal(shape).astype("float32")


def np_softmax_attention(q, k, v, allowed, scale):
    """Masked softmax attention in numpy; heads first: q (B, H, Tq, D), allowed (B, H, Tq, Tk)."""
    logits = q @ np.swapaxes(k, -1, -2) * scale
    logits = np.where(allowed, logits, -np.inf)
    peak = np.max(logits, -1, keepdims=True)
    e = np.where(allowed, np.exp(logits - np.where(np.isfinite(peak), peak, 0)), 0.0)
    total = e.sum(-1, keepdims=True)
    weights = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return weights @ v, weights


# -- choose_path ------------------------------------------------------------------------


def choose(score="scaled_dot", mods=(), pattern="full", normalizer="softmax", **kwargs):
    plugins = keras_attn.plugins
    return engine.choose_path(
        plugins.resolve("score", score),
        [plugins.resolve("score_mod", m) for m in mods],
        plugins.resolve("pattern", pattern),
        plugins.resolve("normalizer", normalizer),
        query_length=kwargs.pop("query_length", 16),
        key_length=kwargs.pop("key_length", 16),
        **kwargs,
    )


@pytest.mark.parametrize(
    "kwargs, path",
    [
        (dict(), "fused"),
        (dict(pattern="causal"), "fused"),
        (dict(return_scores=True), "dense"),
        (dict(dropout_active=True), "dense"),
        (dict(score="dot"), "dense"),
        (dict(score="general"), "dense"),
        (dict(normalizer="hard"), "dense"),
        (dict(normalizer="sparsemax"), "dense"),
        (dict(mods=["softcap"]), "dense"),
        (dict(pattern=patterns.Local(4)), "dense"),
        (dict(pattern=patterns.Causal() & patterns.Local(4)), "dense"),
        (dict(pattern=patterns.Causal() | patterns.Causal()), "dense"),
        (dict(block_sparse=False, pattern=patterns.Local(4)), "dense"),
        (dict(block_sparse=False), "fused"),
    ],
)
def test_choose_path(kwargs, path):
    assert choose(**kwargs) == path


def test_a_subclass_of_a_fusable_component_is_not_fused():
    # The fused kernel computes scaled_dot + softmax exactly; a subclass may not.
    class Tempered(normalizers.Softmax):
        name = "tempered_for_test"

        def normalize(self, logits, mask, training):
            return ops.softmax(logits / 2.0, axis=-1)

    assert choose(normalizer=Tempered()) == "dense"


# -- the engine's functions against numpy ------------------------------------------------


def test_combine_masks():
    a = np.array([[True, False, True]])
    b = np.array([[True], [False]])
    assert engine.combine_masks(None, None) is None
    np.testing.assert_array_equal(ops.convert_to_numpy(engine.combine_masks(None, a)), a)
    np.testing.assert_array_equal(ops.convert_to_numpy(engine.combine_masks(a, None, b)), a & b)
    ints = engine.combine_masks(np.array([1, 0, 2]))
    assert ops.convert_to_numpy(ints).dtype == bool


def test_dense_attention_matches_numpy_with_pattern_and_mask():
    b, h, tq, tk, d = 2, 3, 5, 6, 4
    q, k, v = randn(b, h, tq, d), randn(b, h, tk, d), randn(b, h, tk, 3)
    mask = RNG.random((b, 1, tq, tk)) > 0.3
    mask[1, 0, 2] = False  # a fully masked row
    pattern = patterns.Local(2)
    positions = make_positions(tq, tk, h)
    output, weights = engine.dense_attention(
        q,
        k,
        v,
        score=scores.ScaledDot(),
        score_mods=[],
        pattern=pattern,
        normalizer=normalizers.Softmax(),
        positions=positions,
        mask=mask,
    )
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
    output = engine.fused_attention(q, k, v, scale=0.3, causal=causal, mask=mask)
    heads_first = [np.swapaxes(x, 1, 2) for x in (q, k, v)]
    expected, _ = np_softmax_attention(*heads_first, allowed, 0.3)
    np.testing.assert_allclose(ops.convert_to_numpy(output), np.swapaxes(expected, 1, 2), atol=1e-5)
    if with_mask:
        np.testing.assert_array_equal(ops.convert_to_numpy(output)[0, 1], 0.0)


# -- the same layer on both paths --------------------------------------------------------

X = randn(2, 5, 8)
C = randn(2, 7, 6)
QMASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
VMASK = np.array([[1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], bool)  # batch 1: no key


@pytest.mark.parametrize(
    "make, inputs, call_kwargs",
    [
        (lambda: keras_attn.Attention(num_heads=2), (X,), {}),
        (lambda: keras_attn.Attention(num_heads=2), (X, C), dict(use_causal_mask=True)),
        (
            lambda: keras_attn.Attention(num_heads=2, pattern="causal"),
            (X,),
            dict(query_mask=QMASK),
        ),
        (
            lambda: keras_attn.MultiHeadAttention(num_heads=4, key_dim=2, output_shape=3),
            (X, C),
            dict(query_mask=QMASK, value_mask=VMASK),
        ),
        (
            lambda: keras_attn.Attention(
                num_heads=2, score={"name": "scaled_dot", "config": {"scale": 0.2}}
            ),
            (X, C),
            dict(attention_mask=RNG.random((2, 5, 7)) > 0.5, use_causal_mask=True),
        ),
        (
            lambda: keras_attn.CrossAttention(num_heads=2, use_bias=False),
            (X, C),
            dict(context_mask=VMASK),
        ),
    ],
)
def test_fused_and_dense_paths_agree(make, inputs, call_kwargs):
    layer = make()
    fused = ops.convert_to_numpy(layer(*inputs, **call_kwargs))
    assert layer.last_path == "fused"
    dense, weights = layer(*inputs, return_attention_scores=True, **call_kwargs)
    assert layer.last_path == "dense"
    np.testing.assert_allclose(fused, ops.convert_to_numpy(dense), atol=1e-5)
    # Rows with no allowed key: zero weights, and on both paths an output of just the bias.
    weights = ops.convert_to_numpy(weights)
    empty = weights.sum(-1).max(1) == 0  # (B, Tq)
    bias = [np.asarray(w) for w in layer.weights if w.path.endswith("attention_output/bias")]
    expected_empty = np.broadcast_to(bias[0] if bias else 0.0, fused[empty].shape)
    np.testing.assert_allclose(fused[empty], expected_empty, atol=1e-6)
    if "value_mask" in call_kwargs or "context_mask" in call_kwargs:
        assert empty[1].all()  # the test covers fully masked rows


def test_dropout_in_training_takes_the_dense_path():
    layer = keras_attn.Attention(num_heads=2, dropout=0.5, seed=1)
    inference = ops.convert_to_numpy(layer(X, training=False))
    assert layer.last_path == "fused"
    trained = ops.convert_to_numpy(layer(X, training=True))
    assert layer.last_path == "dense"
    assert not np.allclose(inference, trained)
    no_dropout = keras_attn.Attention(num_heads=2)
    no_dropout(X, training=True)
    assert no_dropout.last_path == "fused"


def test_components_that_need_the_dense_path():
    for layer in [
        keras_attn.Attention(num_heads=2, score="general"),
        keras_attn.Attention(num_heads=2, normalizer="topk"),
        keras_attn.Attention(num_heads=2, score_mods=[score_mods.Softcap(5.0)]),
        keras_attn.LocalAttention(window=2, num_heads=2),
        keras_attn.MultiHeadAttention(num_heads=2, key_dim=2, value_dim=3),
    ]:
        layer(X)
        assert layer.last_path == "dense"


def test_the_path_is_logged_at_debug_level(caplog):
    layer = keras_attn.Attention(num_heads=2, name="logged")
    with caplog.at_level(logging.DEBUG, logger="keras_attn"):
        layer(X)
        layer(X)  # unchanged: not logged again
        layer(X, return_attention_scores=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "keras_attn"]
    assert [m for m in messages if "logged" in m] == [
        "logged (Attention): fused path",
        "logged (Attention): dense path",
    ]


def test_fused_path_inside_a_compiled_function():
    layer = keras_attn.Attention(num_heads=2)
    x_in = keras.Input((5, 8))
    model = keras.Model(x_in, layer(x_in, use_causal_mask=True))
    eager = ops.convert_to_numpy(layer(X, use_causal_mask=True))
    np.testing.assert_allclose(model.predict(X, verbose=0), eager, atol=1e-5)
    assert layer.last_path == "fused"


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
    got_out = ops.convert_to_numpy(engine.softmax_weighted_sum(logits, value, mask))
    np.testing.assert_allclose(got_out, want_out, atol=1e-5)

    def reference(logits, value):
        weights = normalizers.Softmax()(logits, mask=mask)
        return ops.sum(ops.matmul(weights, value) * cot)

    def fast(logits, value):
        return ops.sum(engine.softmax_weighted_sum(logits, value, mask) * cot)

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
    got = engine.softmax_weighted_sum(ops.cast(logits, dtype), ops.cast(value, dtype), mask)
    assert got.dtype == dtype
    _, weights = np_softmax_attention(
        np.eye(5, dtype="float32"), np.swapaxes(logits, -1, -2), value, mask, 1.0
    )
    want = weights @ value
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(got, "float32")), want, atol=3e-2)


def test_weighted_sum_uses_the_normalizer_when_it_is_not_plain_softmax():
    logits = randn(1, 1, 3, 4)
    value = randn(1, 1, 4, 2)
    output, weights = engine.weighted_sum(normalizers.Sparsemax(), logits, value)
    np.testing.assert_allclose(
        ops.convert_to_numpy(output), ops.convert_to_numpy(weights) @ value, atol=1e-6
    )
    _, none = engine.weighted_sum(normalizers.Softmax(), logits, value, return_weights=False)
    assert none is None or keras.backend.backend() not in ("tensorflow", "jax")
    _, weights = engine.weighted_sum(normalizers.Softmax(), logits, value)
    np.testing.assert_allclose(ops.convert_to_numpy(weights).sum(-1), 1.0, atol=1e-6)


# -- causal on a CPU: block-sparse instead of the fused kernel ---------------------------


@pytest.mark.parametrize(
    "kwargs, path",
    [
        (dict(query_length=1024, key_length=1024), "block_sparse"),  # 0.67 of the blocks
        (dict(query_length=512, key_length=512), "fused"),  # 4 x 4 blocks: all computed
        (dict(query_length=1024, key_length=1024, flash_attention=True), "fused"),
        (dict(query_length=1024, key_length=1024, block_sparse=False), "fused"),
        (dict(query_length=1024, key_length=1024, query_offset=None), "fused"),  # traced
    ],
)
def test_causal_takes_the_block_sparse_path_where_the_fused_kernel_is_dense(kwargs, path):
    # On a CPU, keras.ops.dot_product_attention computes every score; a causal pattern
    # long enough skips a third of the blocks on the block-sparse path.
    assert engine.fused_kernel_is_dense()  # the test machines have no GPU or TPU
    assert choose(pattern="causal", **kwargs) == path


def test_where_the_fused_kernel_is_not_dense_causal_stays_fused(monkeypatch):
    monkeypatch.setattr(engine, "fused_kernel_is_dense", lambda: False)
    assert choose(pattern="causal", query_length=4096, key_length=4096) == "fused"


def test_long_causal_self_attention_equals_the_fused_kernel():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 1100, 16)).astype("float32")  # 9 blocks, the last one partial
    auto = keras_attn.MultiHeadAttention(num_heads=2, key_dim=8)
    fused = keras_attn.MultiHeadAttention(num_heads=2, key_dim=8, block_sparse=False)
    auto.build(x.shape, x.shape)
    fused.build(x.shape, x.shape)
    fused.set_weights(auto.get_weights())
    got = ops.convert_to_numpy(auto(x, x, use_causal_mask=True))
    want = ops.convert_to_numpy(fused(x, x, use_causal_mask=True))
    assert (auto.last_path, fused.last_path) == ("block_sparse", "fused")
    np.testing.assert_allclose(got, want, atol=1e-5)
