"""Tests of keras_attn.masks, the one owner of a call's data mask, and of what reaches it.

Padding masks of inputs of every rank and attention axes (against Keras's own layer
and numpy), the checks that name the argument, the cache index of every integer
kind, and a cache read without an index (KerasHub's cross-attention convention).
"""

import warnings

import numpy as np
import pytest
from keras import layers
from keras import ops

import keras_attn
from keras_attn import masks
from keras_attn import patterns


def randn(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _np(x):
    return ops.convert_to_numpy(x)


# -- the module's functions ----------------------------------------------------------------


def test_heads_mask_never_reads_a_batch_axis_as_heads():
    m = np.array([[[True, False], [True, True]]] * 3)  # (B=3, Tq, Tk)
    assert tuple(masks.heads_mask(m).shape) == (3, 1, 2, 2)
    np.testing.assert_array_equal(_np(masks.heads_mask(m))[:, 0], m)
    assert tuple(masks.heads_mask(m[0]).shape) == (1, 1, 2, 2)
    per_head = np.zeros((3, 4, 2, 2), bool)
    np.testing.assert_array_equal(_np(masks.heads_mask(per_head)), per_head)
    assert masks.heads_mask(None) is None
    np.testing.assert_array_equal(_np(masks.keras_form(masks.heads_mask(m))), m)


def test_call_mask_combines_padding_explicit_and_cache_masks():
    q = np.array([[True, True, False]])
    v = np.array([[True, False, True, True]])
    explicit = np.tril(np.ones((3, 4), bool))
    written = np.array([True, True, True, False])[None, None, None]
    got = _np(masks.call_mask(masks.Padding(q, v), explicit, written))
    want = q[:, :, None] & v[:, None, :] & explicit[None] & written[0]
    np.testing.assert_array_equal(got[:, 0], want)
    assert masks.call_mask(masks.Padding(), None) is None


@pytest.mark.parametrize("axes", [(1,), (2,), (1, 2)])
def test_padding_of_high_rank_inputs_in_the_layout_of_keras_scores(axes):
    rng = np.random.default_rng(0)
    q = rng.random((2, 3, 4)) > 0.3  # (B, A1, A2)
    v = rng.random((2, 3, 4)) > 0.3
    got = _np(masks.Padding(q, v).scores_mask(axes))
    others = [a for a in (1, 2) if a not in axes]
    b, a1, a2 = q.shape
    # Brute force: scores (B, *others, *query axes, *key axes).
    want = np.zeros(got.shape, bool)
    for idx in np.ndindex(*want.shape):
        batch, rest = idx[0], idx[1:]
        other = dict(zip(others, rest[: len(others)], strict=True))
        qa = dict(zip(axes, rest[len(others) : len(others) + len(axes)], strict=True))
        ka = dict(zip(axes, rest[len(others) + len(axes) :], strict=True))
        qi = tuple({**other, **qa}[a] for a in (1, 2))
        ki = tuple({**other, **ka}[a] for a in (1, 2))
        want[idx] = q[(batch, *qi)] and v[(batch, *ki)]
    np.testing.assert_array_equal(got, want)
    if axes == (2,):  # Keras's own construction for one trailing axis
        np.testing.assert_array_equal(got, q[..., :, None] & v[..., None, :])
    assert (a1, a2) == (3, 4)


def test_check_attention_mask_names_the_shape():
    masks.check_attention_mask(np.ones((2, 1, 5, 6)), 5, 6, num_heads=3)
    with pytest.raises(ValueError, match=r"attention_mask.shape=\(2, 5, 7\)"):
        masks.check_attention_mask(np.ones((2, 5, 7)), 5, 6)
    with pytest.raises(ValueError, match=r"\(B, 3, Tq, Tk\)"):
        masks.check_attention_mask(np.ones((2, 2, 5, 6)), 5, 6, num_heads=3)


# -- 4-D inputs with Keras masks, against Keras -----------------------------------------------


@pytest.mark.parametrize("attention_axes", [(2,), (-2,)])
def test_keras_masks_of_4d_inputs_give_keras_numbers(attention_axes):
    tokens = np.array([[[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]] * 2, "int32")  # (B, rows, T)
    tokens[1, 0] = [3, 0, 0, 0]
    embed = layers.Embedding(10, 8, mask_zero=True)
    theirs = layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=attention_axes)
    ours = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=attention_axes)
    theirs(embed(tokens), embed(tokens))
    ours(embed(tokens), embed(tokens))
    ours.set_weights(theirs.get_weights())
    # A fresh embedding each call: Keras's layer removes the Keras masks of its inputs.
    x = embed(tokens)  # (B, rows, T, 8), Keras mask (B, rows, T)
    got, got_w = ours(x, x, return_attention_scores=True)
    assert masks.get_keras_mask(x) is not None  # keras_attn keeps the caller's masks
    want, want_w = theirs(x, x, return_attention_scores=True)
    _assert_same_on_real_queries(tokens != 0, (got, got_w), (want, want_w))


def _assert_same_on_real_queries(real, got, want):
    """Outputs and weights equal where the query is real; padded queries get zero weights.

    (Keras spreads the weights of a query row with no allowed key uniformly.)
    """
    (out, w), (want_out, want_w) = ([_np(t) for t in pair] for pair in (got, want))
    np.testing.assert_allclose(out[real], want_out[real], atol=1e-5)
    w, want_w = w.swapaxes(2, 3), want_w.swapaxes(2, 3)  # (B, rows, Tq, H, Tk)
    np.testing.assert_allclose(w[real], want_w[real], atol=1e-5)
    assert np.all(w[~real] == 0)
    assert not np.all(want_w[real] == 0)


def test_keras_masks_of_4d_inputs_over_the_middle_axis_match_numpy():
    # Attention over axis 1 of (B, T, C, dim): keys padded along T, per column C.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 8)).astype("float32")
    keep = rng.random((2, 5, 3)) > 0.3
    keep[:, 0] = True  # every column keeps a key
    layer = keras_attn.MultiHeadAttention(num_heads=1, key_dim=8, attention_axes=(1,))
    layer(x, x)
    out, w = layer(x, x, value_mask=keep, return_attention_scores=True)  # w (B, C, H, T, T)
    wq, wk, wv = (layer.get_weights()[i] for i in (0, 2, 4))
    bq, bk, bv = (layer.get_weights()[i] for i in (1, 3, 5))
    q = np.einsum("btcf,fhd->bcthd", x, wq) + bq
    k = np.einsum("btcf,fhd->bcthd", x, wk) + bk
    logits = np.einsum("bcqhd,bckhd->bchqk", q, k) / np.sqrt(8)
    allowed = keep.transpose(0, 2, 1)[:, :, None, None, :]  # (B, C, 1, 1, Tk)
    logits = np.where(allowed, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(_np(w), e / e.sum(-1, keepdims=True), atol=1e-5)
    assert wv.shape == (8, 1, 8) and bv.shape == (1, 8)
    assert tuple(out.shape) == (2, 5, 3, 8)


def test_padding_masks_and_attention_mask_on_4d_inputs_combine():
    x = randn(2, 3, 4, 8)
    keep = np.ones((2, 3, 4), bool)
    keep[0, 1, 3] = False
    explicit = np.tril(np.ones((4, 4), bool))[None, None]  # (1, 1, T, T)
    theirs = layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(2,))
    ours = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(2,))
    theirs(x, x)
    ours(x, x)
    ours.set_weights(theirs.get_weights())
    kwargs = dict(query_mask=keep, value_mask=keep, attention_mask=explicit)
    want = theirs(x, x, return_attention_scores=True, **kwargs)
    got = ours(x, x, return_attention_scores=True, **kwargs)
    _assert_same_on_real_queries(keep, got, want)


# -- shape errors name the argument ----------------------------------------------------------


@pytest.mark.parametrize("name", ["query_mask", "value_mask", "key_mask"])
def test_a_wrong_length_padding_mask_names_its_argument(name):
    layer = keras_attn.Attention(num_heads=2)
    x, c = randn(2, 5, 8), randn(2, 6, 8)
    with pytest.raises(ValueError, match=rf"`{name}` must have .*\(2, \d\).*{name}.shape=\(2, 3\)"):
        layer(x, c, **{name: np.ones((2, 3), bool)})


def test_a_cache_with_4d_inputs_is_refused_clearly():
    layer = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(2,))
    x = randn(1, 2, 3, 8)
    layer(x, x)
    with pytest.raises(ValueError, match="A cache needs"):
        layer(x, x, cache=np.zeros((1, 2, 3, 2, 4), "float32"), cache_update_index=0)


# -- cache indices of every integer kind, on every path -------------------------------------


def _index_kinds():
    kinds = {
        "int": lambda i: i,
        "np.int64": lambda i: np.int64(i),
        "np.int32": lambda i: np.int32(i),
        "0-d array": lambda i: np.array(i),
        "eager tensor": lambda i: ops.convert_to_tensor(i, "int32"),
    }
    return kinds


@pytest.mark.parametrize("kind", list(_index_kinds()))
@pytest.mark.parametrize(
    "make",
    [
        dict(pattern=patterns.Local(4, causal=True), block_sparse=True, block_size=4),
        dict(pattern=patterns.Local(4, causal=True), block_sparse=False),
        dict(pattern="causal"),
    ],
    ids=["block_sparse", "dense", "fused"],
)
def test_cache_index_of_every_integer_kind(kind, make):
    to_index = _index_kinds()[kind]
    x = randn(2, 12, 8)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, **make)
    layer(x)
    full = _np(layer(x))
    cache = ops.zeros(layer.cache_shape(2, 12))
    outs = []
    for start, stop in [(0, 5), *((i, i + 1) for i in range(5, 12))]:
        out, cache = layer(x[:, start:stop], cache=cache, cache_update_index=to_index(start))
        outs.append(_np(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)
    if make.get("block_sparse") is True:
        assert layer.last_path == "block_sparse"


# -- a cache read without an index --------------------------------------------------------------


def test_a_read_only_cache_is_exact_for_a_full_pattern():
    # KerasHub's cross-attention: keys and values computed once, read at every step.
    q, ctx = randn(2, 4, 8), randn(2, 6, 8, seed=1)
    layer = keras_attn.CrossAttention(num_heads=2, key_dim=4)
    want = _np(layer(q, ctx))
    k = _np(layer.key_dense(ctx))
    v = _np(layer.value_dense(ctx))
    cache = np.stack([k, v], axis=1)  # (B, 2, S, H, D)
    for t in range(4):
        out, same = layer(q[:, t : t + 1], ctx, cache=cache)
        np.testing.assert_allclose(_np(out), want[:, t : t + 1], atol=1e-5)
        np.testing.assert_array_equal(_np(same), cache)  # read, not written


@pytest.mark.parametrize(
    "make, component",
    [
        (dict(pattern=patterns.Local(2)), "pattern 'local'"),
        (dict(score_mods=["relative_position"]), "score_mod 'relative_position'"),
        (dict(position_encoding="rope"), "position_encoding 'rope'"),
    ],
)
def test_a_read_only_cache_refuses_components_that_need_positions(make, component):
    q, ctx = randn(2, 4, 8), randn(2, 6, 8, seed=1)
    layer = keras_attn.CrossAttention(num_heads=2, key_dim=4, **make)
    layer(q, ctx)
    cache = np.zeros((2, 2, 6, 2, 4), "float32")
    with pytest.raises(ValueError, match=f"without `cache_update_index`.*{component}"):
        layer(q[:, :1], ctx, cache=cache)
    with pytest.raises(ValueError, match="cache_update_index"):
        layer(q[:, :1], ctx, cache=cache, use_causal_mask=True)


def test_a_self_attention_cache_without_an_index_warns():
    layer = keras_attn.SelfAttention(num_heads=2, key_dim=4)
    x = randn(1, 3, 8)
    layer(x)
    cache = ops.zeros(layer.cache_shape(1, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x[:, :1], cache=cache)
    assert any("not written" in str(w.message) for w in caught)
