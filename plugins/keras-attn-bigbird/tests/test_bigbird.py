"""keras-attn-bigbird against numpy references written here, element by element."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops
from keras_attn_bigbird import BigBird
from keras_attn_bigbird import Longformer

import keras_attn
from keras_attn.positions import Positions


def positions(query_length, key_length, query_offset=0):
    q = np.arange(query_offset, query_offset + query_length, dtype="int32")
    k = np.arange(key_length, dtype="int32")
    return Positions(
        q.reshape(1, 1, -1, 1), k.reshape(1, 1, 1, -1), np.zeros((1, 1, 1, 1), "int32")
    )


def mask_of(pattern, query_length, key_length, query_offset=0):
    m = ops.convert_to_numpy(pattern.mask(positions(query_length, key_length, query_offset)))
    return np.broadcast_to(m, (1, 1, query_length, key_length))[0, 0]


def longformer_reference(window, global_positions, causal, query_length, key_length, offset=0):
    out = np.zeros((query_length, key_length), bool)
    for r in range(query_length):
        i = r + offset
        for j in range(key_length):
            allowed = abs(i - j) < window or i in global_positions or j in global_positions
            out[r, j] = allowed and (j <= i or not causal)
    return out


def bigbird_reference(pattern, query_length, key_length, offset=0):
    bs, w = pattern.block_size, pattern.num_window_blocks // 2
    g = pattern.num_global_blocks
    out = np.zeros((query_length, key_length), bool)
    for r in range(query_length):
        i = r + offset
        a = i // bs
        random = set(pattern.random_blocks(1, a)[0].tolist())
        for j in range(key_length):
            b = j // bs
            allowed = abs(a - b) <= w or a < g or b < g or b in random
            out[r, j] = allowed and (j <= i or not pattern.causal)
    return out


def block_reduce(mask, block_size):
    tq, tk = mask.shape
    n_q, n_k = -(-tq // block_size), -(-tk // block_size)
    padded = np.zeros((n_q * block_size, n_k * block_size), bool)
    padded[:tq, :tk] = mask
    return padded.reshape(n_q, block_size, n_k, block_size).any(axis=(1, 3))


def test_registered_by_its_entry_point():
    for name, cls in (("longformer", Longformer), ("bigbird", BigBird)):
        entry = keras_attn.plugins.get_entry("pattern", name)
        assert entry.cls is cls
        assert (entry.distribution, entry.version) == ("keras-attn-bigbird", "0.1.0")


@settings(deadline=None, max_examples=12, derandomize=True)
@given(
    window=st.integers(1, 6),
    globals_=st.one_of(st.integers(0, 3), st.lists(st.integers(0, 30), min_size=1, max_size=3)),
    causal=st.booleans(),
    lengths=st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(0, 9)),
    block_size=st.integers(1, 7),
)
def test_longformer_matches_reference(window, globals_, causal, lengths, block_size):
    tq, tk, offset = lengths
    if isinstance(globals_, int):
        pattern = Longformer(window, num_global=globals_, causal=causal)
        global_positions = set(range(globals_))
    else:
        pattern = Longformer(window, global_indices=globals_, causal=causal)
        global_positions = set(globals_)
    expected = longformer_reference(window, global_positions, causal, tq, tk, offset)
    np.testing.assert_array_equal(mask_of(pattern, tq, tk, offset), expected)
    np.testing.assert_array_equal(
        pattern.block_mask(tq, tk, block_size, offset), block_reduce(expected, block_size)
    )


@settings(deadline=None, max_examples=12, derandomize=True)
@given(
    block_size=st.integers(1, 5),
    window_blocks=st.sampled_from([1, 3, 5]),
    global_blocks=st.integers(0, 2),
    random_blocks=st.integers(0, 3),
    seed=st.integers(0, 1000),
    causal=st.booleans(),
    lengths=st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(0, 9)),
    engine_block=st.integers(1, 8),
)
def test_bigbird_matches_reference(
    block_size, window_blocks, global_blocks, random_blocks, seed, causal, lengths, engine_block
):
    tq, tk, offset = lengths
    pattern = BigBird(block_size, window_blocks, global_blocks, random_blocks, seed, causal)
    expected = bigbird_reference(pattern, tq, tk, offset)
    np.testing.assert_array_equal(mask_of(pattern, tq, tk, offset), expected)
    np.testing.assert_array_equal(
        pattern.block_mask(tq, tk, engine_block, offset), block_reduce(expected, engine_block)
    )


def test_random_blocks_are_seeded_and_spread():
    pattern = BigBird(block_size=4, num_random_blocks=3, seed=7)
    table = pattern.random_blocks(200)
    np.testing.assert_array_equal(
        table, BigBird(block_size=4, num_random_blocks=3, seed=7).random_blocks(200)
    )
    assert not np.array_equal(
        table, BigBird(block_size=4, num_random_blocks=3, seed=8).random_blocks(200)
    )
    a = np.arange(200)[:, None]
    assert (table >= 0).all() and (table <= 2 * a + 1).all()
    # Draws are roughly uniform over 0 .. 2a + 1: about half fall before the query block.
    assert 0.35 < np.mean(table < a) < 0.65
    causal = BigBird(block_size=4, num_random_blocks=3, seed=7, causal=True).random_blocks(200)
    assert (causal <= a).all() and len(np.unique(causal[100:])) > 100


def test_mask_does_not_depend_on_length_or_data():
    # The same pairs get the same answer however long the input: masks of a short
    # input are the top-left corner of a long one's.
    pattern = BigBird(block_size=3, num_random_blocks=2, seed=3)
    np.testing.assert_array_equal(mask_of(pattern, 40, 40)[:20, :25], mask_of(pattern, 20, 25))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_window_blocks=2"):
        BigBird(num_window_blocks=2)
    with pytest.raises(ValueError, match="window=0"):
        Longformer(window=0)
    with pytest.raises(ValueError, match="global_indices"):
        Longformer(global_indices=[])


@pytest.mark.parametrize(
    "pattern",
    [
        Longformer(window=3, num_global=2),
        Longformer(window=2, global_indices=[1, 7], causal=True),
        BigBird(block_size=2, num_random_blocks=2, seed=1),
        BigBird(block_size=3, num_global_blocks=0, causal=True),
    ],
    ids=repr,
)
def test_honours_the_pattern_interface(keras_attn_check, pattern):
    keras_attn_check(pattern, block_size=4)


def test_model_saves_and_loads(tmp_path):
    spec = {"name": "bigbird", "config": {"block_size": 2, "num_random_blocks": 1, "seed": 4}}
    inputs = keras.Input((12, 8))
    outputs = keras_attn.Attention(num_heads=2, pattern=spec)(inputs)
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "bigbird.keras")
    loaded = keras.saving.load_model(tmp_path / "bigbird.keras")
    assert loaded.layers[1].pattern == BigBird(block_size=2, num_random_blocks=1, seed=4)
    x = np.random.default_rng(0).normal(size=(2, 12, 8)).astype("float32")
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))


@pytest.mark.parametrize(
    "pattern",
    [Longformer(window=8, num_global=2), BigBird(block_size=8, num_random_blocks=2, seed=2)],
    ids=repr,
)
def test_runs_on_the_block_sparse_path(pattern):
    x = np.random.default_rng(1).normal(size=(1, 128, 16)).astype("float32")
    sparse = keras_attn.Attention(num_heads=2, pattern=pattern, block_sparse=True, block_size=16)
    dense = keras_attn.Attention(num_heads=2, pattern=pattern, block_sparse=False, block_size=16)
    try:
        out, weights = sparse(x, return_attention_scores=True)
    except NotImplementedError:
        pytest.skip("keras_attn has no block-sparse path yet")
    dense(x)
    dense.set_weights(sparse.get_weights())
    expected, expected_weights = dense(x, return_attention_scores=True)
    assert (sparse.last_path, dense.last_path) == ("block_sparse", "dense")
    np.testing.assert_allclose(ops.convert_to_numpy(out), ops.convert_to_numpy(expected), atol=1e-5)
    np.testing.assert_allclose(
        ops.convert_to_numpy(weights), ops.convert_to_numpy(expected_weights), atol=1e-6
    )
