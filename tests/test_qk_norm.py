"""QK-norm (`keras_attn.qk_norm`, ``Attention(qk_norm=...)``) against numpy and KerasHub.

Each head's queries and keys are normalised after the projections and before the
position encoding (so keys are cached normalised): checked against a numpy
reference on every layer, against KerasHub's Qwen3 and Gemma 3 attention with the
same weights (cached decoding included), across the fused, dense and block-sparse
paths, through get_config and ``.keras`` files, and under mixed precision.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn.qk_norm import L2Norm
from keras_attn.qk_norm import RMSNorm
from tests.decoding import assert_decodes_like_one_pass
from tests.decoding import decode_with_cache
from tests.references import np_softmax_attention

B, T, S, DIM = 2, 7, 5, 16


def randn(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def numpy(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")))


# -- numpy references ---------------------------------------------------------------------


def ref_rms(x, scale, epsilon=1e-6, unit_offset=False):
    x = np.asarray(x, "float64")
    normed = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + epsilon)
    return normed * ((1.0 + scale) if unit_offset else scale)


def ref_l2(x, epsilon=1e-12):
    x = np.asarray(x, "float64")
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), epsilon)


def ref_rope(x, positions, max_wavelength=10000.0):
    """Rotary embedding of heads ``(B, T, H, D)``: halves rotated pair by pair."""
    depth = x.shape[-1]
    inverse = max_wavelength ** (-np.arange(0, depth, 2) / depth)
    angles = np.asarray(positions, "float64")[:, None, None] * inverse  # (T, 1, D / 2)
    x1, x2 = x[..., : depth // 2], x[..., depth // 2 :]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def ref_attention(weights, query, context, norm, num_heads, allowed, rope=False):
    """The layer in numpy: projections, QK-norm, rope, softmax attention, output.

    Args:
        weights: ``{path inside the layer: array}`` (``query/kernel``, ...).
        query: ``(B, Tq, dim)``; context ``(B, Tk, dim)``.
        norm: ``"rms"``, ``"l2"``, ``("rms", epsilon, unit_offset)`` or None.
        allowed: Bool ``(Tq, Tk)``.
    """

    def project(x, name):
        y = np.einsum("btm,mhd->bthd", x, weights[f"{name}/kernel"])
        return y + weights.get(f"{name}/bias", 0.0)

    q, k, v = project(query, "query"), project(context, "key"), project(context, "value")
    if norm == "l2":
        q, k = ref_l2(q), ref_l2(k)
    elif norm is not None:
        _, epsilon, unit_offset = ("rms", 1e-6, False) if norm == "rms" else norm
        q = ref_rms(q, weights["query_norm/scale"], epsilon, unit_offset)
        k = ref_rms(k, weights["key_norm/scale"], epsilon, unit_offset)
    if rope:
        q, k = ref_rope(q, np.arange(q.shape[1])), ref_rope(k, np.arange(k.shape[1]))
    repeats = num_heads // k.shape[2]
    k, v = np.repeat(k, repeats, axis=2), np.repeat(v, repeats, axis=2)
    heads = [np.swapaxes(t, 1, 2) for t in (q, k, v)]  # (B, H, T, D)
    out, _ = np_softmax_attention(*heads, allowed[None, None], 1.0 / np.sqrt(q.shape[-1]))
    out = np.einsum("bhtd,hdm->btm", out, weights["attention_output/kernel"])
    return out + weights.get("attention_output/bias", 0.0)


def randomize(layer, seed=0):
    """Random weights (scales included, so a missing scale shows); returns them by path."""
    rng = np.random.default_rng(seed)
    layer.set_weights([0.5 * rng.normal(size=w.shape) for w in layer.get_weights()])
    return {w.path.split("/", 1)[1]: numpy(w) for w in layer.weights}


def causal(tq, tk):
    return np.tril(np.ones((tq, tk), bool))


# -- the norm layers ------------------------------------------------------------------


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_equals_numpy(unit_offset):
    x = randn(2, 3, 4, 8)
    layer = RMSNorm(epsilon=1e-3, unit_offset=unit_offset)
    layer.build(x.shape)
    init = numpy(layer.scale)
    np.testing.assert_array_equal(init, np.zeros(8) if unit_offset else np.ones(8))
    scale = randn(8, seed=1)
    layer.set_weights([scale])
    np.testing.assert_allclose(
        numpy(layer(x)), ref_rms(x, scale, 1e-3, unit_offset), rtol=1e-5, atol=1e-5
    )


def test_l2_norm_equals_numpy_and_keeps_zero_vectors_finite():
    x = randn(2, 3, 4, 8)
    x[0, 0, 0] = 0.0
    out = numpy(L2Norm()(x))
    np.testing.assert_allclose(out, ref_l2(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[0, 0, 0], np.zeros(8))
    assert L2Norm().weights == []


@pytest.mark.parametrize("bad", ["layer_norm", 3, {"name": "rms"}])
def test_a_bad_qk_norm_names_the_argument(bad):
    with pytest.raises((ValueError, TypeError), match="qk_norm"):
        keras_attn.Attention(num_heads=2, qk_norm=bad)


def test_a_negative_epsilon_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        RMSNorm(epsilon=-1.0)


# -- every layer against numpy ------------------------------------------------------------


def _layers():
    """``(id, make(**kwargs), cross, num_heads, allowed (Tq, Tk) or 'causal')``."""
    return [
        ("Attention", lambda **kw: keras_attn.Attention(num_heads=4, key_dim=4, **kw), True, 4),
        ("MultiHeadAttention", lambda **kw: keras_attn.MultiHeadAttention(4, 4, **kw), True, 4),
        (
            "GroupedQueryAttention",
            lambda **kw: keras_attn.GroupedQueryAttention(4, 4, 2, **kw),
            True,
            4,
        ),
        ("SelfAttention", lambda **kw: keras_attn.SelfAttention(num_heads=2, **kw), False, 2),
        ("CrossAttention", lambda **kw: keras_attn.CrossAttention(num_heads=2, **kw), True, 2),
        ("SoftAttention", lambda **kw: keras_attn.SoftAttention(num_heads=2, **kw), True, 2),
        ("GlobalAttention", lambda **kw: keras_attn.GlobalAttention(num_heads=2, **kw), True, 2),
    ]


def _call(layer, query, context, cross, **kwargs):
    if isinstance(layer, keras_attn.SelfAttention):
        return layer(query, **kwargs)
    if isinstance(layer, keras_attn.CrossAttention):
        return layer(query, context, **kwargs)
    return layer(query, context, **kwargs) if cross else layer(query, **kwargs)


@pytest.mark.parametrize("norm", ["rms", "l2"])
@pytest.mark.parametrize("name,make,cross,heads", _layers(), ids=[c[0] for c in _layers()])
def test_every_layer_normalizes_queries_and_keys_like_numpy(name, make, cross, heads, norm):
    x, c = randn(B, T, DIM), randn(B, S, DIM, seed=1)
    context = c if cross else x
    layer = make(qk_norm=norm)
    _call(layer, x, context, cross)
    weights = randomize(layer)
    out = numpy(_call(layer, x, context, cross))
    allowed = np.ones((T, context.shape[1]), bool)
    expected = ref_attention(weights, x, context, norm, heads, allowed)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # The weights that Keras's layers have come first, in their order; the scales last.
    paths = [w.path.split("/", 1)[1] for w in layer.weights]
    extras = ["query_norm/scale", "key_norm/scale"] if norm == "rms" else []
    assert paths[len(paths) - len(extras) :] == extras
    assert paths[0] == "query/kernel"


def test_local_attention_with_qk_norm_and_rope_like_numpy():
    # The norm comes before rope: with a learned per-dim scale the two do not commute.
    x = randn(B, T, DIM)
    layer = keras_attn.LocalAttention(
        window=3, causal=True, num_heads=2, qk_norm="rms", position_encoding="rope"
    )
    layer(x, x)
    weights = randomize(layer)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (j <= i) & (i - j < 3)
    expected = ref_attention(weights, x, x, "rms", 2, allowed, rope=True)
    np.testing.assert_allclose(numpy(layer(x, x)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["rms", "l2"])
def test_inputs_of_rank_4_normalize_each_head_like_numpy(norm):
    x = randn(B, 3, T, DIM)
    layer = keras_attn.MultiHeadAttention(2, 4, attention_axes=(2,), qk_norm=norm)
    layer(x, x)
    weights = randomize(layer)
    rows = x.reshape(B * 3, T, DIM)  # attention along axis 2: each row on its own
    expected = ref_attention(weights, rows, rows, norm, 2, np.ones((T, T), bool))
    np.testing.assert_allclose(
        numpy(layer(x, x)), expected.reshape(B, 3, T, DIM), rtol=1e-4, atol=1e-4
    )


def test_the_drop_in_with_l2_norm_has_exactly_keras_weights():
    x = randn(B, T, DIM)
    theirs = keras.layers.MultiHeadAttention(4, 4)
    theirs(x, x)
    ours = keras_attn.MultiHeadAttention(4, 4, qk_norm="l2")
    ours(x, x)
    ours.set_weights(theirs.get_weights())
    weights = {w.path.split("/", 1)[1]: numpy(w) for w in ours.weights}
    expected = ref_attention(weights, x, x, "l2", 4, np.ones((T, T), bool))
    np.testing.assert_allclose(numpy(ours(x, x)), expected, rtol=1e-4, atol=1e-4)


class _BuildsItsOwnProjections(keras_attn.MultiHeadAttention):
    """A subclass written for Keras's class: its `build` replaces the layer's own."""

    def build(self, query_shape, value_shape, key_shape=None):
        def projection(name, shape, heads, depth):
            layer = keras.layers.EinsumDense(
                "abc,cde->abde", output_shape=(None, heads, depth), bias_axes="de",
                name=name, **self._get_common_kwargs_for_sublayer(),
            )  # fmt: skip
            layer.build(shape)
            return layer

        self._query_dense = projection("query", query_shape, self._num_heads, self._key_dim)
        self._key_dense = projection(
            "key", key_shape or value_shape, self._num_heads, self._key_dim
        )
        self._value_dense = projection("value", value_shape, self._num_heads, self._value_dim)
        self._build_attention(4)
        self._output_dense = self._make_output_dense(
            query_shape, self._get_common_kwargs_for_sublayer(), "attention_output"
        )
        self._output_dense.build((*query_shape[:-1], self._num_heads, self._value_dim))


def test_a_subclass_with_its_own_build_gets_the_qk_norm_last():
    x, c = randn(B, T, DIM), randn(B, S, DIM, seed=1)
    layer = _BuildsItsOwnProjections(4, 4, qk_norm="rms")
    layer(x, c)
    weights = randomize(layer)
    paths = [w.path.split("/", 1)[1] for w in layer.weights]
    assert paths[-2:] == ["query_norm/scale", "key_norm/scale"]
    expected = ref_attention(weights, x, c, "rms", 4, np.ones((T, S), bool))
    np.testing.assert_allclose(numpy(layer(x, c)), expected, rtol=1e-4, atol=1e-4)


# -- KerasHub's own QK-normed attention ---------------------------------------------------


def _copy_by_name(theirs, ours, renames, transpose=()):
    """Set `ours`'s weights from `theirs`, matched by path (KerasHub orders them otherwise).

    `transpose`: paths of kernels that KerasHub lays out ``(H, dim, D)``, ours ``(dim, H, D)``.
    """
    by_path = {w.path.split("/", 1)[1]: w for w in theirs.weights}
    values = []
    for w in ours.weights:
        path = w.path.split("/", 1)[1]
        value = numpy(by_path[renames.get(path, path)])
        values.append(np.transpose(value, (1, 0, 2)) if path in transpose else value)
    ours.set_weights(values)


def _qwen3(x):
    qwen3 = pytest.importorskip("keras_hub.src.models.qwen3.qwen3_attention")
    theirs = qwen3.Qwen3Attention(4, 2, 8, layer_norm_epsilon=1e-6)
    theirs.build(x.shape)
    randomize(theirs)
    ours = keras_attn.GroupedQueryAttention(
        8, 4, 2, use_bias=False, qk_norm=RMSNorm(epsilon=1e-6), position_encoding="rope"
    )
    ours(x, x)
    _copy_by_name(
        theirs,
        ours,
        {
            "query_norm/scale": "query_dense_layernorm/scale",
            "key_norm/scale": "key_dense_layernorm/scale",
        },
    )
    return theirs, ours


def test_equals_keras_hub_qwen3_attention():
    x = randn(B, T, DIM)
    theirs, ours = _qwen3(x)
    mask = np.broadcast_to(causal(T, T), (B, T, T))
    expected = numpy(theirs(x, attention_mask=mask))
    np.testing.assert_allclose(numpy(ours(x, use_causal_mask=True)), expected, atol=1e-5)


def test_equals_keras_hub_gemma3_attention():
    gemma3 = pytest.importorskip("keras_hub.src.models.gemma3.gemma3_attention")
    x = randn(B, T, DIM)
    theirs = gemma3.CachedGemma3Attention(8, 4, 2, use_query_key_norm=True)
    theirs.build(x.shape)
    randomize(theirs)
    ours = keras_attn.GroupedQueryAttention(
        8, 4, 2, use_bias=False, qk_norm=RMSNorm(epsilon=1e-6, unit_offset=True),
        position_encoding="rope",
    )  # fmt: skip
    ours(x, x)
    _copy_by_name(theirs, ours, {}, transpose=("query/kernel", "key/kernel", "value/kernel"))
    mask = np.broadcast_to(causal(T, T), (B, T, T))
    expected = numpy(theirs(x, attention_mask=mask))
    np.testing.assert_allclose(numpy(ours(x, use_causal_mask=True)), expected, atol=1e-5)


def test_cached_decoding_equals_keras_hub_qwen3_cache():
    # Keys are cached normalised and rotated: the caches themselves agree.
    x = randn(B, T, DIM)
    theirs, ours = _qwen3(x)
    cache = np.zeros((B, 2, T, 2, 8), "float32")
    outputs = []
    for start in range(T):
        mask = np.broadcast_to(causal(T, T)[start : start + 1], (B, 1, T))
        out, cache = theirs(x[:, start : start + 1], attention_mask=mask, cache=cache,
                            cache_update_index=start)  # fmt: skip
        outputs.append(numpy(out))
    decoded, our_cache = decode_with_cache(ours, x, prefill=1, use_causal_mask=True)
    np.testing.assert_allclose(decoded, np.concatenate(outputs, axis=1), atol=1e-5)
    np.testing.assert_allclose(our_cache, numpy(cache), atol=1e-5)


# -- the cache and the paths ----------------------------------------------------------------


@pytest.mark.parametrize("norm", ["rms", "l2"])
def test_cached_decoding_equals_one_pass(norm):
    x = randn(B, T, DIM)
    layer = keras_attn.GroupedQueryAttention(4, 4, 2, qk_norm=norm, position_encoding="rope")
    layer(x, x)
    randomize(layer)
    assert_decodes_like_one_pass(layer, x, prefill=3)


def test_keys_are_cached_normalized():
    x = randn(B, T, DIM)
    layer = keras_attn.MultiHeadAttention(2, 8, qk_norm="l2")
    layer(x, x)
    randomize(layer)
    _, cache = decode_with_cache(layer, x, prefill=2, use_causal_mask=True)
    np.testing.assert_allclose(np.linalg.norm(cache[:, 0], axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("norm", ["rms", "l2"])
def test_fused_dense_and_block_sparse_paths_agree(norm):
    t = 16
    x = randn(B, t, DIM)
    layers = {
        "fused": keras_attn.Attention(num_heads=2, qk_norm=norm, pattern="causal"),
        "dense": keras_attn.Attention(
            num_heads=2, qk_norm=norm, pattern="causal", block_sparse=False
        ),
        "block_sparse": keras_attn.Attention(
            num_heads=2, qk_norm=norm, pattern="causal", block_sparse=True, block_size=4
        ),
    }
    for layer in layers.values():
        layer(x)
    weights = randomize(layers["fused"])
    expected = ref_attention(weights, x, x, norm, 2, causal(t, t))
    for path, layer in layers.items():
        layer.set_weights(layers["fused"].get_weights())
        # Asking for the weights rules the fused kernel out.
        out = layer(x, return_attention_scores=path == "dense")
        out = numpy(out[0] if path == "dense" else out)
        assert layer.last_path in (path, "native"), (path, layer.last_path)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=path)


# -- config, files, mixed precision ----------------------------------------------------------


QK_NORMS = {
    "rms": "rms",
    "l2": "l2",
    "gemma": RMSNorm(epsilon=1e-5, unit_offset=True),
}


@pytest.mark.parametrize("norm", list(QK_NORMS), ids=list(QK_NORMS))
def test_config_round_trip_and_keras_file(norm, tmp_path):
    x = randn(B, T, DIM)
    inputs = keras.Input((T, DIM))
    layer = keras_attn.GroupedQueryAttention(4, 4, 2, qk_norm=QK_NORMS[norm], name="gqa")
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    randomize(layer)
    config = layer.get_config()
    clone = keras_attn.GroupedQueryAttention.from_config(config)
    assert clone.get_config() == config
    clone(x, x)
    clone.set_weights(layer.get_weights())
    expected = numpy(model(x))
    np.testing.assert_allclose(numpy(clone(x, x, use_causal_mask=True)), expected, atol=1e-6)
    path = tmp_path / "qk.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.get_layer("gqa").get_config() == config
    np.testing.assert_allclose(numpy(restored(x)), expected, atol=1e-6)


def test_mixed_bfloat16_stays_finite_and_close():
    x = randn(B, T, DIM) * 30.0  # large activations: what QK-norm is for
    keras.config.set_dtype_policy("mixed_bfloat16")
    low = keras_attn.MultiHeadAttention(4, 4, qk_norm="rms", position_encoding="rope")
    low(x, x)
    assert low.query_norm.scale.dtype == "float32"
    keras.config.set_dtype_policy("float32")
    high = keras_attn.MultiHeadAttention(4, 4, qk_norm="rms", position_encoding="rope")
    high(x, x)
    randomize(high)
    low.set_weights(high.get_weights())
    out_low = numpy(low(x, x, use_causal_mask=True))
    out_high = numpy(high(x, x, use_causal_mask=True))
    assert np.isfinite(out_low).all()
    scale = np.abs(out_high).max()
    np.testing.assert_allclose(out_low / scale, out_high / scale, atol=6e-2)
