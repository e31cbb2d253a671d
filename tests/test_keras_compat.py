"""keras_attn's Keras drop-ins against Keras's own layers, number for number.

Keras's own test files run in `test_keras_suites.py`; this file covers what they do
not check with numbers: masks of every shape and dtype, attention over several axes,
the override contract of subclasses, grouped key/value heads on every path, and that
the caller's tensors keep their Keras masks.
"""

import numpy as np
import pytest
from keras import layers
from keras import ops

import keras_attn
from keras_attn import patterns
from tests.decoding import assert_decodes_like_one_pass

B, T, S, F = 2, 5, 6, 8


def randn(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


X = randn(B, T, F)
V = randn(B, S, F, seed=1)


def pair(num_heads=2, key_dim=4, query=X, value=V, **kwargs):
    """Keras's MultiHeadAttention and keras_attn's, built on the inputs, same weights."""
    theirs = layers.MultiHeadAttention(num_heads=num_heads, key_dim=key_dim, **kwargs)
    ours = keras_attn.MultiHeadAttention(num_heads=num_heads, key_dim=key_dim, **kwargs)
    theirs(query, value)
    ours(query, value)
    ours.set_weights(theirs.get_weights())
    return theirs, ours


def assert_same(theirs, ours, *args, atol=1e-5, **kwargs):
    expected = theirs(*args, return_attention_scores=True, **kwargs)
    got = ours(*args, return_attention_scores=True, **kwargs)
    for e, g in zip(expected, got, strict=True):
        assert tuple(g.shape) == tuple(e.shape)
        np.testing.assert_allclose(ops.convert_to_numpy(g), ops.convert_to_numpy(e), atol=atol)


# -- masks ------------------------------------------------------------------------------

# Every query row keeps at least one key, so Keras's uniform rows do not come into it.
KEEP = np.ones((B, T, S), bool)
KEEP[0, :, 4:] = False
KEEP[1, 2, :3] = False


@pytest.mark.parametrize(
    "mask",
    [
        KEEP,  # (B, T, S)
        KEEP[:1],  # (1, T, S)
        KEEP[0],  # (T, S)
        KEEP[:, :1],  # (B, 1, S), broadcast over the queries
        KEEP.astype("int32"),  # 0/1 ints
        KEEP.astype("float32"),  # 0/1 floats
        np.stack([KEEP, KEEP[:, :, ::-1]], axis=1),  # (B, H, T, S): per head
    ],
    ids=["BTS", "1TS", "TS", "B1S", "int", "float", "per_head"],
)
def test_attention_masks_as_keras(mask):
    theirs, ours = pair()
    assert_same(theirs, ours, X, V, attention_mask=mask)


def test_per_head_mask_differs_per_head():
    theirs, ours = pair()
    per_head = np.stack([KEEP, np.ones_like(KEEP)], axis=1)
    _, scores = ours(X, V, attention_mask=per_head, return_attention_scores=True)
    scores = ops.convert_to_numpy(scores)
    assert np.all(scores[:, 0][~KEEP] == 0) and np.all(scores[:, 1] > 0)


@pytest.mark.parametrize("causal", [False, True])
def test_keras_masks_and_causal_as_keras(causal):
    tokens = np.array([[1, 2, 3, 4, 0], [3, 3, 1, 0, 0]])
    values = np.array([[5, 4, 2, 1, 0, 0], [3, 2, 1, 1, 1, 1]])
    query = layers.Embedding(6, F, mask_zero=True)(tokens)
    value = layers.Embedding(6, F, mask_zero=True)(values)
    theirs, ours = pair(query=query, value=value)
    # Keras's class takes the masks off its inputs, so ours runs first.
    got = ours(query, value, use_causal_mask=causal)
    expected = theirs(query, value, use_causal_mask=causal)
    valid = tokens != 0  # padded query rows: Keras's are uniform, ours zero weights
    np.testing.assert_allclose(
        ops.convert_to_numpy(got)[valid], ops.convert_to_numpy(expected)[valid], atol=1e-5
    )


def test_a_query_row_with_no_key_gets_zero_weights():
    # The one deliberate difference: Keras spreads such a row uniformly.
    _, ours = pair()
    mask = KEEP.copy()
    mask[1, 3] = False
    output, scores = ours(X, V, attention_mask=mask, return_attention_scores=True)
    np.testing.assert_array_equal(ops.convert_to_numpy(scores)[1, :, 3], 0.0)
    bias = ops.convert_to_numpy(ours.output_dense.bias)
    np.testing.assert_allclose(ops.convert_to_numpy(output)[1, 3], bias, atol=1e-6)


def test_bad_attention_mask_shape():
    _, ours = pair()
    with pytest.raises(ValueError, match=r"Received: attention_mask.shape=\(2, 5, 4\)"):
        ours(X, V, attention_mask=np.ones((B, T, 4), bool))
    with pytest.raises(ValueError, match=r"\(B, 2, Tq, Tk\)"):
        ours(X, V, attention_mask=np.ones((B, 3, T, S), bool))


# -- the caller's tensors ---------------------------------------------------------------


def test_inputs_keep_their_keras_masks():
    tokens = np.array([[1, 2, 3, 0, 0], [3, 1, 0, 0, 0]])
    masked = layers.Embedding(4, F, mask_zero=True)(tokens)
    layer = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4)
    first = layer(masked, masked)
    second = layer(masked, masked)
    other = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4)
    other(masked, masked)
    other.set_weights(layer.get_weights())
    third = other(masked, masked)
    np.testing.assert_array_equal(ops.convert_to_numpy(masked._keras_mask), tokens != 0)
    explicit = layer(
        ops.convert_to_tensor(ops.convert_to_numpy(masked)),
        attention_mask=(tokens != 0)[:, :, None] & (tokens != 0)[:, None, :],
    )
    for result in (first, second, third):
        np.testing.assert_allclose(
            ops.convert_to_numpy(result), ops.convert_to_numpy(explicit), atol=1e-6
        )


# -- several attention axes -------------------------------------------------------------


@pytest.mark.parametrize("axes", [None, 1, 2, (1, 2), -2])
def test_attention_axes_as_keras(axes):
    images = randn(B, 3, 4, F)
    theirs, ours = pair(query=images, value=images, attention_axes=axes)
    assert_same(theirs, ours, images, images)
    assert ours.attention_axes == theirs.attention_axes


def test_2d_attention_with_a_mask_as_keras():
    images = randn(B, 3, 4, F)
    theirs, ours = pair(query=images, value=images, attention_axes=(1, 2))
    mask = np.random.default_rng(3).random((B, 3, 4, 3, 4)) > 0.3
    mask[..., 0, 0] = True
    assert_same(theirs, ours, images, images, attention_mask=mask)


def test_one_axis_of_several_takes_patterns_and_paths():
    # Attention over axis 1 of (B, T, 3, F): a local window runs per column.
    seq = randn(B, 16, 3, F)
    kwargs = dict(num_heads=2, key_dim=4, attention_axes=1, sliding_window=3)
    dense = keras_attn.MultiHeadAttention(block_sparse=False, **kwargs)
    sparse = keras_attn.MultiHeadAttention(block_sparse=True, block_size=4, **kwargs)
    theirs = layers.MultiHeadAttention(**kwargs)
    for layer in (dense, sparse, theirs):
        layer(seq, seq)
    dense.set_weights(theirs.get_weights())
    sparse.set_weights(theirs.get_weights())
    expected = ops.convert_to_numpy(theirs(seq, seq, use_causal_mask=True))
    for layer, path in ((dense, "dense"), (sparse, "block_sparse")):
        got = ops.convert_to_numpy(layer(seq, seq, use_causal_mask=True))
        assert layer.last_path == path
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_pattern_over_several_axes_is_an_error():
    layer = keras_attn.MultiHeadAttention(
        num_heads=2, key_dim=4, attention_axes=(1, 2), pattern=patterns.Local(2)
    )
    with pytest.raises(ValueError, match="cannot apply to attention over several axes"):
        layer(randn(B, 3, 4, F))
    layer = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2))
    with pytest.raises(ValueError, match="cannot apply to attention over several axes"):
        layer(randn(B, 3, 4, F), use_causal_mask=True)


# -- output_shape, properties, config ---------------------------------------------------


@pytest.mark.parametrize("output_shape", [3, (3,), (2, 3)])
def test_output_shape_as_keras(output_shape):
    theirs, ours = pair(output_shape=output_shape)
    assert_same(theirs, ours, X, V)
    restored = keras_attn.MultiHeadAttention.from_config(theirs.get_config())
    restored(X, V)
    restored.set_weights(theirs.get_weights())
    assert_same(theirs, restored, X, V)


def test_read_only_sublayers_and_resolved_sizes():
    theirs, ours = pair()
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(getattr(ours, name).kernel),
            ops.convert_to_numpy(getattr(theirs, name).kernel),
        )
        with pytest.raises(AttributeError):
            setattr(ours, name, None)
    assert (ours.key_dim, ours.value_dim, ours.attention_axes) == (4, 4, (1,))
    # (Keras's own layer fails on JAX with value_dim != key_dim; keras_attn's does not.)
    narrow = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, value_dim=3)
    assert narrow(X, V).shape == X.shape and narrow.value_dim == 3
    engine = keras_attn.Attention(num_heads=2)
    assert engine.key_dim is None
    engine(X)
    assert (engine.key_dim, engine.value_dim, engine.attention_axes) == (4, 4, (1,))
    assert engine.get_config()["key_dim"] is None


def test_flash_attention_argument_checks():
    with pytest.raises(ValueError, match="Dropout is not supported when flash attention"):
        keras_attn.MultiHeadAttention(num_heads=2, key_dim=2, flash_attention=True, dropout=0.1)
    layer = keras_attn.MultiHeadAttention(num_heads=2, key_dim=2, flash_attention=True)
    with pytest.raises(ValueError, match="Returning attention scores is not supported"):
        layer(X, V, return_attention_scores=True)


# -- the override contract --------------------------------------------------------------


def test_compute_attention_reads_a_3d_mask_per_batch_not_per_head():
    # Batch 2 and 2 heads: a (B, Tq, Tk) mask read as (H, Tq, Tk) would mix rows.
    theirs, ours = pair()
    q, k, v = randn(B, T, 2, 4, seed=4), randn(B, S, 2, 4, seed=5), randn(B, S, 2, 4, seed=6)
    mask = KEEP
    expected = theirs._compute_attention(q, k, v, mask, return_attention_scores=True)
    got = ours._compute_attention(q, k, v, mask, return_attention_scores=True)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(ops.convert_to_numpy(g), ops.convert_to_numpy(e), atol=1e-5)


def keras_and_ours(make):
    """The same subclass body on Keras's class and on keras_attn's."""
    return make(layers.MultiHeadAttention), make(keras_attn.MultiHeadAttention)


def test_overridden_compute_attention_gets_keras_arguments():
    seen = {}

    def make(base):
        class Recording(base):
            def _compute_attention(
                self, query, key, value, attention_mask=None, training=None,
                return_attention_scores=False,
            ):  # fmt: skip
                seen[base] = ops.convert_to_numpy(attention_mask)
                return super()._compute_attention(
                    query, key, value, attention_mask, training, return_attention_scores
                )

        return Recording(num_heads=2, key_dim=4)

    theirs, ours = keras_and_ours(make)
    theirs(X, X)
    ours(X, X)
    ours.set_weights(theirs.get_weights())
    mask = KEEP[:, :, :T]
    assert_same(theirs, ours, X, X, attention_mask=mask, use_causal_mask=True)
    causal = np.tril(np.ones((T, T), bool))
    np.testing.assert_array_equal(seen[keras_attn.MultiHeadAttention], mask & causal)
    np.testing.assert_array_equal(
        np.broadcast_to(seen[keras_attn.MultiHeadAttention], (B, T, T)),
        np.broadcast_to(seen[layers.MultiHeadAttention], (B, T, T)),
    )


def test_overridden_masked_softmax_is_used():
    def make(base):
        class Tempered(base):
            def _masked_softmax(self, attention_scores, attention_mask=None):
                return super()._masked_softmax(attention_scores * 3.0, attention_mask)

        return Tempered(num_heads=2, key_dim=4)

    theirs, ours = keras_and_ours(make)
    theirs(X, V)
    ours(X, V)
    ours.set_weights(theirs.get_weights())
    assert_same(theirs, ours, X, V, attention_mask=KEEP)
    plain = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4)
    plain(X, V)
    plain.set_weights(theirs.get_weights())
    assert not np.allclose(ops.convert_to_numpy(plain(X, V)), ops.convert_to_numpy(ours(X, V)))


def test_overridden_build_with_keras_helpers():
    seen = {}

    def make(base):
        class NoQueryBias(base):
            def build(self, query_shape, value_shape, key_shape=None):
                super().build(query_shape, value_shape, key_shape)
                self._query_dense = layers.EinsumDense(
                    "abc,cde->abde",
                    output_shape=(None, 2, 4),
                    name="query",
                    **self._get_common_kwargs_for_sublayer(),
                )
                self._query_dense.build(query_shape)

            def _build_attention(self, rank):
                seen[base] = rank
                super()._build_attention(rank)

        return NoQueryBias(num_heads=2, key_dim=4)

    theirs, ours = keras_and_ours(make)
    theirs(X, V)
    ours(X, V)
    assert seen[keras_attn.MultiHeadAttention] == seen[layers.MultiHeadAttention] == 4
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    ours.set_weights(theirs.get_weights())
    assert_same(theirs, ours, X, V, attention_mask=KEEP)


def test_subclass_without_overrides_keeps_keras_attn_extras():
    class Plain(keras_attn.MultiHeadAttention):
        pass

    assert_decodes_like_one_pass(Plain(num_heads=2, key_dim=4, sliding_window=2), X)


def test_overriding_subclass_decodes_with_a_cache():
    # The mask an override gets holds the pattern at the cache's absolute positions.
    class PassThrough(keras_attn.MultiHeadAttention):
        def _compute_attention(
            self, query, key, value, attention_mask=None, training=None,
            return_attention_scores=False,
        ):  # fmt: skip
            return super()._compute_attention(
                query, key, value, attention_mask, training, return_attention_scores
            )

    layer = PassThrough(num_heads=2, key_dim=4, sliding_window=2)
    plain = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, sliding_window=2)
    plain(X)
    layer(X)
    layer.set_weights(plain.get_weights())
    assert_decodes_like_one_pass(layer, X, reference=plain)


# -- grouped key/value heads ------------------------------------------------------------


def gqa_pair(**kwargs):
    theirs = layers.GroupQueryAttention(
        head_dim=4, num_query_heads=4, num_key_value_heads=2, **kwargs
    )
    ours = keras_attn.GroupedQueryAttention(
        head_dim=4, num_query_heads=4, num_key_value_heads=2, **kwargs
    )
    theirs(X, V)
    ours(X, V)
    ours.set_weights(theirs.get_weights())
    return theirs, ours


@pytest.mark.parametrize("kwargs", [{}, dict(use_gate=True), dict(use_bias=False)])
def test_grouped_query_attention_as_keras(kwargs):
    theirs, ours = gqa_pair(**kwargs)
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    assert_same(theirs, ours, X, V, attention_mask=KEEP)
    assert_same(theirs, ours, X, X, use_causal_mask=True)


def test_grouped_query_attention_config_round_trip():
    theirs, _ = gqa_pair(sliding_window=3)
    restored = keras_attn.GroupedQueryAttention.from_config(theirs.get_config())
    restored(X, X)
    restored.set_weights(theirs.get_weights())
    assert_same(theirs, restored, X, X, use_causal_mask=True)


def repeated_heads_reference(layer, query, value, layer_kwargs, **call_kwargs):
    """The same attention with every key/value head repeated into a full MHA."""
    full = keras_attn.Attention(num_heads=layer.num_heads, key_dim=layer.key_dim, **layer_kwargs)
    full(query, value)
    repeats = layer.num_heads // layer.num_key_value_heads
    weights = []
    for w, ref in zip(layer.get_weights(), full.get_weights(), strict=True):
        if w.shape != ref.shape:  # a key/value kernel (F, Hkv, D) or bias (Hkv, D)
            w = np.repeat(w, repeats, axis=-2)
        weights.append(w)
    full.set_weights(weights)
    return ops.convert_to_numpy(full(query, value, **call_kwargs))


@pytest.mark.parametrize(
    "kwargs, path",
    [
        ({}, "fused"),
        (dict(normalizer="sparsemax"), "dense"),
        (dict(pattern=patterns.Local(3), block_sparse=True, block_size=4), "block_sparse"),
    ],
)
def test_num_key_value_heads_on_every_path(kwargs, path):
    seq = randn(B, 16, F)
    layer = keras_attn.Attention(num_heads=4, num_key_value_heads=2, key_dim=4, **kwargs)
    got = ops.convert_to_numpy(layer(seq, use_causal_mask=True))
    assert layer.last_path == path
    assert layer.key_dense.kernel.shape == (F, 2, 4)
    expected = repeated_heads_reference(layer, seq, seq, kwargs, use_causal_mask=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_num_key_value_heads_cache_holds_only_key_value_heads():
    layer = keras_attn.Attention(num_heads=4, num_key_value_heads=2, key_dim=4)
    _, cache = assert_decodes_like_one_pass(layer, X)
    assert layer.cache_shape(B, T) == cache.shape == (B, 2, T, 2, 4)


def test_num_key_value_heads_must_divide_num_heads():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        keras_attn.Attention(num_heads=4, num_key_value_heads=3)


def test_grouped_query_attention_is_registered_and_exported():
    from keras_attn import plugins

    assert plugins.get("layer", "grouped_query") is keras_attn.GroupedQueryAttention
    assert "GroupedQueryAttention" in keras_attn.__all__
    layer = keras_attn.GroupedQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2)
    restored = plugins.resolve("layer", plugins.serialize(layer))
    assert isinstance(restored, keras_attn.GroupedQueryAttention)
    assert restored.num_key_value_heads == 2


@pytest.mark.parametrize("unset", [0, (), []])
def test_zero_or_empty_output_shape_means_unset_as_in_keras(unset):
    # Keras's layer reads a falsy `output_shape` as "the query's feature size".
    theirs, ours = pair(output_shape=unset)
    assert tuple(ours(X, V).shape) == (B, T, F)
    assert_same(theirs, ours, X, V)
