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
"""

import numpy as np
from keras import ops

from keras_attn.kernels import weighted_sum
from keras_attn.positions import Positions

__all__ = ["block_sparse_attention"]


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


def _group_attention(q, k, v, layout, group, components, positions, mask, training,
                     return_weights):  # fmt: skip
    """Attention of one row group on its slab: ``(B, H, R, bs, Dv)`` and weights."""
    q = _take_blocks(q, group.rows)  # (B, H, R, bs, D)
    k = _key_slab(k, group)  # (B, H, R, W * bs, D)
    v = _key_slab(v, group)  # (B, H, R, W * bs, Dv)
    block_positions = _block_positions(positions, layout, group)
    logits = components.score(q, k)  # (B, H, R, bs, W * bs)
    for mod in components.score_mods:
        logits = mod(logits, positions=block_positions)
    real_queries, real_keys = _padding_masks(layout, group)
    element_mask = None
    if components.pattern.kernel_form != "full":
        element_mask = components.pattern.mask(block_positions)
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
    return weighted_sum(components, logits, v, element_mask, training, return_weights)


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
    query, key, value, layout, components, positions, mask=None, training=None,
    return_weights=False,
):  # fmt: skip
    """Attention computed only on the blocks `pattern` can reach; equals the dense path.

    Args:
        query: ``(B, H, Tq, D)``; key ``(B, H, Tk, D)``; value ``(B, H, Tk, Dv)``,
            with Tq and Tk those of `layout`.
        layout: The `keras_attn.block_layout.BlockLayout` to run, made from the
            pattern of `components` for these lengths and query offset.
        components: The `keras_attn.components.Components`.
        positions: `keras_attn.positions.Positions` of the ``(B, H, Tq, Tk)``
            logits, ``query (..., Tq, 1)``, ``key (..., 1, Tk)``, ``head (..., H, 1, 1)``.
        mask: Bool data mask broadcastable to ``(B, 1, Tq, Tk)``, or None.
        return_weights: Also return the dense weights ``(B, H, Tq, Tk)``.

    Returns:
        ``(output (B, H, Tq, Dv), weights (B, H, Tq, Tk) or None)``.
    """
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
    outputs, weights = [], []
    for group in layout.groups:
        out, w = _group_attention(
            q, k, v, layout, group, components, positions, mask, training, return_weights
        )
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
