"""Block-sparse execution: compute only the score blocks a pattern can reach.

The ``(Tq, Tk)`` score matrix is cut into ``block_size`` x ``block_size`` blocks. Once
per shape, outside the traced computation (numpy, cached), the pattern's
``block_mask`` says which blocks hold at least one allowed pair; that is the
`keras_attn.block_layout.BlockLayout`, planned by `keras_attn.dispatch` and handed
to `block_sparse_attention`, which only runs it. At run time each row of query blocks takes its kept key blocks as one
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
softmax without dropout takes `keras_attn.kernels.softmax_weighted_sum`, whose
hand-written gradient makes fewer passes over the slabs.

With packed sequences (a `keras_attn.block_layout.SegmentLayout`), each batch row
gathers only those of a row's key blocks that its segments meet, into a static
number of slots (a masked dummy block fills the rest): batch-dependent slabs
``(B, H, R, bs, W * bs)``, the segment mask applied inside them from the ids.
"""

from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_attn.block_layout import SegmentLayout
from keras_attn.kernels import weighted_sum
from keras_attn.positions import Positions
from keras_attn.segments import block_meets as segment_meets

__all__ = ["block_sparse_attention"]


def _take(x, indices, axis):
    """``ops.take(x, indices, axis=axis)`` for the non-negative indices of block tables.

    On PyTorch it gathers with ``index_select`` and a reshape: Keras's PyTorch `take`
    ends with a ``squeeze(axis)`` that torch.onnx exports as an ONNX Squeeze of a
    non-unit axis, which onnxruntime refuses to load.
    """
    if keras.backend.backend() != "torch":
        return ops.take(x, indices, axis=axis)
    import torch

    x = ops.convert_to_tensor(x)
    indices = ops.convert_to_tensor(indices).long()
    axis = axis % x.ndim
    shape = (*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])
    return torch.index_select(x, axis, indices.reshape(-1)).reshape(shape)


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
    return _take(x, index, axis=2)


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
    query = _take(query, group.rows, axis=-3)  # (..., R, bs, 1)
    key = ops.cast(positions.key, "int32")  # (..., 1, Tk)
    lead = tuple(key.shape[:-2])
    key = _pad_axis(ops.reshape(key, lead + (layout.key_length,)), -1, nk * bs - layout.key_length)
    key = _take(ops.reshape(key, lead + (nk, bs)), group.cols.reshape(-1), axis=-2)
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
        mask = _take(mask, group.rows, axis=2)  # (b, h, R, bs, Tk or 1)
    else:
        mask = ops.expand_dims(mask, 2)  # (b, h, 1, 1, Tk)
    if not per_key:
        return mask
    mask = _pad_axis(mask, -1, nk * bs - layout.key_length, False)
    if not per_query:
        mask = ops.reshape(mask, lead + (nk, bs))
        mask = _take(mask, group.cols.reshape(-1), axis=2)  # (b, h, R * W, bs)
        return ops.reshape(mask, lead + (rows, 1, width * bs))
    mask = ops.reshape(mask, lead + (rows, bs, nk, bs))
    mask = ops.transpose(mask, (0, 1, 2, 4, 3, 5))  # (b, h, R, nk, bs, bs)
    mask = ops.reshape(mask, lead + (rows * nk, bs, bs))
    index = (np.arange(rows)[:, None] * nk + group.cols).reshape(-1)
    mask = _take(mask, index, axis=2)  # (b, h, R * W, bs, bs)
    mask = ops.reshape(mask, lead + (rows, width, bs, bs))
    mask = ops.transpose(mask, (0, 1, 2, 4, 3, 5))  # (b, h, R, bs, W, bs)
    return ops.reshape(mask, lead + (rows, bs, width * bs))


class _Weighing(NamedTuple):
    """How a slab's logits become outputs: the components, dropout and weights asked for."""

    components: object
    training: object = None
    return_weights: bool = False


def _group_attention(q, k, v, layout, group, weighing, positions, mask):
    """Attention of one row group on its slab: ``(B, H, R, bs, Dv)`` and weights."""
    q = _take_blocks(q, group.rows)  # (B, H, R, bs, D)
    k = _key_slab(k, group)  # (B, H, R, W * bs, D)
    v = _key_slab(v, group)  # (B, H, R, W * bs, Dv)
    block_positions = _block_positions(positions, layout, group)
    real_queries, real_keys = _padding_masks(layout, group)
    data_mask = None if mask is None else _block_data_mask(mask, layout, group)
    return _slab_attention(q, k, v, weighing, block_positions, (real_queries, real_keys), data_mask)


def _slab_attention(q, k, v, weighing, block_positions, static_masks, data_mask):
    """Score, score_mods, the element mask and the normalizer on one slab."""
    components = weighing.components
    logits = components.score(q, k)  # (B, H, R, bs, W * bs)
    for mod in components.score_mods:
        logits = mod(logits, positions=block_positions)
    element_mask = None
    if components.pattern.kernel_form != "full":
        element_mask = components.pattern.mask(block_positions)
    for static in static_masks:
        if not static.all():
            static = ops.convert_to_tensor(static)
            element_mask = static if element_mask is None else ops.logical_and(element_mask, static)
    if data_mask is not None:
        element_mask = (
            data_mask if element_mask is None else ops.logical_and(element_mask, data_mask)
        )
    # (B, H, R, bs, Dv) and (B, H, R, bs, W * bs) or None
    return weighted_sum(
        components, logits, v, element_mask, weighing.training, weighing.return_weights
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


# -- segments: blocks chosen per batch row ---------------------------------------------


def _take_per_batch(x, index):
    """``x[b, index[b]]``: ``x (B|1, N, ...)`` and int ``index (B, M)`` -> ``(B, M, ...)``."""
    if x.shape[0] == 1:
        return _take(x[0], index, axis=0)
    offsets = ops.arange(ops.shape(index)[0], dtype="int32")[:, None] * x.shape[1]  # (B, 1)
    flat = ops.reshape(x, (-1, *x.shape[2:]))  # (B * N, ...)
    return _take(flat, index + offsets, axis=0)


def _segment_cols(meets, group, width):
    """The key blocks each batch row and row of the group gathers, given `meets`.

    The group's own blocks (``cols`` where ``valid``) whose segments meet the row's,
    in order, then the others as masked dummies, cut to `width` slots.

    Returns:
        ``(cols (B, R, W) int32, valid (B, R, W) bool, overflow)``: overflow is bool
        ``(B, R)``, True where a row keeps more blocks than `width`, or None where it
        cannot (`width` is the group's own).
    """
    rows, full = group.cols.shape
    nk = meets.shape[2]
    meets = _take(meets, group.rows, axis=1)  # (B, R, nk)
    index = (np.arange(rows)[:, None] * nk + group.cols).reshape(-1)
    kept = _take(ops.reshape(meets, (-1, rows * nk)), index, axis=1)  # (B, R * Wg)
    kept = ops.logical_and(ops.reshape(kept, (-1, rows, full)), group.valid)  # (B, R, Wg)
    # Unique scores, kept blocks first and in order: the top `width` are the slots.
    slot = np.arange(full, dtype="float32")
    score = ops.where(kept, full - slot, -slot)
    top, chosen = ops.top_k(score, k=width)  # (B, R, W)
    chosen = ops.cast(chosen, "int32") + np.arange(rows, dtype="int32")[:, None] * full
    cols = _take(group.cols.reshape(-1), chosen, axis=0)  # (B, R, W)
    overflow = None
    if width < full:
        overflow = ops.sum(ops.cast(kept, "int32"), axis=-1) > width  # (B, R)
    return cols, top > 0, overflow


def _segment_key_slab(x, cols):
    """Key blocks ``(B, nk, H, bs, D)`` -> each batch row's slabs ``(B, H, R, W * bs, D)``."""
    rows, width = cols.shape[1:]
    heads, bs, depth = x.shape[2:]
    x = _take_per_batch(x, ops.reshape(cols, (-1, rows * width)))  # (B, R * W, H, bs, D)
    x = ops.reshape(x, (-1, rows, width, heads, bs, depth))
    x = ops.transpose(x, (0, 3, 1, 2, 4, 5))  # (B, H, R, W, bs, D)
    return ops.reshape(x, (-1, heads, rows, width * bs, depth))


def _key_blocks_of(x, layout, cols):
    """Per-key ``(B|1, Tk)`` -> the slab's keys ``(B, 1, R, 1, W * bs)``."""
    rows, width = cols.shape[1:]
    nk, bs = layout.num_key_blocks, layout.block_size
    x = _pad_axis(x, 1, nk * bs - layout.key_length)
    x = ops.reshape(x, (-1, nk, bs))
    x = _take_per_batch(x, ops.reshape(cols, (-1, rows * width)))  # (B, R * W, bs)
    return ops.reshape(x, (-1, 1, rows, 1, width * bs))


def _query_blocks_of(x, layout, group):
    """Per-query ``(B, Tq)`` -> the slab's queries ``(B, 1, R, bs, 1)``."""
    nq, bs = layout.num_query_blocks, layout.block_size
    x = _pad_axis(x, 1, nq * bs - layout.query_length)
    x = _take(ops.reshape(x, (-1, nq, bs)), group.rows, axis=1)  # (B, R, bs)
    return ops.expand_dims(ops.expand_dims(x, 1), -1)


def _segment_positions(positions, layout, group, cols):
    """Positions of the slab ``(B, H, R, bs, W * bs)``; the keys differ per batch row."""
    static = _block_positions(positions, layout, group._replace(cols=group.cols[:, :1]))
    key = ops.cast(positions.key, "int32")
    if any(d != 1 for d in key.shape[:-1]):
        raise ValueError(
            "The segment-aware block-sparse path takes key positions of shape "
            f"(1, 1, 1, Tk). Received: positions.key.shape={tuple(key.shape)}"
        )
    key = _key_blocks_of(ops.reshape(key, (1, layout.key_length)), layout, cols)
    return Positions(query=static.query, key=key, head=static.head)


def _segment_data_mask(mask, layout, group, cols):
    """A data mask broadcastable to ``(B, 1, Tq, Tk)``, cut to the slab ``(B, h, R, bs, W * bs)``."""
    mask = ops.cast(mask, "bool")
    while len(mask.shape) < 4:
        mask = ops.expand_dims(mask, 0)
    bs, rows, width = layout.block_size, *cols.shape[1:]
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    heads = mask.shape[1]
    per_query, per_key = mask.shape[2] != 1, mask.shape[3] != 1
    if per_query:
        mask = _pad_axis(mask, 2, nq * bs - layout.query_length, False)
        mask = ops.reshape(mask, (-1, heads, nq, bs, mask.shape[-1]))
        mask = _take(mask, group.rows, axis=2)  # (b, h, R, bs, Tk or 1)
    if not per_key:
        return mask if per_query else ops.expand_dims(mask, 2)  # (b, h, R|1, bs|1, 1)
    mask = _pad_axis(mask, -1, nk * bs - layout.key_length, False)
    if not per_query:
        mask = ops.transpose(ops.reshape(mask, (-1, heads, nk, bs)), (0, 2, 1, 3))  # (b, nk, h, bs)
        mask = _take_per_batch(mask, ops.reshape(cols, (-1, rows * width)))  # (B, R * W, h, bs)
        mask = ops.reshape(mask, (-1, rows, width, heads, bs))
        mask = ops.transpose(mask, (0, 3, 1, 2, 4))  # (B, h, R, W, bs)
        return ops.reshape(mask, (-1, heads, rows, 1, width * bs))
    mask = ops.reshape(mask, (-1, heads, rows, bs, nk, bs))
    mask = ops.transpose(mask, (0, 2, 4, 1, 3, 5))  # (b, R, nk, h, bs, bs)
    mask = ops.reshape(mask, (-1, rows * nk, heads, bs, bs))
    index = cols + np.arange(rows, dtype="int32")[:, None] * nk  # (B, R, W)
    mask = _take_per_batch(mask, ops.reshape(index, (-1, rows * width)))  # (B, R * W, h, bs, bs)
    mask = ops.reshape(mask, (-1, rows, width, heads, bs, bs))
    mask = ops.transpose(mask, (0, 3, 1, 4, 2, 5))  # (B, h, R, bs, W, bs)
    return ops.reshape(mask, (-1, heads, rows, bs, width * bs))


class _SegmentRows(NamedTuple):
    """What picks each batch row's key blocks for one group: its width and the meets."""

    width: int
    meets: object  # (B, nq, nk) bool
    segments: object  # keras_attn.segments.Segments


def _segment_group_attention(q, k_t, v_t, layout, group, rows, weighing, positions, mask):
    """`_group_attention` on each batch row's own key blocks (those its segments meet).

    Returns:
        ``(output (B, H, R, bs, Dv), weights or None, cols (B, R, W))``; the rows
        that keep more blocks than `width` are NaN.
    """
    query_ids, key_ids = rows.segments.query_ids, rows.segments.key_ids
    cols, valid, overflow = _segment_cols(rows.meets, group, rows.width)
    q = _take_blocks(q, group.rows)  # (B, H, R, bs, D)
    k = _segment_key_slab(k_t, cols)  # (B, H, R, W * bs, D)
    v = _segment_key_slab(v_t, cols)  # (B, H, R, W * bs, Dv)
    block_positions = _segment_positions(positions, layout, group, cols)
    real_queries = _padding_masks(layout, group)[0]  # (R, bs, 1)
    bs = layout.block_size
    real_keys = ops.logical_and(
        cols[..., None] * bs + np.arange(bs, dtype="int32") < layout.key_length,
        valid[..., None],
    )  # (B, R, W, bs)
    real_keys = ops.reshape(real_keys, (-1, 1, *cols.shape[1:2], 1, cols.shape[2] * bs))
    # The ids in their own dtype: 64-bit ids that differ must stay different.
    same = ops.equal(
        _query_blocks_of(query_ids, layout, group), _key_blocks_of(key_ids, layout, cols)
    )  # (B, 1, R, bs, W * bs)
    data_mask = ops.logical_and(real_keys, same)
    if mask is not None:
        data_mask = ops.logical_and(data_mask, _segment_data_mask(mask, layout, group, cols))
    out, w = _slab_attention(q, k, v, weighing, block_positions, (real_queries,), data_mask)
    if overflow is not None:
        # A row needing more blocks than the bound allows: NaN, never a silent drop.
        poison = overflow[:, None, :, None, None]  # (B, 1, R, 1, 1)
        out = ops.where(poison, ops.full_like(out, float("nan")), out)
        if w is not None:
            w = ops.where(poison, ops.full_like(w, float("nan")), w)
    return out, w, cols


def _scatter_segment_weights(weights, cols, layout, heads):
    """Slab weights with per-batch key blocks -> the dense ``(B, H, Tq, Tk)`` matrix."""
    bs = layout.block_size
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    batch = ops.shape(cols[0])[0]
    updates, indices = [], []
    for w, group, c in zip(weights, layout.groups, cols, strict=True):
        rows, width = c.shape[1:]
        w = ops.reshape(w, (-1, heads, rows, bs, width, bs))
        w = ops.transpose(w, (0, 2, 4, 1, 3, 5))  # (B, R, W, H, bs, bs)
        updates.append(ops.reshape(w, (-1, heads, bs, bs)))
        b_index = ops.arange(batch, dtype="int32")[:, None, None] + ops.zeros_like(c)
        r_index = ops.convert_to_tensor(group.rows[:, None].astype("int32")) + ops.zeros_like(c)
        index = ops.stack([b_index, r_index, c], axis=-1)  # (B, R, W, 3)
        indices.append(ops.reshape(index, (-1, 3)))
    updates = updates[0] if len(updates) == 1 else ops.concatenate(updates, axis=0)
    indices = indices[0] if len(indices) == 1 else ops.concatenate(indices, axis=0)
    # Dummy slots hold all-zero weights: adding them changes nothing.
    dense = ops.scatter(indices, updates, (batch, nq, nk, heads, bs, bs))
    dense = ops.transpose(dense, (0, 3, 1, 4, 2, 5))  # (B, H, nq, bs, nk, bs)
    dense = ops.reshape(dense, (-1, heads, nq * bs, nk * bs))
    return dense[:, :, : layout.query_length, : layout.key_length]


def block_sparse_attention(
    query,
    key,
    value,
    layout,
    components,
    positions,
    mask=None,
    *,
    training=None,
    return_weights=False,
    segments=None,
):
    """Attention computed only on the blocks `pattern` can reach; equals the dense path.

    Args:
        query: ``(B, H, Tq, D)``; key ``(B, H, Tk, D)``; value ``(B, H, Tk, Dv)``,
            with Tq and Tk those of `layout`.
        layout: The `keras_attn.block_layout.BlockLayout` to run, made from the
            pattern of `components` for these lengths and query offset; or its
            `keras_attn.block_layout.SegmentLayout`, with `segments`. Then each batch
            row computes only the blocks its segments meet
            (`keras_attn.segments.block_meets`), and `mask` should not hold the
            segment mask (it is applied per slab). A row that keeps more blocks than
            its width (a traced call exceeding ``max_segment_length``) gets NaN
            outputs and weights.
        components: The `keras_attn.components.Components`.
        positions: `keras_attn.positions.Positions` of the ``(B, H, Tq, Tk)``
            logits, ``query (..., Tq, 1)``, ``key (..., 1, Tk)``, ``head (..., H, 1, 1)``.
        mask: Bool data mask broadcastable to ``(B, 1, Tq, Tk)``, or None.
        training: Whether dropout (and training-only noise) is active.
        return_weights: Also return the dense weights ``(B, H, Tq, Tk)``.
        segments: The call's `keras_attn.segments.Segments` (its ``query_ids``
            ``(B, Tq)`` and ``key_ids`` ``(B, Tk)``), with a `SegmentLayout`.

    Returns:
        ``(output (B, H, Tq, Dv), weights (B, H, Tq, Tk) or None)``.

    Raises:
        ValueError: inputs of other lengths than the layout's; a `SegmentLayout`
            without `segments`.
    """
    segment_layout = None
    if isinstance(layout, SegmentLayout):
        if segments is None:
            raise ValueError(
                "A SegmentLayout runs with the call's segments. Received: segments=None"
            )
        segment_layout, layout = layout, layout.layout
    tq, tk, block_size = layout.query_length, layout.key_length, layout.block_size
    if (query.shape[2], key.shape[2]) != (tq, tk):
        raise ValueError(
            f"The block layout was made for Tq={tq} and Tk={tk}. "
            f"Received: query.shape={query.shape}, key.shape={key.shape}"
        )
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    q = _to_blocks(query, nq, block_size)  # (B, H, nq, bs, D)
    k = _to_blocks(key, nk, block_size)  # (B, H, nk, bs, D)
    v = _to_blocks(value, nk, block_size)  # (B, H, nk, bs, Dv)
    outputs, weights, cols = [], [], []
    weighing = _Weighing(components, training, return_weights)
    if segment_layout is None:
        for group in layout.groups:
            out, w = _group_attention(q, k, v, layout, group, weighing, positions, mask)
            outputs.append(out)
            weights.append(w)
    else:
        meets = segment_layout.meets  # measured when planned, where the ids were concrete
        if meets is None:
            meets = segment_meets(segments.query_ids, segments.key_ids, block_size)  # (B, nq, nk)
        k = ops.transpose(k, (0, 2, 1, 3, 4))  # (B, nk, H, bs, D)
        v = ops.transpose(v, (0, 2, 1, 3, 4))  # (B, nk, H, bs, Dv)
        for group, width in zip(layout.groups, segment_layout.widths, strict=True):
            rows = _SegmentRows(width, meets, segments)
            out, w, c = _segment_group_attention(
                q, k, v, layout, group, rows, weighing, positions, mask
            )
            outputs.append(out)
            weights.append(w)
            cols.append(c)
    output = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=2)
    if layout.order is not None:
        output = _take(output, layout.order, axis=2)  # rows back in order
    heads, dv = value.shape[1], value.shape[-1]
    output = ops.reshape(output, (-1, heads, nq * block_size, dv))  # (B, H, nq * bs, Dv)
    output = _narrow(output, 0, tq)  # (B, H, Tq, Dv)
    if not return_weights:
        return output, None
    if segment_layout is not None:
        return output, _scatter_segment_weights(weights, cols, layout, heads)
    return output, _scatter_weights(weights, layout, ops.shape(query)[0], heads)
