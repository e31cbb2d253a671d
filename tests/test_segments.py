"""Packed sequences: segment ids mask every pair across documents, on every path."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn import patterns
from keras_attn import segments
from keras_attn.testing import value_and_grads
from tests.decoding import assert_decodes_like_one_pass

SEGMENTS = np.array([[1] * 5 + [2] * 7 + [3] * 4, [7] * 9 + [8] * 7], "int32")  # (2, 16)


def _np(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")))


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def ref_attention(layer, query, context, mask):
    """The layer in numpy (no position encoding): weights over the allowed keys, output."""
    wq, bq, wk, bk, wv, bv, wo, bo = [np.asarray(w, "float64") for w in layer.get_weights()[:8]]
    q = np.einsum("btc,chd->bhtd", query, wq) + bq[None, :, None, :]
    k = np.einsum("btc,chd->bhtd", context, wk) + bk[None, :, None, :]
    v = np.einsum("btc,chd->bhtd", context, wv) + bv[None, :, None, :]
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = np.broadcast_to(mask[:, None], logits.shape)
    logits = np.where(mask, logits, -np.inf)
    top = np.max(np.where(mask, logits, -1e30), -1, keepdims=True)
    weights = np.where(mask, np.exp(logits - top), 0.0)
    weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-30)
    out = np.einsum("bhqk,bhkd->bqhd", weights, v)
    return np.einsum("bqhd,hde->bqe", out, wo) + bo, weights


def _segment_mask(query_ids, key_ids):
    return query_ids[:, :, None] == key_ids[:, None, :]


# -- the mask against numpy, on every path ---------------------------------------------


@pytest.mark.parametrize(
    "options,causal,path",
    [
        ({}, True, "fused"),
        ({}, False, "fused"),
        ({"normalizer": {"name": "topk", "config": {"k": 100}}}, True, "dense"),
        (
            {
                "pattern": {"name": "local", "config": {"window": 5}},
                "block_sparse": True,
                "block_size": 4,
            },
            True,
            "block_sparse",
        ),
    ],
)
def test_segment_mask_matches_numpy_on_every_path(options, causal, path):
    x = _x((2, 16, 8))
    layer = keras_attn.Attention(num_heads=2, key_dim=4, **options)
    out = _np(layer(x, segment_ids=SEGMENTS, use_causal_mask=causal))
    assert layer.last_path == path
    mask = _segment_mask(SEGMENTS, SEGMENTS)
    if causal:
        mask &= np.tril(np.ones((16, 16), bool))
    if "pattern" in options:
        distance = np.arange(16)[:, None] - np.arange(16)[None, :]
        mask &= np.abs(distance) < 5
    expected, weights = ref_attention(layer, x.astype("float64"), x.astype("float64"), mask)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    if path != "fused":
        _, w = layer(x, segment_ids=SEGMENTS, use_causal_mask=causal, return_attention_scores=True)
        np.testing.assert_allclose(_np(w), weights, atol=1e-5)


def test_cross_attention_query_and_key_segment_ids():
    query, context = _x((2, 6, 8), 1), _x((2, 9, 8), 2)
    query_ids = np.array([[1, 1, 2, 2, 2, 3], [4, 4, 4, 4, 5, 5]], "int32")
    key_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 9, 9], [4, 5, 5, 5, 5, 5, 5, 5, 5]], "int32")
    layer = keras_attn.Attention(num_heads=2, key_dim=4)
    out, w = layer(
        query,
        context,
        query_segment_ids=query_ids,
        key_segment_ids=key_ids,
        return_attention_scores=True,
    )
    expected, weights = ref_attention(
        layer, query.astype("float64"), context.astype("float64"), _segment_mask(query_ids, key_ids)
    )
    np.testing.assert_allclose(_np(w), weights, atol=1e-5)
    np.testing.assert_allclose(_np(out), expected, atol=1e-4)
    np.testing.assert_array_equal(_np(w)[0, :, 5], 0.0)  # segment 3 has no key: zeros


def test_segments_combine_with_keras_masks():
    tokens = np.array([[3, 4, 5, 6, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]], "int32")
    ids = np.array([[1, 1, 2, 2, 2, 3, 3, 3], [1, 1, 1, 1, 2, 2, 2, 2]], "int32")
    embed = keras.layers.Embedding(10, 8, mask_zero=True)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, normalizer="sparsemax")
    x = embed(tokens)
    _, w = layer(x, segment_ids=ids, return_attention_scores=True)
    w = _np(w)
    allowed = _segment_mask(ids, ids) & (tokens != 0)[:, None, :] & (tokens != 0)[:, :, None]
    assert np.all(w[np.broadcast_to(~allowed[:, None], w.shape)] == 0.0)
    expected = np.broadcast_to(allowed.any(-1)[:, None], w.shape[:3]).astype("float32")
    np.testing.assert_allclose(w.sum(-1), expected, atol=1e-5)


# -- packed equals unpacked ------------------------------------------------------------


class AbsoluteBias(keras_attn.ScoreMod):
    """A score_mod of absolute positions, so restarting them is observable."""

    name = "absolute_bias_for_tests"

    def call(self, logits, positions=None):
        # Not a function of query - key alone (which the softmax could not tell apart).
        bias = 0.01 * ops.cast(positions.query * positions.key, "float32")
        return logits + ops.cast(bias, logits.dtype)


def _packed_and_unpacked(layer, x, ids, **kwargs):
    """The packed row's per-token outputs, and the same documents run alone, padded."""
    packed = _np(layer(x, segment_ids=ids, use_causal_mask=True, **kwargs))
    alone = np.zeros_like(packed)
    for b in range(x.shape[0]):
        for segment in np.unique(ids[b]):
            where = np.flatnonzero(ids[b] == segment)
            doc = np.zeros_like(x[:1])
            doc[0, : len(where)] = x[b, where]
            valid = (np.arange(x.shape[1]) < len(where))[None]
            out = _np(
                layer(doc, query_mask=valid, value_mask=valid, use_causal_mask=True, **kwargs)
            )
            alone[b, where] = out[0, : len(where)]
    return packed, alone


@pytest.mark.parametrize(
    "options",
    [
        {"position_encoding": "rope"},
        {"position_encoding": "rope", "normalizer": "sink_softmax"},
        {"score_mods": [AbsoluteBias()]},
        {
            "position_encoding": "rope",
            "score_mods": [AbsoluteBias()],
            "block_sparse": True,
            "block_size": 4,
            "pattern": {"name": "local", "config": {"window": 6}},
        },
    ],
    ids=["rope", "rope_sinks", "score_mod", "block_sparse"],
)
def test_packed_equals_unpacked_and_padded(options):
    x = _x((2, 16, 8), 3)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, reset_positions=True, **options)
    packed, alone = _packed_and_unpacked(layer, x, SEGMENTS)
    np.testing.assert_allclose(packed, alone, atol=1e-4)


def test_without_reset_positions_packed_documents_see_absolute_positions():
    x = _x((2, 16, 8), 3)
    # rope is relative: within a document, absolute or restarted positions agree.
    layer = keras_attn.Attention(num_heads=2, key_dim=4, position_encoding="rope")
    packed, alone = _packed_and_unpacked(layer, x, SEGMENTS)
    np.testing.assert_allclose(packed, alone, atol=1e-4)
    assert layer.get_config()["reset_positions"] is False
    # A score_mod of absolute positions sees the difference after the first document.
    layer = keras_attn.Attention(num_heads=2, key_dim=4, score_mods=[AbsoluteBias()])
    packed, alone = _packed_and_unpacked(layer, x, SEGMENTS)
    np.testing.assert_allclose(packed[:, :5], alone[:, :5], atol=1e-4)
    assert not np.allclose(packed[0, 5:], alone[0, 5:], atol=1e-3)


def test_segment_starts():
    ids = np.array([[4, 4, 1, 1, 1, 4, 2], [0, 0, 0, 0, 0, 0, 0]], "int32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(segments.segment_starts(ids)),
        [[0, 0, 2, 2, 2, 5, 6], [0, 0, 0, 0, 0, 0, 0]],
    )


# -- no attention across segments -------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    boundary=st.integers(1, 11),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_other_documents_change_nothing_gradients_included(boundary, causal, seed):
    ids = (np.arange(12) >= boundary).astype("int32")[None]  # (1, 12): two documents
    layer = keras_attn.Attention(
        num_heads=2, key_dim=4, position_encoding="rope", reset_positions=True, seed=0
    )
    x = _x((1, 12, 8), seed)
    changed = x.copy()
    changed[0, boundary:] = _x((12 - boundary, 8), seed + 1)
    first = np.arange(12) < boundary
    out = _np(layer(x, segment_ids=ids, use_causal_mask=causal))
    out_changed = _np(layer(changed, segment_ids=ids, use_causal_mask=causal))
    np.testing.assert_allclose(out_changed[0, first], out[0, first], atol=1e-5)

    weights = np.where(first[None, :, None], 1.0, 0.0).astype("float32")

    def loss(inputs):
        return ops.sum(
            ops.multiply(layer(inputs, segment_ids=ids, use_causal_mask=causal), weights)
        )

    _, (grad,) = value_and_grads(loss, x)
    np.testing.assert_array_equal(grad[0, ~first], 0.0)
    assert np.any(grad[0, first] != 0.0)


# -- with a KV cache ---------------------------------------------------------------------


@pytest.mark.parametrize("reset_positions", [False, True])
def test_cached_decoding_with_segments(reset_positions):
    x = _x((2, 16, 8), 4)
    layer = keras_attn.Attention(
        num_heads=2, key_dim=4, position_encoding="rope", reset_positions=reset_positions
    )

    def step_kwargs(start, stop):
        # The key ids of every cache slot (the later ones are masked anyway).
        return {"segment_ids": SEGMENTS[:, start:stop], "key_segment_ids": SEGMENTS}

    assert_decodes_like_one_pass(
        layer, x, 6, 1e-4, full_kwargs={"segment_ids": SEGMENTS}, step_kwargs=step_kwargs
    )


# -- clear errors -------------------------------------------------------------------------


def test_bad_segment_ids_are_clear_errors():
    x = _x((2, 16, 8))
    layer = keras_attn.Attention(num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=r"segment_ids.*shape \(B, T\).*Received: segment_ids"):
        layer(x, segment_ids=SEGMENTS[:, :10])
    with pytest.raises(ValueError, match=r"segment_ids.*shape \(B, T\)"):
        layer(x, segment_ids=SEGMENTS[:, :, None])
    with pytest.raises(ValueError, match=r"integers.*Received: segment_ids.dtype=float32"):
        layer(x, segment_ids=SEGMENTS.astype("float32"))
    with pytest.raises(ValueError, match="both `query_segment_ids` and `key_segment_ids`"):
        layer(x, query_segment_ids=SEGMENTS)
    cache = ops.zeros(layer.cache_shape(2, 20))
    with pytest.raises(ValueError, match="cache slots"):
        layer(x, cache=cache, cache_update_index=0, segment_ids=SEGMENTS)


def test_sink_tokens_compose_with_segments_and_local():
    # StreamingLLM-style pattern on packed rows: the pattern's sinks are absolute.
    pattern = patterns.Local(4, causal=True) | patterns.SinkTokens(2, causal=True)
    x = _x((2, 16, 8), 5)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, pattern=pattern)
    _, w = layer(x, segment_ids=SEGMENTS, return_attention_scores=True)
    distance = np.arange(16)[:, None] - np.arange(16)[None, :]
    allowed = ((distance >= 0) & (distance < 4)) | ((np.arange(16)[None, :] < 2) & (distance >= 0))
    allowed = allowed[None] & _segment_mask(SEGMENTS, SEGMENTS)
    w = _np(w)
    assert np.all(w[np.broadcast_to(~allowed[:, None], w.shape)] == 0.0)


def test_presets_and_functional_models_take_segment_ids():
    x = _x((2, 16, 8), 6)
    mask = _segment_mask(SEGMENTS, SEGMENTS)
    for layer in (
        keras_attn.SelfAttention(num_heads=2, key_dim=4),
        keras_attn.MultiHeadAttention(num_heads=2, key_dim=4),
    ):
        args = (x,) if isinstance(layer, keras_attn.SelfAttention) else (x, x)
        _, w = layer(*args, segment_ids=SEGMENTS, return_attention_scores=True)
        _, expected = ref_attention(layer, x.astype("float64"), x.astype("float64"), mask)
        np.testing.assert_allclose(_np(w), expected, atol=1e-5)
    cross = keras_attn.CrossAttention(num_heads=2, key_dim=4)
    _, w = cross(
        x[:, :6],
        x,
        query_segment_ids=SEGMENTS[:, :6],
        key_segment_ids=SEGMENTS,
        return_attention_scores=True,
    )
    np.testing.assert_array_equal(_np(w)[np.broadcast_to(~mask[:, None, :6], w.shape)], 0.0)

    inputs, ids = keras.Input((16, 8)), keras.Input((16,), dtype="int32")
    layer = keras_attn.Attention(num_heads=2, key_dim=4, position_encoding="rope")
    model = keras.Model([inputs, ids], layer(inputs, segment_ids=ids, use_causal_mask=True))
    np.testing.assert_allclose(
        _np(model([x, SEGMENTS])),
        _np(layer(x, segment_ids=SEGMENTS, use_causal_mask=True)),
        atol=1e-5,
    )


def test_reset_positions_with_rope_trains_in_a_compiled_model():
    # TensorFlow's scan lost the rank of the segment starts inside a tf.function, so
    # rope after restarting positions failed under fit (found by the GPT --pack example).
    inputs, ids = keras.Input((16, 8)), keras.Input((16,), dtype="int32")
    layer = keras_attn.Attention(
        num_heads=2, key_dim=4, position_encoding="rope", reset_positions=True, seed=0
    )
    model = keras.Model([inputs, ids], layer(inputs, segment_ids=ids, use_causal_mask=True))
    model.compile(optimizer="sgd", loss="mse")
    x = _x((2, 16, 8), 7)
    history = model.fit([x, SEGMENTS], x, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    np.testing.assert_allclose(
        _np(model.predict([x, SEGMENTS], verbose=0)),
        _np(layer(x, segment_ids=SEGMENTS, use_causal_mask=True)),
        atol=1e-5,
    )


@pytest.mark.parametrize("block_sparse", [True, False])
def test_a_nan_in_a_key_of_a_segment_no_query_has_reaches_nothing(block_sparse):
    # Cross attention: the keys of a document that none of the queries belongs to are
    # masked for every query, so a NaN there has no influence on any path.
    x = _x((1, 32, 8), 8)
    query_ids = np.zeros((1, 32), "int32")
    key_ids = np.concatenate([np.zeros((1, 16)), np.ones((1, 16))], axis=1).astype("int32")
    poisoned = x.copy()
    poisoned[:, 20] = np.nan
    layer = keras_attn.Attention(
        num_heads=2, key_dim=4, pattern="causal", block_sparse=block_sparse, block_size=8
    )
    clean = layer(x, x, query_segment_ids=query_ids, key_segment_ids=key_ids)
    dirty = layer(x, poisoned, query_segment_ids=query_ids, key_segment_ids=key_ids)
    assert (layer.last_path == "block_sparse") == block_sparse
    np.testing.assert_array_equal(_np(dirty), _np(clean))
