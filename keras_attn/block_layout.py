"""Block layouts: which blocks of a score matrix to compute, planned in numpy.

The ``(Tq, Tk)`` score matrix is cut into ``block_size`` x ``block_size`` blocks. A
pattern's ``block_mask`` says which blocks hold at least one allowed pair; the
`BlockLayout` groups the rows of query blocks by how many key blocks they keep, and
says how each group's key slab is cut (slices for bands, a gather otherwise). All of
it is numpy, computed once per pattern and shape, outside any traced function;
`keras_attn.block_sparse` runs a layout and `keras_attn.dispatch` decides whether to.

With packed sequences (segment ids) a `SegmentLayout` narrows a layout further at run
time: each batch row and row of query blocks keeps only the layout's key blocks that
its segments meet (`keras_attn.segments.block_meets`), gathered into a static number
of slots per group, planned here by `segment_layout`.

The block geometry at the top (`block_bounds`, `distance_bounds`, `holds_multiple`,
`block_mask_from_mask`) is public: a plugin's pattern uses it to write a closed-form
``block_mask`` (see `keras_attn.patterns.Local` and the BigBird plugin).
"""

import contextlib
import functools
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_attn import segments as segments_module
from keras_attn.positions import Positions

__all__ = [
    "BlockLayout",
    "RowGroup",
    "SegmentLayout",
    "block_bounds",
    "block_layout",
    "block_mask_from_mask",
    "distance_bounds",
    "holds_multiple",
    "num_blocks",
    "segment_blocks_bound",
    "segment_layout",
]


# -- block geometry ----------------------------------------------------------------------


def num_blocks(length, block_size):
    """``ceil(length / block_size)``: blocks covering `length` positions."""
    return -(-int(length) // int(block_size))


def block_bounds(query_length, key_length, block_size, query_offset=0):
    """First and last absolute position of each query block and each key block.

    Returns:
        ``(q_first, q_last, k_first, k_last)``, numpy int arrays of shapes
        ``(nq, 1)``, ``(nq, 1)``, ``(1, nk)``, ``(1, nk)``; the last block may be
        shorter than `block_size`. Query positions start at `query_offset`.
    """
    offset = int(query_offset)
    q_first = np.arange(0, query_length, block_size)
    q_last = np.minimum(q_first + block_size, query_length) - 1
    k_first = np.arange(0, key_length, block_size)
    k_last = np.minimum(k_first + block_size, key_length) - 1
    return (q_first[:, None] + offset, q_last[:, None] + offset, k_first[None, :], k_last[None, :])


def distance_bounds(query_length, key_length, block_size, query_offset=0):
    """Smallest and largest ``query - key`` of each block, two ``(nq, nk)`` int arrays.

    Query and key positions of a block are two intervals, so every distance between
    the two bounds occurs in the block: a pattern that depends on the distance only
    keeps a block iff some distance in ``[low, high]`` is allowed.
    """
    qa, qb, ka, kb = block_bounds(query_length, key_length, block_size, query_offset)
    return qa - kb, qb - ka


def holds_multiple(low, high, step):
    """Whether the integer interval ``[low, high]`` holds a multiple of `step` (elementwise)."""
    return (low <= high) & (-(-low // step) * step <= high)


def block_mask_from_mask(pattern, query_length, key_length, block_size, query_offset=0):
    """The block mask of any pattern, reduced from its element mask a row of blocks at a time.

    The fallback of `keras_attn.Pattern.block_mask` (memory ``block_size * key_length``
    per step); a pattern with a closed form overrides ``block_mask`` instead.

    Returns:
        Numpy bool ``(nq, nk)``, True where a block holds at least one allowed pair.
    """
    n_q, n_k = num_blocks(query_length, block_size), num_blocks(key_length, block_size)
    out = np.zeros((n_q, n_k), dtype=bool)
    key = np.arange(key_length, dtype="int32").reshape(1, 1, 1, key_length)
    head = np.zeros((1, 1, 1, 1), dtype="int32")
    pad = n_k * block_size - key_length
    for row in range(n_q):
        start = row * block_size
        stop = min(start + block_size, query_length)
        query = (np.arange(start, stop, dtype="int32") + query_offset).reshape(1, 1, -1, 1)
        m = ops.convert_to_numpy(pattern.mask(Positions(query, key, head)))
        m = np.broadcast_to(m, m.shape[:-2] + (stop - start, key_length))
        m = m.reshape(-1, stop - start, key_length).any(axis=(0, 1))
        out[row] = np.pad(m, (0, pad)).reshape(n_k, block_size).any(axis=1)
    return out


# -- layouts -----------------------------------------------------------------------------

# Cost of one more group of rows, in blocks, when rows are grouped by width.
GROUP_PENALTY = 4
MAX_GROUPS = 4
# A group of rows is cut into at most this many runs of consecutive rows to compute
# each in band form (see `RowGroup`); more runs and it is gathered instead.
MAX_RUNS = 8


class RowGroup(NamedTuple):
    """Rows of query blocks computed together, padded to a common width.

    Attributes:
        rows: ``(R,)`` query block indices, ascending.
        cols: ``(R, W)`` key block indices of each row's slab, in slab order;
            padding repeats a block of the matrix.
        valid: ``(R, W)`` False where `cols` is padding.
        shared, offsets: The band form, or None: the slab of row ``r`` is the key
            blocks ``shared`` (the same for every row) followed by
            ``r + offsets`` (zero blocks where out of range). Then the rows are
            contiguous, and the key slabs are cut with slices instead of a gather
            (whose gradient is a scatter-add).
    """

    rows: np.ndarray
    cols: np.ndarray
    valid: np.ndarray
    shared: object = None
    offsets: object = None


class BlockLayout(NamedTuple):
    """Which blocks of a ``(Tq, Tk)`` score matrix are computed, and how.

    Attributes:
        query_length, key_length, block_size: The shape it was made for.
        block_mask: ``(nq, nk)`` numpy bool, True where a block holds an allowed pair.
        groups: Tuple of `RowGroup`, covering every query block row once.
        order: ``(nq,)`` index that puts the concatenated groups' rows back in
            order, or None when they already are.
    """

    query_length: int
    key_length: int
    block_size: int
    block_mask: np.ndarray
    groups: tuple
    order: object

    @property
    def num_query_blocks(self):
        return self.block_mask.shape[0]

    @property
    def num_key_blocks(self):
        return self.block_mask.shape[1]

    @property
    def computed_blocks(self):
        """Blocks computed, padding included."""
        return int(sum(g.cols.size for g in self.groups))

    @property
    def computed_fraction(self):
        """Computed blocks over the blocks of the dense score matrix."""
        return self.computed_blocks / self.block_mask.size


@contextlib.contextmanager
def eager():
    """Evaluate a pattern's mask eagerly even while a function is being traced.

    The block mask is a constant of the traced function: it is computed once, in
    numpy, from the pattern's `mask` on concrete positions.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            yield
    elif backend == "jax":
        import jax

        with jax.ensure_compile_time_eval():
            yield
    else:
        yield


def _group_rows(widths):
    """Split rows into at most `MAX_GROUPS` groups of similar width.

    Minimizes ``sum(rows * widest row) + GROUP_PENALTY * groups`` over partitions of
    the sorted distinct widths into contiguous runs (dynamic programming).

    Returns:
        The widths that close each group, ascending.
    """
    values, counts = np.unique(widths, return_counts=True)
    m = len(values)
    cum = np.concatenate([[0], np.cumsum(counts)])
    cost = np.full((MAX_GROUPS + 1, m + 1), np.inf)
    cost[0, 0] = 0.0
    start = np.zeros((MAX_GROUPS + 1, m + 1), dtype=int)
    for g in range(1, MAX_GROUPS + 1):
        for j in range(1, m + 1):
            # The last group holds distinct widths i..j-1 and is padded to values[j-1].
            c = cost[g - 1, :j] + (cum[j] - cum[:j]) * values[j - 1] + GROUP_PENALTY
            start[g, j] = int(np.argmin(c))
            cost[g, j] = c[start[g, j]]
    g, j = int(np.argmin(cost[:, m])), m
    closing = []
    while j > 0:
        closing.append(values[j - 1])
        j, g = start[g, j], g - 1
    return closing[::-1]


def _make_layout(pattern, query_length, key_length, block_size, query_offset):
    with eager():
        mask = pattern.block_mask(query_length, key_length, block_size, query_offset)
    mask = np.asarray(mask, dtype=bool)
    expected = (num_blocks(query_length, block_size), num_blocks(key_length, block_size))
    if mask.shape != expected:
        raise ValueError(
            f"{type(pattern).__name__}.block_mask must return a bool array of shape "
            f"{expected} for query_length={query_length}, key_length={key_length}, "
            f"block_size={block_size}. Received: shape={mask.shape}"
        )
    # A row with no kept block still computes one (fully masked) block: zero output.
    widths = np.maximum(mask.sum(axis=1), 1)
    groups, low = [], 0
    for high in _group_rows(widths):
        rows = np.flatnonzero((widths > low) & (widths <= high))
        # Each run of consecutive rows in band form, when they all have one and
        # there are few runs (global-token rows split the others into runs).
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
        bands = [_band_group(run, mask, high) for run in runs] if len(runs) <= MAX_RUNS else [None]
        if all(band is not None for band in bands):
            groups.extend(bands)
        else:
            cols = np.zeros((len(rows), high), dtype="int32")
            valid = np.zeros((len(rows), high), dtype=bool)
            for i, r in enumerate(rows):
                kept = np.flatnonzero(mask[r])
                cols[i, : len(kept)] = kept
                cols[i, len(kept) :] = kept[-1] if len(kept) else 0
                valid[i, : len(kept)] = True
            groups.append(RowGroup(rows.astype("int32"), cols, valid))
        low = high
    groups.sort(key=lambda g: g.rows[0])
    rows = np.concatenate([g.rows for g in groups])
    order = None if np.array_equal(rows, np.arange(len(rows))) else np.argsort(rows)
    return BlockLayout(
        query_length,
        key_length,
        block_size,
        mask,
        tuple(groups),
        None if order is None else order.astype("int32"),
    )


def _band_group(rows, mask, width):
    """These rows' kept blocks in band form (see `RowGroup`), or None.

    Possible when the rows are consecutive and every kept block is either kept by
    all of them (``shared``: global tokens) or lies on one of a few diagonals
    (``offsets``: local windows), with no more blocks per row than `width`.
    """
    num_rows, nk = len(rows), mask.shape[1]
    if not np.array_equal(rows, np.arange(rows[0], rows[0] + num_rows)):
        return None
    kept = mask[rows]  # (R, nk)
    shared = np.flatnonzero(kept.all(axis=0))
    rest = kept.copy()
    rest[:, shared] = False
    r, c = np.nonzero(rest)
    offsets = np.unique(c - rows[r])
    if len(shared) + len(offsets) > width or len(shared) + len(offsets) == 0:
        return None
    band = rows[:, None] + offsets[None, :]  # (R, len(offsets))
    clipped = np.clip(band, 0, nk - 1)
    in_band = (band == clipped) & rest[np.arange(num_rows)[:, None], clipped]
    cols = np.concatenate([np.broadcast_to(shared, (num_rows, len(shared))), clipped], axis=1)
    valid = np.concatenate([np.ones((num_rows, len(shared)), bool), in_band], axis=1)
    return RowGroup(
        rows.astype("int32"),
        cols.astype("int32"),
        valid,
        shared.astype("int32"),
        offsets.astype("int32"),
    )


@functools.lru_cache(maxsize=256)
def _cached_layout(pattern, query_length, key_length, block_size, query_offset):
    return _make_layout(pattern, query_length, key_length, block_size, query_offset)


def block_layout(pattern, query_length, key_length, block_size, query_offset=0):
    """The `BlockLayout` of `pattern` for these lengths (cached per pattern and shape).

    Args:
        pattern: A `keras_attn.Pattern`; its `block_mask` decides the blocks.
        query_length: Tq, a Python int.
        key_length: Tk, a Python int.
        block_size: Positive int.
        query_offset: Absolute position of the first query (a Python int).
    """
    args = (int(query_length), int(key_length), int(block_size), int(query_offset))
    try:
        return _cached_layout(pattern, *args)
    except TypeError:  # An unhashable pattern: compute without the cache.
        return _make_layout(pattern, *args)


# -- segment layouts ---------------------------------------------------------------------


class SegmentLayout(NamedTuple):
    """A `BlockLayout` narrowed by segment ids: the blocks whose segments meet.

    At run time, each batch row and row of query blocks of a group keeps the group's
    key blocks (``cols`` where ``valid``) whose segments meet its own, and gathers the
    first ``widths[g]`` of them (a masked dummy block fills the rest), so the slabs are
    ``(B, H, R, bs, widths[g] * bs)``, batch-dependent but of static shape.

    Attributes:
        layout: The pattern's `BlockLayout` (its groups and their static blocks).
        widths: Per group, the key blocks gathered per row (at most the group's width).
        max_segment_length: The bound the widths come from where the ids were traced,
            or None. A row that keeps more blocks than its width (the bound was
            exceeded) gets NaN outputs, never silently fewer blocks.
        from_data: Whether the widths were measured on concrete ids (then no row
            keeps more blocks than its width).
        meets: Bool ``(B, nq, nk)`` numpy, `keras_attn.segments.block_meets` of those
            concrete ids (measured once, for the widths and the run), or None.
    """

    layout: BlockLayout
    widths: tuple
    max_segment_length: object = None
    from_data: bool = False
    meets: object = None

    @property
    def computed_blocks(self):
        """Blocks computed per batch row, padding included."""
        return int(
            sum(len(g.rows) * w for g, w in zip(self.layout.groups, self.widths, strict=True))
        )

    @property
    def computed_fraction(self):
        """Computed blocks per batch row over the blocks of the dense score matrix."""
        return self.computed_blocks / self.layout.block_mask.size


def segment_blocks_bound(max_segment_length, block_size, aligned=True):
    """Most key blocks one query block can share a segment with, for packed ids.

    Every segment is a run of at most `max_segment_length` (``L``) tokens; a segment
    that meets a query block lies within ``L - 1`` tokens of it on either side. In
    self-attention (`aligned`: query block ``i`` covers the tokens of key block
    ``i``) that reaches ``1 + 2 * ceil((L - 1) / bs)`` blocks; otherwise (the queries
    written at a cache index, anywhere in a block) the ``bs + 2 * (L - 1)`` tokens
    reach ``ceil((bs + 2L - 3) / bs) + 1`` blocks.
    """
    length, bs = int(max_segment_length), int(block_size)
    if aligned:
        return 1 + 2 * num_blocks(length - 1, bs)
    return num_blocks(bs + 2 * length - 3, bs) + 1


def segment_layout(layout, query_ids, key_ids, max_segment_length=None, aligned=True):
    """Plan the blocks `layout` computes with these segment ids: a `SegmentLayout`.

    Where the ids are concrete (eager calls, numpy input), each group's width is that
    of its widest row in this batch: the blocks whose segments never meet are skipped,
    with no setting. Where they are traced, the widths are the groups' own (all the
    pattern's blocks, computed and masked) unless `max_segment_length` bounds them
    (`segment_blocks_bound`).

    Args:
        layout: The pattern's `BlockLayout` for these lengths.
        query_ids, key_ids: ``(B, Tq)`` and ``(B, Tk)`` integer segment ids.
        max_segment_length: The longest segment any call carries (tokens), or None.
        aligned: Whether query ``i`` and key ``i`` are the same token (self-attention
            without a cache offset), for the bound.

    The layer checks concrete ids against `max_segment_length` before it plans.
    """
    full = tuple(int(g.cols.shape[1]) for g in layout.groups)
    q, k = segments_module.concrete_ids(query_ids), segments_module.concrete_ids(key_ids)
    if q is None or k is None:
        if max_segment_length is None:
            return SegmentLayout(layout, full)
        bound = segment_blocks_bound(max_segment_length, layout.block_size, aligned)
        return SegmentLayout(layout, tuple(min(w, bound) for w in full), int(max_segment_length))
    with eager():
        meets = np.asarray(
            ops.convert_to_numpy(segments_module.block_meets(q, k, layout.block_size))
        )  # (B, nq, nk)
    widths = []
    for group in layout.groups:
        kept = meets[:, group.rows[:, None], group.cols] & group.valid  # (B, R, W)
        widths.append(max(1, int(kept.sum(axis=-1).max(initial=0))))
    return SegmentLayout(layout, tuple(widths), None, from_data=True, meets=meets)
