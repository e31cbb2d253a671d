"""Patterns against numpy masks: every built-in, their unions and intersections, block masks."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn import plugins
from keras_attn.patterns import BlockLocal
from keras_attn.patterns import Causal
from keras_attn.patterns import Dilated
from keras_attn.patterns import Full
from keras_attn.patterns import GlobalTokens
from keras_attn.patterns import Intersection
from keras_attn.patterns import Local
from keras_attn.patterns import Pattern
from keras_attn.patterns import Strided
from keras_attn.patterns import Union
from keras_attn.positions import Positions
from keras_attn.positions import make_positions
from tests.strategies import any_pattern

# numpy references: (query positions (Tq,), key positions (Tk,)) -> bool (Tq, Tk).
# Each is written from the pattern's definition, with i the query, j the key.


def _grid(q, k):
    return np.asarray(q)[:, None], np.asarray(k)[None, :]


def ref_full(q, k):
    return np.ones((len(q), len(k)), bool)


def ref_causal(q, k):
    i, j = _grid(q, k)
    return j <= i


def ref_local(q, k, window, causal=False):
    i, j = _grid(q, k)
    m = (j > i - window) & (j < i + window)
    return m & (j <= i) if causal else m


def ref_dilated(q, k, window, dilation, causal=False):
    i, j = _grid(q, k)
    # Keys i, i ± dilation, ..., i ± (window - 1) * dilation.
    m = np.zeros(np.broadcast_shapes(i.shape, j.shape), bool)
    for step in range(-(window - 1), window):
        m |= j == i + step * dilation
    return m & (j <= i) if causal else m


def ref_strided(q, k, stride, causal=False):
    i, j = _grid(q, k)
    m = np.mod(i - j, stride) == 0
    return m & (j <= i) if causal else m


def ref_block_local(q, k, block_size, causal=False):
    i, j = _grid(q, k)
    m = np.floor_divide(i, block_size) == np.floor_divide(j, block_size)
    return m & (j <= i) if causal else m


def ref_global_tokens(q, k, num_tokens=1, indices=None):
    chosen = list(range(num_tokens)) if indices is None else list(indices)
    i, j = _grid(q, k)
    return np.isin(i, chosen) | np.isin(j, chosen)


def _mask(pattern, tq, tk, query_offset=0, key_offset=0, heads=1):
    m = ops.convert_to_numpy(pattern.mask(make_positions(tq, tk, heads, query_offset, key_offset)))
    assert m.dtype == bool
    m = np.broadcast_to(m, (1, heads, tq, tk))
    # Patterns depend on positions only: every head and batch sees the same mask.
    assert all(np.array_equal(m[0, h], m[0, 0]) for h in range(heads))
    return m[0, 0]


# (pattern, reference) pairs covering every built-in and its options.
CASES = [
    (Full(), ref_full),
    (Causal(), ref_causal),
    (Local(1), lambda q, k: ref_local(q, k, 1)),
    (Local(3), lambda q, k: ref_local(q, k, 3)),
    (Local(3, causal=True), lambda q, k: ref_local(q, k, 3, True)),
    (Local(100), lambda q, k: ref_local(q, k, 100)),
    (Dilated(2), lambda q, k: ref_dilated(q, k, 2, 2)),
    (Dilated(3, dilation=3), lambda q, k: ref_dilated(q, k, 3, 3)),
    (Dilated(2, dilation=4, causal=True), lambda q, k: ref_dilated(q, k, 2, 4, True)),
    (Dilated(3, dilation=1), lambda q, k: ref_local(q, k, 3)),
    (Strided(3), lambda q, k: ref_strided(q, k, 3)),
    (Strided(4, causal=True), lambda q, k: ref_strided(q, k, 4, True)),
    (BlockLocal(4), lambda q, k: ref_block_local(q, k, 4)),
    (BlockLocal(3, causal=True), lambda q, k: ref_block_local(q, k, 3, True)),
    (GlobalTokens(), lambda q, k: ref_global_tokens(q, k)),
    (GlobalTokens(num_tokens=3), lambda q, k: ref_global_tokens(q, k, 3)),
    (GlobalTokens(indices=[5, 0, 9]), lambda q, k: ref_global_tokens(q, k, indices=[0, 5, 9])),
    (Local(2) | GlobalTokens(2), lambda q, k: ref_local(q, k, 2) | ref_global_tokens(q, k, 2)),
    (
        Local(3, causal=True) | Strided(3, causal=True),
        lambda q, k: ref_local(q, k, 3, True) | ref_strided(q, k, 3, True),
    ),
    (Local(4) & Causal(), lambda q, k: ref_local(q, k, 4) & ref_causal(q, k)),
    (
        (BlockLocal(4) | GlobalTokens(indices=[6])) & Causal(),
        lambda q, k: (
            (ref_block_local(q, k, 4) | ref_global_tokens(q, k, indices=[6])) & ref_causal(q, k)
        ),
    ),
    (
        Strided(2) & (Local(5) | Causal()) & Dilated(2, dilation=3),
        lambda q, k: (
            ref_strided(q, k, 2) & (ref_local(q, k, 5) | ref_causal(q, k)) & ref_dilated(q, k, 2, 3)
        ),
    ),
]
IDS = [repr(p) for p, _ in CASES]

# (Tq, Tk, query offset, key offset): square, Tq != Tk both ways, a decoding step, a chunk.
GEOMETRIES = [(9, 9, 0, 0), (5, 12, 0, 0), (12, 5, 0, 0), (1, 24, 17, 0), (4, 20, 16, 0)]


@pytest.mark.parametrize("tq,tk,query_offset,key_offset", GEOMETRIES)
@pytest.mark.parametrize("pattern,reference", CASES, ids=IDS)
def test_mask_matches_numpy(pattern, reference, tq, tk, query_offset, key_offset):
    q = np.arange(tq) + query_offset
    k = np.arange(tk) + key_offset
    np.testing.assert_array_equal(
        _mask(pattern, tq, tk, query_offset, key_offset, heads=2), reference(q, k)
    )


def test_hand_written_masks():
    # A few masks spelled out, so that the references above are checked too.
    np.testing.assert_array_equal(
        _mask(Local(2, causal=True), 4, 4).astype(int),
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]],
    )
    np.testing.assert_array_equal(
        _mask(Dilated(2, dilation=2), 5, 5).astype(int),
        [[1, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [0, 0, 1, 0, 1]],
    )
    np.testing.assert_array_equal(
        _mask(BlockLocal(2), 4, 4).astype(int),
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]],
    )
    np.testing.assert_array_equal(
        _mask(GlobalTokens(indices=[2]), 4, 4).astype(int),
        [[0, 0, 1, 0], [0, 0, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]],
    )
    # A decoding step at position 517 with a causal window of 3 sees keys 515..517.
    row = _mask(Local(3, causal=True), 1, 520, query_offset=517)[0]
    assert np.flatnonzero(row).tolist() == [515, 516, 517]


def test_mask_works_on_two_dim_positions():
    # The engine may evaluate a pattern on one block: positions without batch/head dims.
    q = np.arange(8, 12, dtype="int32").reshape(4, 1)
    k = np.arange(0, 16, dtype="int32").reshape(1, 16)
    head = np.zeros((1, 1), "int32")
    for pattern, reference in CASES:
        m = ops.convert_to_numpy(pattern.mask(Positions(q, k, head)))
        np.testing.assert_array_equal(np.broadcast_to(m, (4, 16)), reference(q[:, 0], k[0]))


# Hypothesis: random windows, lengths and offsets.

GRID = 24
lengths = st.integers(1, GRID)
offsets = st.integers(0, 600)
sizes = st.integers(1, 12)


def _grid_mask(pattern, tq, tk, query_offset=0, key_offset=0):
    """The mask of a (Tq, Tk) matrix, read off a fixed GRID x GRID one.

    A mask is a function of each pair's positions only, so its top-left corner is
    the mask of the smaller matrix; one shape spares JAX a compile per example.
    """
    return _mask(pattern, GRID, GRID, query_offset, key_offset)[:tq, :tk]


@given(tq=lengths, tk=lengths, offset=offsets, window=sizes, causal=st.booleans())
def test_local_property(tq, tk, offset, window, causal):
    q, k = np.arange(tq) + offset, np.arange(tk) + offset // 2
    m = _grid_mask(Local(window, causal=causal), tq, tk, offset, offset // 2)
    np.testing.assert_array_equal(m, ref_local(q, k, window, causal))


@given(tq=lengths, tk=lengths, offset=offsets, window=sizes, dilation=sizes, causal=st.booleans())
def test_dilated_property(tq, tk, offset, window, dilation, causal):
    q, k = np.arange(tq) + offset, np.arange(tk)
    m = _grid_mask(Dilated(window, dilation, causal), tq, tk, offset)
    np.testing.assert_array_equal(m, ref_dilated(q, k, window, dilation, causal))


@given(
    tq=lengths,
    tk=lengths,
    offset=offsets,
    stride=sizes,
    block=sizes,
    num_tokens=st.integers(1, 5),
    causal=st.booleans(),
)
def test_strided_block_local_global_property(tq, tk, offset, stride, block, num_tokens, causal):
    q, k = np.arange(tq) + offset, np.arange(tk)
    np.testing.assert_array_equal(
        _grid_mask(Strided(stride, causal), tq, tk, offset), ref_strided(q, k, stride, causal)
    )
    np.testing.assert_array_equal(
        _grid_mask(BlockLocal(block, causal), tq, tk, offset), ref_block_local(q, k, block, causal)
    )
    np.testing.assert_array_equal(
        _grid_mask(GlobalTokens(num_tokens), tq, tk, offset), ref_global_tokens(q, k, num_tokens)
    )


@given(tq=lengths, tk=lengths, offset=offsets, window=sizes, num_tokens=st.integers(1, 4))
def test_combination_property(tq, tk, offset, window, num_tokens):
    q, k = np.arange(tq) + offset, np.arange(tk) + offset
    union = Local(window) | GlobalTokens(num_tokens)
    inter = (Local(window) | GlobalTokens(num_tokens)) & Causal()
    np.testing.assert_array_equal(
        _grid_mask(union, tq, tk, offset, offset),
        ref_local(q, k, window) | ref_global_tokens(q, k, num_tokens),
    )
    np.testing.assert_array_equal(
        _grid_mask(inter, tq, tk, offset, offset),
        (ref_local(q, k, window) | ref_global_tokens(q, k, num_tokens)) & ref_causal(q, k),
    )


# Block masks.


def ref_block_mask(element_mask, block_size):
    """Which blocks of a (Tq, Tk) mask hold at least one True (edge blocks padded)."""
    tq, tk = element_mask.shape
    n_q, n_k = -(-tq // block_size), -(-tk // block_size)
    padded = np.zeros((n_q * block_size, n_k * block_size), bool)
    padded[:tq, :tk] = element_mask
    return padded.reshape(n_q, block_size, n_k, block_size).any(axis=(1, 3))


BLOCK_GEOMETRIES = [(16, 16, 4, 0), (13, 21, 4, 0), (8, 40, 8, 32), (1, 37, 5, 36), (20, 7, 3, 0)]


@pytest.mark.parametrize("tq,tk,block_size,query_offset", BLOCK_GEOMETRIES)
@pytest.mark.parametrize("pattern,reference", CASES, ids=IDS)
def test_block_mask_matches_element_mask(pattern, reference, tq, tk, block_size, query_offset):
    q, k = np.arange(tq) + query_offset, np.arange(tk)
    expected = ref_block_mask(reference(q, k), block_size)
    generic = Pattern.block_mask(pattern, tq, tk, block_size, query_offset=query_offset)
    assert isinstance(generic, np.ndarray) and generic.dtype == bool
    np.testing.assert_array_equal(generic, expected)
    _check_override(pattern, tq, tk, block_size, query_offset, expected)


def _check_override(pattern, tq, tk, block_size, query_offset, expected):
    """A pattern's own block_mask: exact, or for intersections a superset.

    Patterns override block_mask with closed forms. Dropping a block that holds an
    allowed pair would lose attention weight, so no override may do it; an
    intersection may keep a few empty blocks (each is masked exactly later).
    """
    got = np.asarray(pattern.block_mask(tq, tk, block_size, query_offset=query_offset))
    assert got.shape == expected.shape and got.dtype == bool
    assert not np.any(expected & ~got), "a block holding an allowed pair was dropped"
    if isinstance(pattern, Intersection):
        parts = [
            np.asarray(p.block_mask(tq, tk, block_size, query_offset)) for p in pattern.patterns
        ]
        assert not np.any(got & ~np.logical_and.reduce(parts))
    else:
        np.testing.assert_array_equal(got, expected)


def test_block_mask_hand_worked():
    # Causal 8x8 in blocks of 4: the upper-right block is empty.
    np.testing.assert_array_equal(Causal().block_mask(8, 8, 4), [[True, False], [True, True]])
    # A window of 2 in blocks of 2 over 8 positions: a band of width 3 blocks.
    np.testing.assert_array_equal(
        Local(2).block_mask(8, 8, 2).astype(int),
        [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]],
    )


@given(
    # A few shapes (JAX compiles once per shape); the values vary freely.
    tq=st.sampled_from([1, 6, 13]),
    tk=st.sampled_from([9, 16]),
    block_size=st.sampled_from([1, 3, 4]),
    offset=st.integers(0, 40),
    window=st.integers(1, 6),
    num_tokens=st.integers(1, 3),
    causal=st.booleans(),
)
def test_block_mask_property(tq, tk, block_size, offset, window, num_tokens, causal):
    q, k = np.arange(tq) + offset, np.arange(tk)
    pattern = Local(window, causal=causal) | GlobalTokens(num_tokens)
    expected = ref_block_mask(
        ref_local(q, k, window, causal) | ref_global_tokens(q, k, num_tokens), block_size
    )
    generic = Pattern.block_mask(pattern, tq, tk, block_size, query_offset=offset)
    np.testing.assert_array_equal(generic, expected)
    _check_override(pattern, tq, tk, block_size, offset, expected)


@given(
    pattern=any_pattern(),
    query_length=st.integers(1, 90),
    key_length=st.integers(1, 90),
    block_size=st.integers(1, 20),
    offset=st.integers(0, 40),
)
@settings(max_examples=40)
def test_block_masks_of_random_combinations(pattern, query_length, key_length, block_size, offset):
    # Reference: the pattern's own element mask of the whole matrix, reduced block by block.
    expected = ref_block_mask(_mask(pattern, query_length, key_length, offset), block_size)
    _check_override(pattern, query_length, key_length, block_size, offset, expected)


# Combination structure.


def test_union_and_intersection_flatten():
    a, b, c = Local(2), Strided(3), GlobalTokens(1)
    assert isinstance(a | b, Union) and isinstance(a & b, Intersection)
    assert ((a | b) | c).patterns == [a, b, c]
    assert (a | (b | c)).patterns == [a, b, c]
    assert ((a & b) & c).patterns == [a, b, c]
    mixed = (a | b) & c
    assert isinstance(mixed, Intersection) and mixed.patterns == [a | b, c]
    assert isinstance(mixed.patterns[0], Union)


def test_equality_and_hash():
    assert Local(3) == Local(3) and hash(Local(3)) == hash(Local(3))
    assert Local(3) != Local(4)
    assert Local(3) != Local(3, causal=True)
    assert Local(3) != Strided(3)
    assert GlobalTokens(indices=[3, 1]) == GlobalTokens(indices=[1, 3])
    assert (Local(3) | Causal()) == (Local(3) | Causal())
    assert (Local(3) | Causal()) != (Local(3) & Causal())
    assert len({Local(3), Local(3), Causal(), Causal()}) == 2


def test_causal_property():
    assert Causal().causal and not Full().causal
    assert Local(2, causal=True).causal and not Local(2).causal
    assert Dilated(2, causal=True).causal and Strided(2, causal=True).causal
    assert BlockLocal(2, causal=True).causal and not GlobalTokens(1).causal
    assert (Local(2, causal=True) | Causal()).causal
    assert not (Local(2, causal=True) | GlobalTokens(1)).causal
    assert (Local(2) & Causal()).causal
    assert not (Local(2) & Full()).causal
    # The flag tells the truth: a causal pattern never shows a later key.
    for pattern, _ in CASES:
        if pattern.causal:
            assert not np.any(_mask(pattern, 10, 10) & ~ref_causal(np.arange(10), np.arange(10)))


# Config and the registry (round trips of every built-in: tests/test_round_trips.py).


def test_config_is_plain_python():
    import json

    pattern = (Local(3, causal=True) | GlobalTokens(indices=[0, 4])) & Dilated(2, 3)
    spec = json.loads(json.dumps(plugins.serialize(pattern)))
    assert plugins.resolve("pattern", spec) == pattern


@pytest.mark.parametrize(
    "name,cls",
    [("full", Full), ("causal", Causal), ("global_tokens", GlobalTokens)],
)
def test_resolve_by_name(name, cls):
    assert plugins.get("pattern", name) is cls
    pattern = plugins.resolve("pattern", name)
    assert type(pattern) is cls and isinstance(pattern, keras_attn.Pattern)
    assert plugins.resolve("pattern", pattern) is pattern


def test_every_builtin_is_registered():
    registered = set(plugins.names("pattern"))
    expected = {"full", "causal", "local", "dilated", "strided", "block_local", "global_tokens"}
    assert expected | {"union", "intersection"} <= registered
    assert plugins.get("pattern", "local") is Local
    assert plugins.get("pattern", "block_local") is BlockLocal


def test_name_without_required_argument_asks_for_a_config():
    with pytest.raises(TypeError, match="config dict"):
        plugins.resolve("pattern", "local")
    assert plugins.resolve("pattern", {"name": "local", "config": {"window": 4}}) == Local(4)


def test_resolve_wrong_kind_raises():
    from keras_attn import normalizers
    from keras_attn import scores

    for other in (normalizers.Softmax(), scores.Dot()):
        with pytest.raises(keras_attn.ComponentKindError, match="Expected a pattern"):
            plugins.resolve("pattern", other)
    with pytest.raises(keras_attn.ComponentKindError):
        plugins.resolve("normalizer", Causal())
    with pytest.raises(keras_attn.UnknownComponentError, match="sliding"):
        plugins.resolve("pattern", "sliding")


# Bad arguments.


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda: Local(0), "window=0"),
        (lambda: Local(-3), "window=-3"),
        (lambda: Local(2.5), "window=2.5"),
        (lambda: Local(True), "window=True"),
        (lambda: Local(3, causal="yes"), "causal='yes'"),
        (lambda: Dilated(0), "window=0"),
        (lambda: Dilated(2, dilation=0), "dilation=0"),
        (lambda: Strided(0), "stride=0"),
        (lambda: Strided(-1, causal=True), "stride=-1"),
        (lambda: BlockLocal(0), "block_size=0"),
        (lambda: GlobalTokens(0), "num_tokens=0"),
        (lambda: GlobalTokens(indices=[]), "indices=[]"),
        (lambda: GlobalTokens(indices=[1, -1]), "indices=[1, -1]"),
        (lambda: GlobalTokens(indices=[1.5]), "indices=[1.5]"),
    ],
)
def test_bad_arguments(make, arg):
    with pytest.raises(
        ValueError, match=f"Received: {arg}".replace("[", r"\[").replace("]", r"\]")
    ):
        make()


def test_bad_combinations():
    with pytest.raises(TypeError, match="Received:"):
        Local(2) | "causal"
    with pytest.raises(TypeError, match="Received:"):
        Causal() & 3
    with pytest.raises(ValueError, match="at least two"):
        Union([Causal()])


# sink_tokens (StreamingLLM): the first keys are visible to every query.


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("query_offset", [0, 5])
def test_sink_tokens_mask_and_block_mask(causal, query_offset):
    from keras_attn import testing
    from keras_attn.patterns import SinkTokens

    pattern = SinkTokens(3, causal=causal)
    positions = make_positions(7, 12, 1, query_offset)
    mask = np.broadcast_to(ops.convert_to_numpy(pattern.mask(positions)), (1, 1, 7, 12))[0, 0]
    q = np.arange(7)[:, None] + query_offset
    k = np.arange(12)[None, :]
    expected = (k < 3) & ((k <= q) if causal else True)
    np.testing.assert_array_equal(mask, np.broadcast_to(expected, (7, 12)))
    testing.check_pattern(pattern, save=False, train=False)


def test_sink_tokens_compose_with_local_and_causal():
    from keras_attn.patterns import SinkTokens

    pattern = Local(3, causal=True) | SinkTokens(2, causal=True)
    assert pattern.causal and plugins.resolve("pattern", plugins.serialize(pattern)) == pattern
    mask = np.broadcast_to(
        ops.convert_to_numpy(pattern.mask(make_positions(8, 8, 1))), (1, 1, 8, 8)
    )[0, 0]
    d = np.arange(8)[:, None] - np.arange(8)[None, :]
    np.testing.assert_array_equal(mask, ((d >= 0) & (d < 3)) | ((np.arange(8) < 2) & (d >= 0)))
    block = pattern.block_mask(64, 64, 8)
    # The sink column, the diagonal and the band below it (window 3 crosses blocks).
    assert block[:, 0].all() and block.sum() == 8 + 8 + 7 - 2
    x = np.random.default_rng(0).normal(size=(1, 64, 8)).astype("float32")
    sparse = keras_attn.Attention(num_heads=2, pattern=pattern, block_sparse=True, block_size=8)
    dense = keras_attn.Attention(num_heads=2, pattern=pattern, block_sparse=False)
    out = sparse(x)
    dense(x)
    dense.set_weights(sparse.get_weights())
    assert sparse.last_path == "block_sparse"
    np.testing.assert_allclose(ops.convert_to_numpy(out), ops.convert_to_numpy(dense(x)), atol=1e-5)
    with pytest.raises(ValueError, match="Received: num_tokens=0"):
        SinkTokens(0)
