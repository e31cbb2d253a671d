"""keras_attn.block_layout: block geometry, layouts and segment layouts, against brute force."""

import itertools

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_attn import block_layout
from keras_attn import patterns as P
from keras_attn.positions import make_positions
from tests.strategies import any_pattern

# -- references: every position written out --------------------------------------------


def ref_blocks(length, block_size, offset=0):
    """The absolute positions of each block, as lists."""
    positions = list(range(offset, offset + length))
    return [positions[i : i + block_size] for i in range(0, length, block_size)]


def ref_block_mask(pattern, query_length, key_length, block_size, query_offset=0):
    """Whether each block holds an allowed pair: the whole element mask, then any()."""
    positions = make_positions(query_length, key_length, 1, query_offset=query_offset)
    element = keras.ops.convert_to_numpy(pattern.mask(positions))
    element = np.broadcast_to(element, (1, 1, query_length, key_length))[0, 0]
    query_blocks = range(0, query_length, block_size)
    key_blocks = range(0, key_length, block_size)
    return np.array(
        [
            [element[q : q + block_size, k : k + block_size].any() for k in key_blocks]
            for q in query_blocks
        ]
    )


def ref_meets(query_ids, key_ids, block_size):
    """Whether a query block and a key block share an id, per batch row."""
    qb = [ref_blocks(len(row), block_size) for row in query_ids]
    kb = [ref_blocks(len(row), block_size) for row in key_ids]
    return np.array(
        [
            [[bool(set(q_row[q]) & set(k_row[k])) for k in kb[b]] for q in qb[b]]
            for b, (q_row, k_row) in enumerate(zip(query_ids, key_ids, strict=True))
        ]
    )


# -- block geometry ----------------------------------------------------------------------


def test_num_blocks():
    for length, block_size in itertools.product(range(0, 30), range(1, 9)):
        assert block_layout.num_blocks(length, block_size) == len(ref_blocks(length, block_size))


@pytest.mark.parametrize("tq,tk,bs,offset", [(16, 16, 4, 0), (13, 21, 4, 0), (5, 40, 8, 35)])
def test_block_bounds_and_distance_bounds(tq, tk, bs, offset):
    qa, qb, ka, kb = block_layout.block_bounds(tq, tk, bs, offset)
    queries, keys = ref_blocks(tq, bs, offset), ref_blocks(tk, bs)
    np.testing.assert_array_equal(qa[:, 0], [b[0] for b in queries])
    np.testing.assert_array_equal(qb[:, 0], [b[-1] for b in queries])
    np.testing.assert_array_equal(ka[0], [b[0] for b in keys])
    np.testing.assert_array_equal(kb[0], [b[-1] for b in keys])
    low, high = block_layout.distance_bounds(tq, tk, bs, offset)
    for (i, q), (j, k) in itertools.product(enumerate(queries), enumerate(keys)):
        distances = [a - b for a in q for b in k]
        assert (low[i, j], high[i, j]) == (min(distances), max(distances))


def test_holds_multiple():
    low, high = np.meshgrid(np.arange(-12, 13), np.arange(-12, 13), indexing="ij")
    for step in range(1, 7):
        expected = np.vectorize(lambda a, b, s=step: any(x % s == 0 for x in range(a, b + 1)))
        np.testing.assert_array_equal(
            block_layout.holds_multiple(low, high, step), expected(low, high)
        )


class EveryThird(P.Pattern):
    """A pattern without a closed-form block mask (the base class reduces its mask)."""

    name = "test_block_layout_every_third"

    def mask(self, positions):
        return keras.ops.equal((positions.query - positions.key) % 3, 0)


@pytest.mark.parametrize(
    "pattern",
    [P.Causal(), P.Local(3) | P.GlobalTokens(indices=[9]), P.Dilated(2, 4), EveryThird()],
    ids=repr,
)
@pytest.mark.parametrize("tq,tk,bs,offset", [(16, 16, 4, 0), (13, 21, 4, 0), (5, 40, 8, 35)])
def test_block_mask_from_mask(pattern, tq, tk, bs, offset):
    got = block_layout.block_mask_from_mask(pattern, tq, tk, bs, offset)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, ref_block_mask(pattern, tq, tk, bs, offset))


# -- layouts -----------------------------------------------------------------------------


def _check_layout(layout, block_mask):
    """Every kept block in one group's row once; the band form cuts what the gather would."""
    np.testing.assert_array_equal(layout.block_mask, block_mask)
    rows = np.concatenate([g.rows for g in layout.groups])
    assert sorted(rows.tolist()) == list(range(layout.num_query_blocks))
    if layout.order is not None:
        np.testing.assert_array_equal(rows[layout.order], np.arange(len(rows)))
    for g in layout.groups:
        assert g.cols.shape == g.valid.shape == (len(g.rows), g.cols.shape[1])
        for r, cols, valid in zip(g.rows, g.cols, g.valid, strict=True):
            assert sorted(cols[valid].tolist()) == np.flatnonzero(block_mask[r]).tolist()
        if g.offsets is not None:
            nk = layout.num_key_blocks
            band = np.clip(g.rows[:, None] + g.offsets[None, :], 0, nk - 1)
            shared = np.broadcast_to(g.shared, (len(g.rows), len(g.shared)))
            np.testing.assert_array_equal(g.cols, np.concatenate([shared, band], axis=1))
    assert layout.computed_blocks == sum(g.cols.size for g in layout.groups)
    assert layout.computed_fraction == layout.computed_blocks / block_mask.size


@given(pattern=any_pattern(), length=st.integers(1, 200), block_size=st.sampled_from([4, 16]))
@settings(max_examples=30)
def test_layout_covers_every_kept_block_once(pattern, length, block_size):
    layout = block_layout.block_layout(pattern, length, length, block_size)
    _check_layout(layout, pattern.block_mask(length, length, block_size))


def test_layout_with_a_query_offset():
    # A decoding chunk: 5 queries at positions 35.. over 40 keys.
    pattern = P.Local(4, causal=True) | P.GlobalTokens(2)
    layout = block_layout.block_layout(pattern, 5, 40, 8, query_offset=35)
    assert (layout.query_length, layout.key_length, layout.block_size) == (5, 40, 8)
    _check_layout(layout, ref_block_mask(pattern, 5, 40, 8, 35))
    # Keys 0, 1 (global) and 31..39 (the window): blocks 0 and 4 of 8 tokens.
    np.testing.assert_array_equal(layout.block_mask, [[True, False, False, False, True]])


def test_global_rows_get_their_own_group():
    pattern = P.Local(256) | P.GlobalTokens(1)
    layout = block_layout.block_layout(pattern, 65536, 65536, 128)
    widths = sorted(g.cols.shape[1] for g in layout.groups)
    assert widths == [6, 512]  # 2 blocks each side + own + the global column; one dense row
    assert layout.computed_blocks == 511 * 6 + 512
    assert layout.computed_fraction == (511 * 6 + 512) / 512**2


def test_local_and_global_rows_take_the_band_form():
    # Local windows lie on a few diagonals of blocks; global columns are kept by every
    # row: both are cut from the key blocks with slices, without a gather.
    (band,) = block_layout.block_layout(P.Local(256), 8192, 8192, 128).groups
    assert band.offsets.tolist() == [-2, -1, 0, 1, 2] and band.shared.tolist() == []
    assert not band.valid[0, :2].any() and band.valid[1:-1].sum() == 62 * 5 - 2
    dense_row, rows = block_layout.block_layout(
        P.Local(256) | P.GlobalTokens(1), 8192, 8192, 128
    ).groups
    assert dense_row.rows.tolist() == [0] and dense_row.shared.tolist() == list(range(64))
    assert rows.shared.tolist() == [0] and rows.offsets.tolist() == [-2, -1, 0, 1, 2]
    # Band entries that fall on a shared column are padding: no block is counted twice.
    assert not rows.valid[0, 1 + np.flatnonzero(rows.cols[0, 1:] == 0)].any()


def test_band_form_per_run_of_rows_and_a_gather_otherwise():
    # Global rows 0 and 2 cut the other rows into runs [1] and [3..31]: all in band form.
    pattern = P.Local(4) | P.GlobalTokens(indices=[0, 300])
    groups = block_layout.block_layout(pattern, 4096, 4096, 128).groups
    assert [g.rows.tolist() for g in groups] == [[0], [1], [2], list(range(3, 32))]
    assert all(g.offsets is not None for g in groups)
    assert groups[3].shared.tolist() == [0, 2] and groups[3].offsets.tolist() == [-1, 0, 1]
    # Blocks of 200 tokens do not line up with blocks of 128: no few diagonals.
    layout = block_layout.block_layout(P.BlockLocal(200), 4096, 4096, 128)
    assert any(g.offsets is None for g in layout.groups)
    _check_layout(layout, P.BlockLocal(200).block_mask(4096, 4096, 128))


def test_a_row_with_no_kept_block_still_computes_one():
    # Only query 0 and key 0 meet a global token, and only near it: query blocks 2 and 3
    # keep no block, and still compute one, all padding (a zero output).
    pattern = P.Local(2) & P.GlobalTokens(indices=[0])
    layout = block_layout.block_layout(pattern, 16, 16, 4)
    assert not layout.block_mask[2:].any() and layout.block_mask[0].any()
    for g in layout.groups:
        assert g.cols.shape[1] >= 1
        assert not g.valid[np.isin(g.rows, [2, 3])].any()
    _check_layout(layout, layout.block_mask)


def test_layout_is_cached_per_pattern_and_shape():
    a = block_layout.block_layout(P.Local(8), 100, 100, 16)
    assert block_layout.block_layout(P.Local(8), 100, 100, 16) is a
    assert block_layout.block_layout(P.Local(9), 100, 100, 16) is not a
    assert block_layout.block_layout(P.Local(8), 100, 100, 16, query_offset=1) is not a


def test_block_mask_of_wrong_shape_is_reported():
    class Broken(P.Local):
        def block_mask(self, query_length, key_length, block_size, query_offset=0):
            return np.ones((1, 1), bool)

    with pytest.raises(ValueError, match=r"Broken.block_mask must return .* shape \(4, 4\)"):
        block_layout.block_layout(Broken(3), 30, 30, 8)


def test_layout_planned_inside_a_compiled_function_is_the_eager_one():
    # `eager()` evaluates the pattern's mask on concrete positions while tracing.
    backend = keras.backend.backend()
    pattern = EveryThird()
    expected = ref_block_mask(pattern, 24, 24, 4)
    if backend == "jax":
        import jax

        seen = []

        @jax.jit
        def traced(x):
            seen.append(block_layout.block_layout(pattern, 24, 24, 4, 0))
            return x

        traced(np.zeros(3))
        (layout,) = seen
    elif backend == "tensorflow":
        import tensorflow as tf

        seen = []
        tf.function(lambda x: seen.append(block_layout.block_layout(pattern, 24, 24, 4)) or x)(
            tf.zeros(3)
        )
        (layout,) = seen
    else:
        layout = block_layout.block_layout(pattern, 24, 24, 4)
    _check_layout(layout, expected)


# -- segment layouts ---------------------------------------------------------------------

T, BS = 32, 4
# Two packed rows: documents of 5, 9, 3, 15 tokens, and of 12, 12, 8.
IDS = np.array(
    [[0] * 5 + [1] * 9 + [2] * 3 + [3] * 15, [4] * 12 + [5] * 12 + [6] * 8], "int32"
)  # (2, 32)


@pytest.mark.parametrize(
    "pattern", [P.Causal(), P.Local(10), P.Local(6) | P.GlobalTokens(2)], ids=repr
)
def test_segment_layout_of_concrete_ids_keeps_the_blocks_that_meet(pattern):
    layout = block_layout.block_layout(pattern, T, T, BS)
    planned = block_layout.segment_layout(layout, IDS, IDS)
    assert planned.from_data and planned.layout is layout and planned.max_segment_length is None
    meets = ref_meets(IDS, IDS, BS)  # (2, 8, 8): packed ids, so block_meets is exact
    np.testing.assert_array_equal(planned.meets, meets)
    for group, width in zip(layout.groups, planned.widths, strict=True):
        kept = meets[:, group.rows[:, None], group.cols] & group.valid  # (B, R, W)
        assert width == max(1, kept.sum(-1).max())
    assert planned.computed_blocks == sum(
        len(g.rows) * w for g, w in zip(layout.groups, planned.widths, strict=True)
    )
    assert planned.computed_blocks < layout.computed_blocks
    assert planned.computed_fraction == planned.computed_blocks / 64


@pytest.mark.parametrize("bound", [None, 4, 15])
def test_segment_layout_of_traced_ids_takes_the_bound(bound):
    layout = block_layout.block_layout(P.Local(10), T, T, BS)
    traced = keras.KerasTensor((2, T), "int32")  # no values: as ids inside jax.jit
    planned = block_layout.segment_layout(layout, traced, traced, bound)
    full = tuple(g.cols.shape[1] for g in layout.groups)
    assert not planned.from_data and planned.meets is None
    assert planned.max_segment_length == bound
    if bound is None:
        assert planned.widths == full
    else:
        width = block_layout.segment_blocks_bound(bound, BS)  # 3 for 4 tokens, 9 for 15
        assert width == {4: 3, 15: 9}[bound]
        assert planned.widths == tuple(min(w, width) for w in full)


def test_segment_blocks_bound():
    # A run of L tokens meeting a block of 4 reaches L - 1 tokens to each side.
    assert block_layout.segment_blocks_bound(1, 4) == 1
    assert block_layout.segment_blocks_bound(4, 4) == 3
    assert block_layout.segment_blocks_bound(5, 4) == 3
    assert block_layout.segment_blocks_bound(6, 4) == 5
    for length, bs in itertools.product(range(1, 20), (1, 2, 4, 8)):
        ids = np.repeat(np.arange(64), length)[: 8 * bs * 4][None].astype("int32")
        meets = ref_meets(ids, ids, bs)
        assert meets.sum(-1).max() <= block_layout.segment_blocks_bound(length, bs)
        for shift in range(bs):  # queries anywhere in a block
            shifted = ids[:, shift : shift + 4 * bs]
            meets = ref_meets(shifted, ids, bs)
            bound = block_layout.segment_blocks_bound(length, bs, aligned=False)
            assert meets.sum(-1).max() <= bound
    # The bounds are reached: a run of 5 straddling three blocks of 4, aligned or not.
    ids = np.array([[0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2]], "int32")
    assert ref_meets(ids, ids, 4)[0, 1].sum() == block_layout.segment_blocks_bound(5, 4) == 3
