"""Tests of keras_attn.dispatch: the path choice, and every path of a layer agreeing."""

import logging

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import dispatch
from keras_attn import kernels
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import score_mods
from keras_attn.components import Components

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
    dropout_active = kwargs.pop("dropout_active", False)
    components = Components(
        score=plugins.resolve("score", score),
        score_mods=tuple(plugins.resolve("score_mod", m) for m in mods),
        pattern=plugins.resolve("pattern", pattern),
        normalizer=plugins.resolve("normalizer", normalizer),
        dropout=keras.layers.Dropout(0.5) if dropout_active else None,
    )
    return dispatch.choose_path(
        components,
        query_length=kwargs.pop("query_length", 16),
        key_length=kwargs.pop("key_length", 16),
        head_dim=8,
        training=dropout_active,
        **kwargs,
    )


@pytest.mark.parametrize(
    "kwargs, path",
    [
        (dict(), "fused"),
        (dict(pattern="causal"), "fused"),
        (dict(return_weights=True), "dense"),
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
    assert kernels.fused_kernel_is_dense()  # the test machines have no GPU or TPU
    assert choose(pattern="causal", **kwargs) == path


def test_where_the_fused_kernel_is_not_dense_causal_stays_fused(monkeypatch):
    monkeypatch.setattr(kernels, "fused_kernel_is_dense", lambda: False)
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
