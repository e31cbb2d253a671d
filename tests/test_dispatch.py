"""Tests of keras_attn.dispatch: the path choice, and every path of a layer agreeing."""

import logging
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import devices
from keras_attn import dispatch
from keras_attn import kernels
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import score_mods
from keras_attn.components import Components
from keras_attn.testing import value_and_grads
from tests.references import np_softmax_attention

RNG = np.random.default_rng(7)


def randn(*shape):
    return RNG.standard_normal(shape).astype("float32")


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


def test_where_the_fused_kernel_is_not_dense_causal_stays_fused():
    with devices.assume(devices.Machine(keras.backend.backend(), "gpu")):
        assert choose(pattern="causal", query_length=4096, key_length=4096) == "fused"
    assert choose(pattern="causal", query_length=4096, key_length=4096) == "block_sparse"


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


# -- edge inputs: every path gives the same, right answer -------------------------------


# The paths that take data masks. The native path (a sliding window on a GPU, with no
# data mask) is tested against the dense one in tests/test_native.py.
MASKED_PATHS = tuple(p for p in dispatch.PATHS if p != "native")


def every_plan(components, query_length, key_length, head_dim):
    """A plan of each path for these components (scaled_dot + softmax + full or causal)."""
    kwargs = dict(query_length=query_length, key_length=key_length, head_dim=head_dim)
    plans = {
        "fused": dispatch.plan(components, block_sparse=False, **kwargs),
        "block_sparse": dispatch.plan(components, block_sparse=True, block_size=4, **kwargs),
        "dense": dispatch.Plan("dense", components),
    }
    assert {name: p.path for name, p in plans.items()} == {name: name for name in plans}
    return plans


def softmax_components(pattern="causal", **layer_kwargs):
    resolve = keras_attn.plugins.resolve
    return Components(
        score=resolve("score", "scaled_dot", **layer_kwargs),
        score_mods=(),
        pattern=resolve("pattern", pattern),
        normalizer=resolve("normalizer", "softmax", **layer_kwargs),
    )


def heads_first(x):
    return np.swapaxes(x, 1, 2)  # (B, T, H, D) <-> (B, H, T, D)


def np_reference(q, k, v, mask, causal=True):
    """float64 masked softmax attention of (B, T, H, D) heads; mask (B, 1, Tq, Tk)."""
    q, k, v = (heads_first(x.astype("float64")) for x in (q, k, v))
    tq, tk = q.shape[2], k.shape[2]
    allowed = np.broadcast_to(mask, (q.shape[0], q.shape[1], tq, tk))
    if causal:
        allowed = allowed & (np.arange(tk)[None, :] <= np.arange(tq)[:, None])
    v = np.where(allowed.any(2)[..., None], v, 0.0)  # a NaN at a masked key has no say
    out, _ = np_softmax_attention(q, k, v, allowed, 1 / np.sqrt(q.shape[-1]))
    return heads_first(out)


@pytest.mark.parametrize("path", MASKED_PATHS)
def test_float16_logits_beyond_65504_are_right_on_every_path(path):
    # Under mixed_float16, q·k/√d here reaches ~10^5 (and ~10^8 for the padding key):
    # float16 logits overflow to inf and the softmax to NaN, as in Keras's own layer.
    keras.config.set_dtype_policy("mixed_float16")
    rng = np.random.default_rng(1)
    b, t, h, d = 2, 8, 2, 8
    q = (rng.standard_normal((b, t, h, d)) * 300).astype("float16")
    k = (q.astype("float32") + rng.standard_normal((b, t, h, d)) * 30).astype("float16")
    k[:, -1] = 30000.0  # a masked padding key with a huge value
    v = rng.standard_normal((b, t, h, d)).astype("float16")
    mask = np.ones((b, 1, 1, t), bool)
    mask[..., -1] = False
    components = softmax_components("causal", dtype="mixed_float16")
    plan = every_plan(components, t, t, d)[path]
    output, _ = dispatch.attend(plan, q, k, v, mask=mask)
    assert keras.backend.standardize_dtype(output.dtype) == "float16"
    output = ops.convert_to_numpy(ops.cast(output, "float32"))
    assert np.isfinite(output).all()
    np.testing.assert_allclose(output, np_reference(q, k, v, mask), atol=1e-2)


def attend_sum(plan, mask, weights_out):
    def fn(q, k, v):
        output, _ = dispatch.attend(plan, q, k, v, mask=mask)
        return ops.sum(ops.multiply(output, weights_out))

    return fn


@pytest.mark.parametrize("path", MASKED_PATHS)
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_non_finite_values_at_masked_positions_have_no_influence(path, poison):
    # Padded keys (and padded queries) hold NaN or inf in query, key and value: the
    # outputs and every gradient equal those of the clean inputs.
    rng = np.random.default_rng(2)
    b, t, h, d = 2, 8, 2, 4
    q, k, v = (rng.standard_normal((b, t, h, d)).astype("float32") for _ in range(3))
    mask = np.ones((b, 1, t, t), bool)
    mask[0, ..., 6:] = False  # batch 0: the last two keys are padding
    mask[1, :, 5:, :] = False  # batch 1: the last three queries are padding
    dirty = [x.copy() for x in (q, k, v)]
    for x in dirty[1:]:
        x[0, 6:] = poison
    dirty[0][1, 5:] = poison
    weights_out = rng.standard_normal((b, t, h, d)).astype("float32")
    plan = every_plan(softmax_components("causal"), t, t, d)[path]
    fn = attend_sum(plan, mask, weights_out)
    clean_value, clean_grads = value_and_grads(fn, q, k, v)
    dirty_value, dirty_grads = value_and_grads(fn, *dirty)
    assert np.isfinite(dirty_value)
    np.testing.assert_allclose(dirty_value, clean_value, rtol=1e-5)
    output, _ = dispatch.attend(plan, *dirty, mask=mask)
    np.testing.assert_allclose(ops.convert_to_numpy(output), np_reference(q, k, v, mask), atol=1e-5)
    for clean, grad in zip(clean_grads, dirty_grads, strict=True):
        assert np.isfinite(grad).all()
        np.testing.assert_allclose(grad, clean, atol=1e-5)
    np.testing.assert_array_equal(dirty_grads[2][0, 6:], 0.0)  # no say: no gradient


@pytest.mark.parametrize("path", MASKED_PATHS)
@pytest.mark.parametrize("query_length, key_length", [(0, 6), (6, 0), (0, 0)])
def test_empty_queries_or_keys_give_zeros_on_every_path(path, query_length, key_length):
    b, h, d = 2, 2, 4
    plan = every_plan(softmax_components("causal"), query_length, key_length, d)[path]
    q = randn(b, query_length, h, d)
    k, v = randn(b, key_length, h, d), randn(b, key_length, h, 3)
    output, weights = dispatch.attend(plan, q, k, v, return_weights=True)
    assert tuple(output.shape) == (b, query_length, h, 3)
    assert tuple(weights.shape) == (b, h, query_length, key_length)
    np.testing.assert_array_equal(ops.convert_to_numpy(output), 0.0)


@pytest.mark.parametrize("block_sparse", ["auto", True, False])
@pytest.mark.parametrize("query_length, key_length", [(0, 6), (6, 0)])
def test_a_layer_on_empty_inputs_gives_the_same_on_every_setting(
    block_sparse, query_length, key_length
):
    layer = keras_attn.Attention(
        num_heads=2, key_dim=4, pattern="causal", block_sparse=block_sparse, block_size=4
    )
    output = layer(randn(2, query_length, 8), randn(2, key_length, 8))
    assert tuple(output.shape) == (2, query_length, 8)
    bias = ops.convert_to_numpy(layer.output_dense.bias)
    np.testing.assert_allclose(ops.convert_to_numpy(output), np.broadcast_to(bias, output.shape))


# -- lengths unknown where traced: never a silent fall back to quadratic memory ---------


def test_a_sparse_pattern_with_unknown_lengths_warns_once_naming_the_layer():
    components = softmax_components(patterns.Local(16))
    kwargs = dict(query_length=None, key_length=None, head_dim=8, name="unknown_lengths_1")
    with pytest.warns(RuntimeWarning, match=r"'unknown_lengths_1'.*quadratic") as caught:
        assert dispatch.plan(components, **kwargs).path == "dense"
        assert dispatch.plan(components, **kwargs).path == "dense"
    assert len([w for w in caught if "unknown_lengths_1" in str(w.message)]) == 1


def test_full_and_causal_patterns_and_known_lengths_do_not_warn(recwarn):
    # Full and causal attention on whole matrices is what Keras's own layer does.
    dispatch.plan(softmax_components("full"), query_length=None, key_length=None, head_dim=8)
    dispatch.plan(softmax_components("causal"), query_length=None, key_length=None, head_dim=8)
    dispatch.plan(
        softmax_components(patterns.Local(16)), query_length=64, key_length=64, head_dim=8
    )
    assert not [w for w in recwarn if "keras_attn layer" in str(w.message)]


def test_a_model_with_variable_lengths_keeps_block_sparse_or_warns_once(backend):
    # Input((None, d)): on TensorFlow, model.predict traces the second length with a
    # length of None; the block-sparse path then cannot run, and that must not be silent.
    layer = keras_attn.LocalAttention(
        window=16, num_heads=2, block_size=16, name="variable_lengths_local"
    )
    inputs = keras.Input((None, 8))
    model = keras.Model(inputs, layer(inputs))
    paths = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for length in (256, 320, 384):
            model.predict(randn(1, length, 8), verbose=0)
            paths.append(layer.last_path)
    messages = [str(w.message) for w in caught if "variable_lengths_local" in str(w.message)]
    assert paths[0] == "block_sparse"
    if paths == ["block_sparse"] * 3:
        assert messages == []
    else:
        assert backend == "tensorflow"
        assert len(messages) == 1 and "unknown where the function is traced" in messages[0]


def layer_output_and_grads(layer, fn, inputs, upstream):
    """``fn(*inputs)`` and the gradients of ``sum(fn(*inputs) * upstream)`` for the
    inputs and every trainable weight of `layer`, as numpy."""

    def total(*tensors):
        out = fn(*tensors)
        return ops.sum(ops.multiply(out, upstream)), out

    _, grads, out = value_and_grads(
        total, *inputs, variables=layer.trainable_variables, has_aux=True
    )
    return ops.convert_to_numpy(out), grads


@pytest.mark.parametrize("path", MASKED_PATHS)
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_a_nan_at_a_padded_position_has_no_influence_on_a_layer(path, poison):
    # Every output and every gradient (inputs and weights) equals that of clean inputs:
    # the padded rows are selected away before the projections and the matmuls.
    block_sparse = {"fused": False, "dense": False, "block_sparse": True}[path]
    layer = keras_attn.Attention(
        num_heads=2, pattern="causal", block_sparse=block_sparse, block_size=4
    )
    x, c = randn(2, 8, 8), randn(2, 8, 8)
    query_mask = np.ones((2, 8), bool)
    query_mask[1, 6:] = False
    value_mask = np.ones((2, 8), bool)
    value_mask[0, 5:] = False
    layer(x, c)
    dirty_x, dirty_c = x.copy(), c.copy()
    dirty_x[1, 6:] = poison
    dirty_c[0, 5:] = poison
    upstream = randn(2, 8, 8)

    def run(x, c):
        kwargs = dict(query_mask=query_mask, value_mask=value_mask)
        out = layer(x, c, return_attention_scores=path == "dense", **kwargs)
        return out[0] if path == "dense" else out

    clean_out, clean_grads = layer_output_and_grads(layer, run, (x, c), upstream)
    dirty_out, dirty_grads = layer_output_and_grads(layer, run, (dirty_x, dirty_c), upstream)
    assert layer.last_path == path
    np.testing.assert_allclose(dirty_out, clean_out, atol=1e-5)
    assert len(dirty_grads) == 2 + 8  # both inputs, the four kernels and biases
    for clean, dirty in zip(clean_grads, dirty_grads, strict=True):
        assert np.isfinite(dirty).all()
        np.testing.assert_allclose(dirty, clean, atol=1e-5)
