"""Block-sparse execution: compute only the score blocks a pattern can reach.

The ``(Tq, Tk)`` score matrix is cut into ``block_size`` x ``block_size`` blocks. Once
per shape, outside the traced computation (numpy, cached), the pattern's
``block_mask`` says which blocks hold at least one allowed pair; that is the
`BlockLayout`. At run time each row of query blocks takes its kept key blocks as one
slab ``(B, H, rows, bs, W * bs)``, so the score, the score_mods and the normalizer see
the row's whole allowed part (a normalizer needs the whole row) and nothing else.
The exact element mask (pattern, padding, data mask) is applied inside the slab.

Rows are padded to the widest row of their group and the padding is masked, so all
shapes are static (XLA friendly). Rows are split into a few groups of similar width,
so that a few dense rows (the queries of global tokens) do not widen every row.
Where a group's blocks lie on a few diagonals (local windows) plus columns that every
row keeps (global tokens), the slabs are cut from the keys with slices (the "band
form" of `RowGroup`); otherwise they are gathered. Cost grows with the blocks kept,
not with ``Tq * Tk``; gradients follow the same slices or gathers backwards. Plain
softmax without dropout takes `keras_attn.engine.softmax_weighted_sum`, whose
hand-written gradient makes fewer passes over the slabs.
"""

import contextlib
import functools
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_attn import engine
from keras_attn import patterns as patterns_module
from keras_attn.positions import Positions

# The auto mode takes the block-sparse path when it computes at most this fraction of
# the blocks of the dense score matrix...
MAX_COMPUTED_FRACTION = 0.5
# ...and the score matrix has at least this many blocks (gathers cost more than they
# save on small inputs).
MIN_BLOCKS = 16
# Where the fused kernel would run but computes every score (on a CPU), the auto mode
# takes the block-sparse path when it computes at most this fraction of the blocks:
# a causal pattern computes 0.625-0.67 of them from 8 x 8 blocks on (T >= 1024 with
# blocks of 128), and was then faster than the fused kernel on both TensorFlow and JAX.
MAX_FRACTION_OVER_FUSED = 0.7
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
def _eager():
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
    with _eager():
        mask = pattern.block_mask(query_length, key_length, block_size, query_offset)
    mask = np.asarray(mask, dtype=bool)
    expected = (-(-query_length // block_size), -(-key_length // block_size))
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
        query_length, key_length, block_size, mask, tuple(groups),
        None if order is None else order.astype("int32"),
    )  # fmt: skip


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
        rows.astype("int32"), cols.astype("int32"), valid,
        shared.astype("int32"), offsets.astype("int32"),
    )  # fmt: skip


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


def _static_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def pays_off(
    pattern,
    query_length,
    key_length,
    mode="auto",
    block_size=128,
    query_offset=0,
    max_fraction=MAX_COMPUTED_FRACTION,
):
    """Whether the block-sparse path should run this pattern at these lengths.

    Args:
        mode: ``"auto"``: when it computes at most `max_fraction` of the
            blocks and the lengths and query offset are known Python ints.
            ``True``: always (raises if the lengths or offset are not static).
            ``False``: never.
    """
    if mode is False:
        return False
    static = _static_int(query_length) and _static_int(key_length) and _static_int(query_offset)
    if mode is True:
        if not static:
            raise ValueError(
                "block_sparse=True needs query and key lengths and a query offset known "
                "when the function is traced (Python ints), because the blocks to "
                f"compute are worked out ahead of time. Received: query_length={query_length}, "
                f"key_length={key_length}, query_offset={query_offset!r}"
            )
        return True
    if not static or type(pattern) is patterns_module.Full:
        return False
    nq, nk = -(-query_length // block_size), -(-key_length // block_size)
    if nq * nk < MIN_BLOCKS:
        return False
    layout = block_layout(pattern, query_length, key_length, block_size, query_offset)
    return layout.computed_fraction <= max_fraction


# -- the computation -------------------------------------------------------------------


def _pad_axis(x, axis, amount, value=0):
    if not amount:
        return x
    widths = [(0, 0)] * len(x.shape)
    widths[axis] = (0, amount)
    return ops.pad(x, widths, constant_values=value)


def _to_blocks(x, num_blocks, block_size):
    """``(B, H, T, D)`` -> ``(B, H, n, bs, D)``, zero-padding T to ``n * bs``."""
    x = _pad_axis(x, 2, num_blocks * block_size - x.shape[2])
    return ops.reshape(x, (-1, x.shape[1], num_blocks, block_size, x.shape[-1]))


def _narrow(x, start, count):
    """``x[:, :, start : start + count]`` (`x` itself when that is all of it).

    `ops.slice` rather than indexing: on TensorFlow the gradient of a slice is a
    pad, while that of a strided slice is several times slower.
    """
    if start == 0 and count == x.shape[2]:
        return x
    begin = [0] * len(x.shape)
    begin[2] = start
    size = [-1 if d is None else d for d in x.shape]
    size[2] = count
    return ops.slice(x, begin, size)


def _take_blocks(x, index):
    """``x[:, :, index]``: a slice when `index` is a run of consecutive blocks."""
    start = int(index[0])
    if np.array_equal(index, np.arange(start, start + len(index))):
        return _narrow(x, start, len(index))
    return ops.take(x, index, axis=2)


def _key_slab(x, group):
    """Key blocks ``(B, H, nk, bs, D)`` -> the group's slabs ``(B, H, R, W * bs, D)``."""
    (rows, width), (heads, nk, bs, depth) = group.cols.shape, x.shape[1:]
    if group.offsets is None:
        x = _take_blocks(x, group.cols.reshape(-1))  # (B, H, R * W, bs, D)
        return ops.reshape(x, (-1, heads, rows, width * bs, depth))
    parts = []
    if len(group.shared):
        shared = _take_blocks(x, group.shared)  # (B, H, S, bs, D)
        shared = ops.reshape(shared, (-1, heads, 1, len(group.shared) * bs, depth))
        parts.append(ops.repeat(shared, rows, axis=2) if rows > 1 else shared)
    if len(group.offsets):
        # Row r takes blocks r + offset for each offset: one slice per offset of the
        # blocks padded with zero blocks on both sides.
        first, last = int(group.rows[0]), int(group.rows[-1])
        before = max(0, -(first + int(group.offsets[0])))
        after = max(0, last + int(group.offsets[-1]) - (nk - 1))
        x = ops.pad(x, [(0, 0), (0, 0), (before, after), (0, 0), (0, 0)])
        starts = [first + int(d) + before for d in group.offsets]
        band = ops.stack([_narrow(x, i, rows) for i in starts], axis=3)  # (B, H, R, O, bs, D)
        parts.append(ops.reshape(band, (-1, heads, rows, len(group.offsets) * bs, depth)))
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=3)


def _block_positions(positions, layout, group):
    """Positions broadcastable to the slab ``(B, H, R, bs, W * bs)``."""
    bs, (rows, width) = layout.block_size, group.cols.shape
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    query = ops.cast(positions.query, "int32")  # (..., Tq, 1)
    lead = tuple(query.shape[:-2])
    query = _pad_axis(query, -2, nq * bs - layout.query_length)
    query = ops.reshape(query, lead + (nq, bs, 1))
    query = ops.take(query, group.rows, axis=-3)  # (..., R, bs, 1)
    key = ops.cast(positions.key, "int32")  # (..., 1, Tk)
    lead = tuple(key.shape[:-2])
    key = _pad_axis(ops.reshape(key, lead + (layout.key_length,)), -1, nk * bs - layout.key_length)
    key = ops.take(ops.reshape(key, lead + (nk, bs)), group.cols.reshape(-1), axis=-2)
    key = ops.reshape(key, lead + (rows, 1, width * bs))  # (..., R, 1, W * bs)
    head = ops.expand_dims(ops.cast(positions.head, "int32"), -3)  # (..., H, 1, 1, 1)
    return Positions(query=query, key=key, head=head)


def _padding_masks(layout, group):
    """Numpy masks of the slab's real queries ``(R, bs, 1)`` and real keys ``(R, 1, W * bs)``."""
    bs, (rows, width) = layout.block_size, group.cols.shape
    query = group.rows[:, None] * bs + np.arange(bs) < layout.query_length
    key = (group.cols[:, :, None] * bs + np.arange(bs) < layout.key_length) & group.valid[..., None]
    return query[:, :, None], key.reshape(rows, 1, width * bs)


def _block_data_mask(mask, layout, group):
    """A data mask broadcastable to ``(B, 1, Tq, Tk)``, cut to the slab ``(b, h, R, bs, W * bs)``.

    Query-only ``(..., Tq, 1)`` and key-only ``(..., 1, Tk)`` masks are gathered
    cheaply; a full ``(..., Tq, Tk)`` mask is gathered block by block.
    """
    mask = ops.cast(mask, "bool")
    while len(mask.shape) < 4:
        mask = ops.expand_dims(mask, 0)
    bs, (rows, width) = layout.block_size, group.cols.shape
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    lead = tuple(-1 if i == 0 else d for i, d in enumerate(mask.shape[:2]))
    per_query, per_key = mask.shape[2] != 1, mask.shape[3] != 1
    if per_query:
        mask = _pad_axis(mask, 2, nq * bs - layout.query_length, False)
        mask = ops.reshape(mask, lead + (nq, bs, mask.shape[-1]))
        mask = ops.take(mask, group.rows, axis=2)  # (b, h, R, bs, Tk or 1)
    else:
        mask = ops.expand_dims(mask, 2)  # (b, h, 1, 1, Tk)
    if not per_key:
        return mask
    mask = _pad_axis(mask, -1, nk * bs - layout.key_length, False)
    if not per_query:
        mask = ops.reshape(mask, lead + (nk, bs))
        mask = ops.take(mask, group.cols.reshape(-1), axis=2)  # (b, h, R * W, bs)
        return ops.reshape(mask, lead + (rows, 1, width * bs))
    mask = ops.reshape(mask, lead + (rows, bs, nk, bs))
    mask = ops.transpose(mask, (0, 1, 2, 4, 3, 5))  # (b, h, R, nk, bs, bs)
    mask = ops.reshape(mask, lead + (rows * nk, bs, bs))
    index = (np.arange(rows)[:, None] * nk + group.cols).reshape(-1)
    mask = ops.take(mask, index, axis=2)  # (b, h, R * W, bs, bs)
    mask = ops.reshape(mask, lead + (rows, width, bs, bs))
    mask = ops.transpose(mask, (0, 1, 2, 4, 3, 5))  # (b, h, R, bs, W, bs)
    return ops.reshape(mask, lead + (rows, bs, width * bs))


def _group_attention(q, k, v, layout, group, *, score, score_mods, pattern, normalizer,
                     positions, mask, dropout, training, return_weights):  # fmt: skip
    """Attention of one row group on its slab: ``(B, H, R, bs, Dv)`` and weights."""
    q = _take_blocks(q, group.rows)  # (B, H, R, bs, D)
    k = _key_slab(k, group)  # (B, H, R, W * bs, D)
    v = _key_slab(v, group)  # (B, H, R, W * bs, Dv)
    block_positions = _block_positions(positions, layout, group)
    logits = score(q, k)  # (B, H, R, bs, W * bs)
    for mod in score_mods:
        logits = mod(logits, positions=block_positions)
    real_queries, real_keys = _padding_masks(layout, group)
    element_mask = None
    if type(pattern) is not patterns_module.Full:
        element_mask = pattern.mask(block_positions)
    for static in (real_queries, real_keys):
        if not static.all():
            static = ops.convert_to_tensor(static)
            element_mask = static if element_mask is None else ops.logical_and(element_mask, static)
    if mask is not None:
        data_mask = _block_data_mask(mask, layout, group)
        element_mask = (
            data_mask if element_mask is None else ops.logical_and(element_mask, data_mask)
        )
    # (B, H, R, bs, Dv) and (B, H, R, bs, W * bs) or None
    return engine.weighted_sum(
        normalizer, logits, v, element_mask, dropout, training, return_weights
    )


def _scatter_weights(weights, layout, batch, heads):
    """Slab weights of every group -> the dense ``(B, H, Tq, Tk)`` matrix (zeros elsewhere)."""
    bs = layout.block_size
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    updates, indices = [], []
    for w, group in zip(weights, layout.groups, strict=True):
        rows, width = group.cols.shape
        w = ops.reshape(w, (-1, heads, rows, bs, width, bs))
        w = ops.transpose(w, (2, 4, 0, 1, 3, 5))  # (R, W, B, H, bs, bs)
        updates.append(ops.reshape(w, (rows * width, -1, heads, bs, bs)))
        row_index = np.repeat(group.rows, width)
        indices.append(np.stack([row_index, group.cols.reshape(-1)], axis=1))
    updates = updates[0] if len(updates) == 1 else ops.concatenate(updates, axis=0)
    indices = np.concatenate(indices, axis=0).astype("int32")
    # Padding blocks repeat a kept block with all-zero weights: adding them changes nothing.
    dense = ops.scatter(indices, updates, (nq, nk, batch, heads, bs, bs))
    dense = ops.transpose(dense, (2, 3, 0, 4, 1, 5))  # (B, H, nq, bs, nk, bs)
    dense = ops.reshape(dense, (-1, heads, nq * bs, nk * bs))
    return dense[:, :, : layout.query_length, : layout.key_length]


def block_sparse_attention(
    query,
    key,
    value,
    *,
    block_size,
    score,
    score_mods,
    pattern,
    normalizer,
    positions,
    mask=None,
    dropout=None,
    training=None,
    return_weights=False,
    query_offset=0,
):
    """Attention computed only on the blocks `pattern` can reach; equals the dense path.

    Args:
        query: ``(B, H, Tq, D)``; key ``(B, H, Tk, D)``; value ``(B, H, Tk, Dv)``,
            with Tq and Tk known.
        block_size: Size of the square blocks.
        score, score_mods, pattern, normalizer: The components.
        positions: `keras_attn.positions.Positions` of the ``(B, H, Tq, Tk)``
            logits, ``query (..., Tq, 1)``, ``key (..., 1, Tk)``, ``head (..., H, 1, 1)``.
        mask: Bool data mask broadcastable to ``(B, 1, Tq, Tk)``, or None.
        dropout: A dropout layer applied to the weights, or None.
        return_weights: Also return the dense weights ``(B, H, Tq, Tk)``.
        query_offset: Absolute position of the first query (a Python int), the
            offset of ``positions.query``.

    Returns:
        ``(output (B, H, Tq, Dv), weights (B, H, Tq, Tk) or None)``.
    """
    tq, tk = query.shape[2], key.shape[2]
    if not (_static_int(tq) and _static_int(tk)):
        raise ValueError(
            "The block-sparse path needs static query and key lengths. "
            f"Received: query.shape={query.shape}, key.shape={key.shape}"
        )
    layout = block_layout(pattern, tq, tk, block_size, query_offset)
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    q = _to_blocks(query, nq, block_size)  # (B, H, nq, bs, D)
    k = _to_blocks(key, nk, block_size)  # (B, H, nk, bs, D)
    v = _to_blocks(value, nk, block_size)  # (B, H, nk, bs, Dv)
    outputs, weights = [], []
    for group in layout.groups:
        out, w = _group_attention(
            q, k, v, layout, group, score=score, score_mods=score_mods,
            pattern=pattern, normalizer=normalizer, positions=positions, mask=mask,
            dropout=dropout, training=training, return_weights=return_weights,
        )  # fmt: skip
        outputs.append(out)
        weights.append(w)
    output = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=2)
    if layout.order is not None:
        output = ops.take(output, layout.order, axis=2)  # rows back in order
    heads, dv = value.shape[1], value.shape[-1]
    output = ops.reshape(output, (-1, heads, nq * block_size, dv))  # (B, H, nq * bs, Dv)
    output = _narrow(output, 0, tq)  # (B, H, Tq, Dv)
    if not return_weights:
        return output, None
    return output, _scatter_weights(weights, layout, ops.shape(query)[0], heads)
