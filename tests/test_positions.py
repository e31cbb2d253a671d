"""Absolute positions: shapes, dtypes, offsets (a decoding step at 517 sees 517)."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn.positions import Positions
from keras_attn.positions import make_positions


def _np(x):
    return ops.convert_to_numpy(x)


def _check(positions, tq, tk, heads, query_offset, key_offset):
    assert isinstance(positions, Positions)
    query, key, head = (_np(p) for p in positions)
    assert query.shape == (1, 1, tq, 1)
    assert key.shape == (1, 1, 1, tk)
    assert head.shape == (1, heads, 1, 1)
    for p in (query, key, head):
        assert p.dtype == np.int32
    np.testing.assert_array_equal(query.ravel(), np.arange(tq) + query_offset)
    np.testing.assert_array_equal(key.ravel(), np.arange(tk) + key_offset)
    np.testing.assert_array_equal(head.ravel(), np.arange(heads))
    # Together they broadcast to a (1, H, Tq, Tk) grid of (head, query, key) triples.
    grid = np.broadcast_shapes(query.shape, key.shape, head.shape)
    assert grid == (1, heads, tq, tk)
    relative = _np(positions.key - positions.query)
    i, j = np.meshgrid(np.arange(tq) + query_offset, np.arange(tk) + key_offset, indexing="ij")
    np.testing.assert_array_equal(relative[0, 0], j - i)


@pytest.mark.parametrize(
    "tq,tk,heads,query_offset,key_offset",
    [(4, 4, 2, 0, 0), (3, 7, 1, 0, 0), (7, 3, 4, 0, 0), (1, 518, 2, 517, 0), (5, 9, 3, 12, 8)],
)
def test_make_positions(tq, tk, heads, query_offset, key_offset):
    positions = make_positions(tq, tk, heads, query_offset, key_offset)
    _check(positions, tq, tk, heads, query_offset, key_offset)


def test_offset_may_be_a_tensor():
    # The KV-cache index arrives as an integer scalar tensor.
    # (JAX without x64 has no int64.)
    for dtype in ("int32",) if keras.backend.backend() == "jax" else ("int32", "int64"):
        offset = ops.convert_to_tensor(517, dtype=dtype)
        _check(make_positions(1, 520, 2, query_offset=offset), 1, 520, 2, 517, 0)


def test_offset_traced_under_jit():
    backend = keras.backend.backend()

    def query_positions(offset):
        return make_positions(3, 8, 2, query_offset=offset).query

    if backend == "jax":
        import jax

        out = jax.jit(query_positions)(np.int32(517))
    elif backend == "tensorflow":
        import tensorflow as tf

        out = tf.function(query_positions, jit_compile=True)(tf.constant(517))
    else:
        pytest.skip(f"no jit helper for backend {backend}")
    np.testing.assert_array_equal(_np(out).ravel(), [517, 518, 519])


def test_positions_is_a_named_tuple_exported_at_top_level():
    assert keras_attn.Positions is Positions
    assert Positions._fields == ("query", "key", "head")
    q, k, h = make_positions(2, 3, 1, query_offset=4)
    np.testing.assert_array_equal(_np(q), [[[[4], [5]]]])
    np.testing.assert_array_equal(_np(k), [[[[0, 1, 2]]]])
    np.testing.assert_array_equal(_np(h), [[[[0]]]])


@given(
    tq=st.integers(1, 12),
    tk=st.integers(1, 12),
    heads=st.integers(1, 4),
    query_offset=st.integers(0, 10_000),
    key_offset=st.integers(0, 10_000),
)
def test_make_positions_property(tq, tk, heads, query_offset, key_offset):
    positions = make_positions(tq, tk, heads, query_offset, key_offset)
    _check(positions, tq, tk, heads, query_offset, key_offset)
