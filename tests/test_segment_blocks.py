"""Packed sequences on the block-sparse path: blocks whose segments never meet are skipped."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn import segments
from keras_attn.positions import make_positions
from keras_attn.testing import value_and_grads

T, BS = 32, 4
# Two packed rows: documents of 5, 9, 3, 15 tokens, and of 12, 12, 8.
IDS = np.array(
    [[0] * 5 + [1] * 9 + [2] * 3 + [3] * 15, [4] * 12 + [5] * 12 + [6] * 8], "int32"
)  # (2, 32)
PATTERNS = {
    "causal": "causal",
    "local": {"name": "local", "config": {"window": 10}},
    "local_global": keras_attn.patterns.Local(6) | keras_attn.patterns.GlobalTokens(2),
}


def _np(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")))


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _pair(pattern, **kwargs):
    """A block-sparse layer and a dense one with the same weights."""
    sparse = keras_attn.Attention(
        num_heads=2, key_dim=4, pattern=pattern, block_sparse=True, block_size=BS, **kwargs
    )
    dense = keras_attn.Attention(num_heads=2, key_dim=4, pattern=pattern, block_sparse=False)
    sparse.build((2, T, 8))
    dense.build((2, T, 8))
    dense.set_weights(sparse.get_weights())
    return sparse, dense


def ref_attention(layer, x, ids):
    """The layer in numpy: weights over the keys of the query's segment the pattern allows."""
    wq, bq, wk, bk, wv, bv, wo, bo = [np.asarray(w, "float64") for w in layer.get_weights()[:8]]
    x = x.astype("float64")
    q = np.einsum("btc,chd->bhtd", x, wq) + bq[None, :, None, :]
    k = np.einsum("btc,chd->bhtd", x, wk) + bk[None, :, None, :]
    v = np.einsum("btc,chd->bhtd", x, wv) + bv[None, :, None, :]
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.asarray(ops.convert_to_numpy(layer.pattern.mask(make_positions(T, T, 1))))
    mask = (ids[:, :, None] == ids[:, None, :])[:, None] & allowed.reshape(1, 1, T, T)
    top = np.max(np.where(mask, logits, -1e30), -1, keepdims=True)
    weights = np.where(mask, np.exp(logits - top), 0.0)
    weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-30)
    out = np.einsum("bhqk,bhkd->bqhd", weights, v)
    return np.einsum("bqhd,hde->bqe", out, wo) + bo, weights


# -- exact, and fewer blocks -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_packed_rows_equal_dense_and_numpy(name):
    sparse, dense = _pair(PATTERNS[name])
    x = _x((2, T, 8), 1)
    out, w = sparse(x, segment_ids=IDS, return_attention_scores=True)
    assert sparse.last_path == "block_sparse"
    assert sparse.last_plan.segment_layout is not None
    out_dense, w_dense = dense(x, segment_ids=IDS, return_attention_scores=True)
    expected, expected_w = ref_attention(sparse, x, IDS)
    np.testing.assert_allclose(_np(out), _np(out_dense), atol=1e-5)
    np.testing.assert_allclose(_np(w), _np(w_dense), atol=1e-6)
    np.testing.assert_allclose(_np(out), expected, atol=1e-4)
    np.testing.assert_allclose(_np(w), expected_w, atol=1e-5)
    # Without the weights (the hand-written softmax gradient's path on TF and JAX).
    np.testing.assert_allclose(_np(sparse(x, segment_ids=IDS)), expected, atol=1e-4)


# Blocks computed per batch row (padding included), with and without the segments, of
# the 8 x 8 = 64 blocks of the dense score matrix.
COMPUTED = {"causal": (25, 43), "local": (36, 48), "local_global": (31, 50)}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_concrete_ids_compute_fewer_blocks(name):
    sparse, _ = _pair(PATTERNS[name])
    sparse(_x((2, T, 8)), segment_ids=IDS)
    plan = sparse.last_plan
    assert plan.segment_layout.from_data
    computed = (plan.segment_layout.computed_blocks, plan.layout.computed_blocks)
    assert computed == COMPUTED[name]
    # The widest row: the 15-token document spans 5 blocks of 4.
    assert max(plan.segment_layout.widths) <= 5


def test_block_meets_is_exact_for_packed_ids():
    meets = np.asarray(ops.convert_to_numpy(segments.block_meets(IDS, IDS, BS)))  # (2, 8, 8)
    # Brute force: the blocks share an id.
    blocks = IDS.reshape(2, T // BS, BS)
    shares = np.array(
        [[[bool(set(q) & set(k)) for k in row] for q in row] for row in blocks]
    )  # (2, 8, 8)
    np.testing.assert_array_equal(meets, shares)


def test_non_monotone_ids_stay_exact():
    ids = np.tile(np.array([0, 1], "int32"), (2, T // 2))  # [0, 1, 0, 1, ...]
    ids[1, 16:] = 7  # and a second row whose end is one document
    for pattern in PATTERNS.values():
        sparse, dense = _pair(pattern)
        x = _x((2, T, 8), 2)
        out, w = sparse(x, segment_ids=ids, return_attention_scores=True)
        out_dense, w_dense = dense(x, segment_ids=ids, return_attention_scores=True)
        np.testing.assert_allclose(_np(out), _np(out_dense), atol=1e-5)
        np.testing.assert_allclose(_np(w), _np(w_dense), atol=1e-6)
        np.testing.assert_allclose(_np(out), ref_attention(sparse, x, ids)[0], atol=1e-4)


def test_with_padding_reset_positions_and_score_mods():
    pattern = PATTERNS["local"]
    options = dict(position_encoding="rope", reset_positions=True, score_mods=["softcap"])
    sparse, dense = _pair(pattern, **options)
    dense = keras_attn.Attention(
        num_heads=2, key_dim=4, pattern=pattern, block_sparse=False, **options
    )
    dense.build((2, T, 8))
    dense.set_weights(sparse.get_weights())
    x = _x((2, T, 8), 3)
    valid = np.arange(T)[None] < np.array([[T], [27]])  # (2, T): padding at the end of row 1
    mask = np.where(valid[:, :, None], valid[:, None, :], False)
    kwargs = dict(segment_ids=IDS, query_mask=valid, value_mask=valid, attention_mask=mask)
    out, w = sparse(x, return_attention_scores=True, **kwargs)
    out_dense, w_dense = dense(x, return_attention_scores=True, **kwargs)
    assert sparse.last_plan.segment_layout is not None
    np.testing.assert_allclose(_np(out), _np(out_dense), atol=1e-5)
    np.testing.assert_allclose(_np(w), _np(w_dense), atol=1e-6)


def test_gradients_equal_the_dense_path():
    sparse, dense = _pair(PATTERNS["causal"])
    x = _x((2, T, 8), 4)
    weights = _x((2, T, 8), 5)

    def loss(layer):
        return lambda inputs: ops.sum(ops.multiply(layer(inputs, segment_ids=IDS), weights))

    value, grads = value_and_grads(loss(sparse), x, variables=sparse.trainable_variables)
    value_dense, grads_dense = value_and_grads(loss(dense), x, variables=dense.trainable_variables)
    np.testing.assert_allclose(value, value_dense, rtol=1e-5)
    for g, g_dense in zip(grads, grads_dense, strict=True):
        np.testing.assert_allclose(g, g_dense, atol=1e-4)


# -- traced: static widths ---------------------------------------------------------------


def _compiled(fn):
    """`fn` traced and compiled by the backend (XLA on JAX and TensorFlow)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    pytest.skip("PyTorch calls run eagerly: the ids are always concrete there")


@pytest.mark.parametrize("bound", [None, 15])
def test_traced_runs_compiled_and_exact(bound):
    sparse, dense = _pair(PATTERNS["local"], max_segment_length=bound)
    x = _x((2, T, 8), 6)
    out = _compiled(lambda x, ids: sparse(x, segment_ids=ids))(x, IDS)
    segment_layout = sparse.last_plan.segment_layout
    assert not segment_layout.from_data
    full = tuple(g.cols.shape[1] for g in segment_layout.layout.groups)
    if bound is None:
        assert segment_layout.widths == full  # the pattern's own width: correct, no saving
    else:
        # 1 + 2 * ceil(14 / 4) = 9 is no narrower than the local window's 6 blocks...
        assert segment_layout.widths == tuple(min(w, 9) for w in full)
    np.testing.assert_allclose(_np(out), _np(dense(x, segment_ids=IDS)), atol=1e-5)


def test_traced_with_a_bound_computes_fewer_blocks_and_stays_exact():
    ids = np.repeat(np.arange(8, dtype="int32"), 4)[None].repeat(2, 0)  # documents of 4
    sparse, dense = _pair("causal", max_segment_length=4)
    x = _x((2, T, 8), 7)
    out = _compiled(lambda x, ids: sparse(x, segment_ids=ids))(x, ids)
    segment_layout = sparse.last_plan.segment_layout
    assert max(segment_layout.widths) == 3  # 1 + 2 * ceil(3 / 4)
    assert segment_layout.computed_blocks < segment_layout.layout.computed_blocks
    np.testing.assert_allclose(_np(out), _np(dense(x, segment_ids=ids)), atol=1e-5)


def test_segments_longer_than_the_bound():
    sparse, dense = _pair("causal", max_segment_length=4)
    x = _x((2, T, 8), 8)
    # Eager: a clear error naming the argument, the longest segment and the bound.
    with pytest.raises(ValueError, match=r"max_segment_length.*segment of 15 tokens.*=4"):
        sparse(x, segment_ids=IDS)
    if keras.backend.backend() == "torch":
        return
    # Traced: it cannot raise; the rows of query blocks that need more blocks are NaN.
    out = _np(_compiled(lambda x, ids: sparse(x, segment_ids=ids))(x, IDS))
    expected = _np(dense(x, segment_ids=IDS))
    nan_rows = np.isnan(out).any(axis=-1)  # (2, T)
    assert nan_rows.any()
    np.testing.assert_allclose(out[~nan_rows], expected[~nan_rows], atol=1e-5)
    # Every query of a row that would need more than 3 blocks: a whole block of queries.
    assert nan_rows.reshape(2, T // BS, BS).all(-1).sum() == nan_rows.sum() // BS


def test_max_segment_length_is_validated_and_serialized():
    with pytest.raises(ValueError, match=r"max_segment_length.*Received: max_segment_length=0"):
        keras_attn.Attention(num_heads=2, max_segment_length=0)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, max_segment_length=64)
    config = layer.get_config()
    assert config["max_segment_length"] == 64
    assert keras_attn.Attention.from_config(config).max_segment_length == 64


# -- no attention across documents -------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=2, max_size=5),
    which=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_other_documents_change_nothing(lengths, which, seed):
    ids = np.repeat(np.arange(len(lengths)), lengths)
    ids = np.concatenate([ids, np.full(T, len(lengths))])[:T][None].astype("int32")  # (1, T)
    which = which % len(lengths)
    mine = ids[0] == which
    layer = keras_attn.Attention(
        num_heads=2, key_dim=4, pattern=PATTERNS["local"], block_sparse=True, block_size=BS
    )
    x = _x((1, T, 8), seed)
    changed = np.where(mine[None, :, None], x, _x((1, T, 8), seed + 1))
    out = _np(layer(x, segment_ids=ids))
    out_changed = _np(layer(changed, segment_ids=ids))
    assert layer.last_plan.segment_layout is not None
    np.testing.assert_allclose(out_changed[0, mine], out[0, mine], atol=1e-5)


@pytest.mark.parametrize("pattern", ["full", "causal"])
def test_auto_mode_takes_the_block_sparse_path_when_packing_skips_enough(pattern, monkeypatch):
    # Many short documents: few blocks meet, so even a full or causal pattern skips
    # most of the score matrix on the block-sparse path (as on a CPU, where the fused
    # kernel computes every score); one document per row: nothing more to skip.
    from keras_attn import devices

    cpu = devices.Machine(keras.backend.backend(), "cpu")
    monkeypatch.setattr(devices, "_assumed", [cpu])  # plans as on a CPU, wherever it runs
    ids = np.repeat(np.arange(16), 4)[None].repeat(2, axis=0).astype("int32")  # (2, 64)
    x = _x((2, 64, 8), 3)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, pattern=pattern, block_size=8)
    out = layer(x, segment_ids=ids)
    assert layer.last_path == "block_sparse"
    assert layer.last_plan.segment_layout.computed_fraction <= 0.7
    dense = keras_attn.Attention(num_heads=2, key_dim=4, pattern=pattern, block_sparse=False)
    dense.build((2, 64, 8))
    dense.set_weights(layer.get_weights())
    np.testing.assert_allclose(_np(out), _np(dense(x, segment_ids=ids)), atol=1e-5)
    layer(x, segment_ids=np.zeros((2, 64), "int32"))
    # (causal alone already skips enough blocks on a CPU: 36 of 64)
    assert layer.last_path == ("block_sparse" if pattern == "causal" else "fused")


# -- ids as people write them (found in review) ------------------------------------------


def _brute_force_meets(query_ids, key_ids, bs):
    qb = query_ids.reshape(len(query_ids), -1, bs)
    kb = key_ids.reshape(len(key_ids), -1, bs)
    return np.array(
        [[[bool(set(q) & set(k)) for k in kr] for q in qr] for qr, kr in zip(qb, kb, strict=True)]
    )


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    padding=st.integers(0, 8),
    first=st.integers(0, 3),
    pad_id=st.integers(-1, 0),
)
def test_block_meets_never_drops_a_shared_id_and_is_exact_for_trailing_padding(
    lengths, padding, first, pad_id
):
    # Documents first, first + 1, ... then padding with id 0 or -1 (the T5X/seqio
    # habit), cut to 32 tokens: the ordering of `block_meets` makes that row ordered.
    ids = np.concatenate([np.full(n, first + i) for i, n in enumerate(lengths)])
    ids = np.concatenate([ids, np.full(padding, pad_id)])
    ids = np.resize(ids, 32).astype("int32")[None]
    meets = np.asarray(ops.convert_to_numpy(segments.block_meets(ids, ids, BS)))
    shares = _brute_force_meets(ids, ids, BS)
    assert not np.any(shares & ~meets)  # never drops a pair of blocks sharing an id
    if ids[0, -1] < ids[0, 0] or np.all(np.diff(ids[0]) >= 0):
        np.testing.assert_array_equal(meets, shares)


def test_trailing_padding_with_id_zero_under_a_bound_is_exact_not_nan():
    # Documents 1..7 then padding 0: under jit with a bound, the last block (ids 7 and
    # 0) once "met" every earlier block, overflowed the bound and came out NaN.
    ids = np.array([[1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4 + [6] * 4 + [7] * 5 + [0] * 3]
                   * 2, "int32")  # fmt: skip
    sparse, dense = _pair("causal", max_segment_length=5)
    x = _x((2, T, 8), 9)
    out = _np(_compiled(lambda x, ids: sparse(x, segment_ids=ids))(x, ids))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, _np(dense(x, segment_ids=ids)), atol=1e-5)


def test_64_bit_ids_that_differ_by_2_to_the_32_stay_apart():
    if keras.backend.backend() == "jax":
        pytest.skip("JAX without x64 holds ids as 32-bit integers on every path")
    ids = np.array([[0] * 16 + [2**32] * 16] * 2, "int64")
    sparse, dense = _pair("causal")
    x = _x((2, T, 8), 10)
    out = sparse(x, segment_ids=ids)
    np.testing.assert_allclose(_np(out), _np(dense(x, segment_ids=ids)), atol=1e-5)
    np.testing.assert_allclose(_np(out)[:, 16:], _np(sparse(x[:, 16:]))[:, :], atol=1e-5)


def test_cross_attention_ignores_the_bound_which_speaks_of_one_stream():
    # Query block 0 holds 8 one-token documents whose keys fill 8 key blocks of 4: no
    # segment is longer than the bound, and nothing may come out NaN.
    query_ids = np.repeat(np.arange(8), 4)[None].repeat(2, 0).astype("int32")  # (2, 32)
    query_ids[:, :8] = np.arange(8)
    key_ids = np.repeat(np.arange(8), 4)[None].repeat(2, 0).astype("int32")
    sparse, dense = _pair("full", max_segment_length=4)
    x = _x((2, T, 8), 11)

    def call(layer, x, q, k):
        return layer(x, x, query_segment_ids=q, key_segment_ids=k)

    out = _np(_compiled(lambda x, q, k: call(sparse, x, q, k))(x, query_ids, key_ids))
    assert sparse.last_path == "block_sparse"
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, _np(call(dense, x, query_ids, key_ids)), atol=1e-5)


def test_a_cache_with_a_bound_checks_only_the_new_tokens():
    # Unfilled cache slots share one id in a long run: not a segment longer than the
    # bound (eagerly, no false error), and the decode step equals the dense path's.
    sparse, dense = _pair("causal", max_segment_length=8)
    x = _x((1, 1, 8), 12)
    key_ids = np.array([[1] * 6 + [9] * (T - 6)], "int32")  # 6 written, the rest unfilled
    ids = {"query_segment_ids": np.array([[1]], "int32"), "key_segment_ids": key_ids}
    cache = np.zeros((1, 2, T, 2, 4), "float32")
    out, _ = sparse(x, x, cache=cache, cache_update_index=5, **ids)
    assert sparse.last_path == "block_sparse"
    out_dense, _ = dense(x, x, cache=cache, cache_update_index=5, **ids)
    np.testing.assert_allclose(_np(out), _np(out_dense), atol=1e-5)
    # In numpy: slots 0..4 hold zero keys (logit 0) and zero values, slot 5 the token.
    wq, bq, wk, bk, wv, bv, wo, bo = [np.asarray(w, "float64") for w in sparse.get_weights()[:8]]
    q = np.einsum("c,chd->hd", x[0, 0], wq) + bq
    k = np.einsum("c,chd->hd", x[0, 0], wk) + bk
    v = np.einsum("c,chd->hd", x[0, 0], wv) + bv
    own = np.exp(np.sum(q * k, -1) / 2.0)  # (H,): the weight of slot 5, before normalizing
    heads = (own / (5.0 + own))[:, None] * v  # (H, D)
    expected = np.einsum("hd,hde->e", heads, wo) + bo
    np.testing.assert_allclose(_np(out)[0, 0], expected, atol=1e-5)
