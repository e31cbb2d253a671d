"""Packed sequences: several documents in one row, told apart by segment ids.

A row of ``T`` tokens may hold several documents; integer segment ids ``(B, T)`` say
which document each token belongs to. A query attends only to keys of its own
segment (ids equal), which is a data mask like padding (`segment_mask`), so every
path takes it. Positions may restart at each segment (`Segments` with
``reset_positions``): a segment starts where the id differs from the token before.
Patterns keep seeing absolute positions (the block layout is planned from them);
within a segment of consecutive tokens, a pattern that depends on ``query - key``
(causal, local, ...) is the same either way.

On the block-sparse path the segments also decide which blocks are computed: a
query block and a key block can share a segment only if the intervals
``[min id, max id]`` of their ids overlap (`block_meets`), so blocks whose segments
never meet are skipped and cost grows with the pairs kept
(`keras_attn.block_layout.segment_layout` plans how many key blocks each row of
query blocks gathers). The test never skips a block pair that shares an id, for any
ids, and is exact for packed ids (non-decreasing along the row, as a packer writes
them).
"""

from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_attn.positions import Positions

__all__ = [
    "SegmentRelative",
    "Packing",
    "Segments",
    "block_meets",
    "check_segment_ids",
    "check_segment_lengths",
    "concrete_ids",
    "for_call",
    "longest_segment",
    "relative_score_mods",
    "segment_mask",
    "segment_starts",
]


def check_segment_ids(segment_ids, name, length, what):
    """Raise a ``ValueError`` unless `segment_ids` is an integer ``(B, length)`` tensor.

    Args:
        name: The argument's name, for the message.
        length: The length expected (None: any).
        what: What that length is, e.g. ``"the query length"``.
    """
    shape = tuple(segment_ids.shape)
    if len(shape) != 2 or (None not in (length, shape[1]) and shape[1] != length):
        raise ValueError(
            f"`{name}` must have shape (B, T) with T {what} ({length}). "
            f"Received: {name}.shape={shape}"
        )
    dtype = keras.backend.standardize_dtype(segment_ids.dtype)
    if "int" not in dtype:
        raise ValueError(
            f"`{name}` must hold integers (one id per document in the row). "
            f"Received: {name}.dtype={dtype}"
        )


def segment_mask(query_ids, key_ids):
    """Bool ``(B, 1, Tq, Tk)``: True where query and key belong to the same segment."""
    return ops.equal(query_ids[:, None, :, None], key_ids[:, None, None, :])


def _in_blocks(x, num_blocks, block_size, fill):
    """``(B, T)`` -> ``(B, n, bs)``, the end padded with `fill`."""
    pad = num_blocks * block_size - x.shape[1]
    x = ops.pad(x, [(0, 0), (0, pad)], constant_values=fill) if pad else x
    return ops.reshape(x, (-1, num_blocks, block_size))


def _block_key_bounds(ids, first, num_blocks, block_size):
    """Smallest and largest ``(late, id)`` key of each block, lexicographically.

    ``late`` is 1 for an id smaller than `first` (``(B, 1)``: the first key id of
    the row, for queries and keys alike). Ordering the ids by
    ``(late, id)`` is a total order of the id values (``late`` depends on the id
    alone), so two blocks sharing an id have overlapping key intervals; it makes a
    row whose ids increase and then restart lower (packed documents then padding with
    id 0, ``[1, 1, 2, 2, 0, 0]``) ordered, whose intervals are then exact.

    Returns:
        ``(low_late, low_id, high_late, high_id)``, four ``(B, n)`` tensors, the ids in
        their own dtype (never cast: 64-bit ids that differ stay different).
    """
    dtype = keras.backend.standardize_dtype(ids.dtype)
    info = np.iinfo(dtype)
    late = ops.cast(ops.less(ids, first), "int32")
    # The padding of the last block takes no part (every block holds a real token).
    real = _in_blocks(ops.ones_like(late), num_blocks, block_size, 0) > 0
    late = _in_blocks(late, num_blocks, block_size, 0)
    ids = _in_blocks(ids, num_blocks, block_size, 0)  # (B, n, bs)
    low_late = ops.min(ops.where(real, late, 2), axis=-1)
    high_late = ops.max(ops.where(real, late, -1), axis=-1)
    high, low = ops.cast(info.max, dtype), ops.cast(info.min, dtype)
    at_low = ops.logical_and(real, ops.equal(late, low_late[..., None]))
    at_high = ops.logical_and(real, ops.equal(late, high_late[..., None]))
    low_id = ops.min(ops.where(at_low, ids, high), axis=-1)
    high_id = ops.max(ops.where(at_high, ids, low), axis=-1)
    return low_late, low_id, high_late, high_id


def _key_at_most(a_late, a_id, b_late, b_id):
    """``(a_late, a_id) <= (b_late, b_id)`` lexicographically, elementwise."""
    return ops.logical_or(
        ops.less(a_late, b_late), ops.logical_and(ops.equal(a_late, b_late), a_id <= b_id)
    )


def block_meets(query_ids, key_ids, block_size):
    """Bool ``(B, nq, nk)``: whether a query block and a key block may share a segment.

    True where the intervals ``[smallest, largest]`` of the two blocks' ids overlap,
    the ids ordered as in `_block_key_bounds` (each row from its first id up, then
    the ids below it). Never False for two blocks that share an id; for packed ids
    (non-decreasing along the row, or non-decreasing then restarting below the first
    id, as padding with id 0 after documents 1, 2, ...) exactly the blocks that share
    one.
    """
    nq = -(-query_ids.shape[1] // block_size)
    nk = -(-key_ids.shape[1] // block_size)
    # Query and key rows are ordered by the same key, from the key row's first id (the
    # start of the stream, where the queries are a later part of it, as with a cache).
    first = key_ids[:, :1]
    q = _block_key_bounds(query_ids, ops.cast(first, query_ids.dtype), nq, block_size)
    k = _block_key_bounds(key_ids, first, nk, block_size)
    q = [x[:, :, None] for x in q]  # (B, nq, 1)
    k = [x[:, None, :] for x in k]  # (B, 1, nk)
    return ops.logical_and(
        _key_at_most(q[0], q[1], k[2], k[3]), _key_at_most(k[0], k[1], q[2], q[3])
    )


def concrete_ids(segment_ids):
    """The ids as a numpy array if they are known now (not traced), else None.

    Numpy arrays, eager TensorFlow tensors, JAX arrays outside a trace and PyTorch
    tensors are known; ids inside ``tf.function`` or ``jax.jit`` are not.
    """
    if isinstance(segment_ids, np.ndarray):
        return segment_ids
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not (tf.executing_eagerly() and isinstance(segment_ids, tf.Tensor)):
            return None
    elif backend == "jax":
        import jax

        if not isinstance(segment_ids, jax.Array) or isinstance(segment_ids, jax.core.Tracer):
            return None
    elif backend == "torch":
        import torch

        if not isinstance(segment_ids, torch.Tensor):
            return None
    else:
        return None
    return np.asarray(ops.convert_to_numpy(segment_ids))


def longest_segment(segment_ids):
    """The longest run of equal consecutive ids in numpy ``(B, T)`` ids (0 when T is 0)."""
    ids = np.asarray(segment_ids)
    if ids.size == 0:
        return 0
    # Run boundaries of every row, the rows kept apart by a boundary at each row start.
    starts = np.ones(ids.shape, dtype=bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    index = np.flatnonzero(starts.reshape(-1))
    return int(np.max(np.diff(np.append(index, ids.size))))


def segment_starts(segment_ids):
    """``(B, T)`` int32: the index of the first token of each token's segment.

    A segment starts at index 0 and wherever the id differs from the one before.
    """
    ids = ops.convert_to_tensor(segment_ids)
    # The start named: jax2onnx (ONNX export on JAX) takes no arange(n) from Keras.
    index = ops.arange(0, ops.shape(ids)[1], dtype="int32")[None, :]  # (1, T)
    changed = ops.not_equal(ids[:, 1:], ids[:, :-1])  # (B, T - 1)
    first = ops.concatenate([ops.ones_like(changed[:, :1]), changed], axis=1)  # (B, T)
    # The start of the segment is the last start at or before each index.
    starts = ops.where(first, index, ops.zeros_like(index))
    if isinstance(ids.shape[1], int):
        return _running_max(starts)
    # TensorFlow's scan runs through a tf.cond, whose output loses its static shape
    # in a tf.function: give it back (the rank is what later ops need).
    return ops.reshape(ops.associative_scan(ops.maximum, starts, axis=1), ops.shape(ids))


def _running_max(x):
    """``max(x[:, :t + 1])`` at each t of non-negative ints ``(B, T)``, T known when traced.

    log2(T) maxima with shifted copies: slices every exporter converts (the
    associative scan runs through a tf.cond on TensorFlow, which tf2onnx cannot).
    """
    shift = 1
    while shift < x.shape[1]:
        shifted = ops.pad(x[:, :-shift], ((0, 0), (shift, 0)))  # (B, T), zeros in front
        x = ops.maximum(x, shifted)
        shift *= 2
    return x


def _take_starts(starts, absolute):
    """``starts[b, absolute]`` for integer positions of any shape, with a leading 1 or B."""
    if absolute.shape[0] == 1:
        flat = ops.clip(ops.reshape(absolute, (1, -1)), 0, ops.shape(starts)[1] - 1)  # (1, N)
        # Along the axis, not `take`: Keras's PyTorch take squeezes an axis of size N,
        # which PyTorch's ONNX exporter writes as an invalid Squeeze.
        flat = ops.broadcast_to(flat, (ops.shape(starts)[0], ops.shape(flat)[1]))  # (B, N)
        taken = ops.take_along_axis(starts, flat, axis=1)  # (B, N)
        return ops.reshape(taken, (-1, *ops.shape(absolute)[1:]))
    # Positions of each batch row (the block-sparse path's per-row key blocks).
    flat = ops.clip(ops.reshape(absolute, (ops.shape(starts)[0], -1)), 0, ops.shape(starts)[1] - 1)
    taken = ops.take_along_axis(starts, flat, axis=1)  # (B, N)
    return ops.reshape(taken, ops.shape(absolute))


class Segments(NamedTuple):
    """The segments of one attention call, as the layer prepares them.

    Attributes:
        query_ids: ``(B, Tq)`` integer segment ids of the queries.
        key_ids: ``(B, Tk)`` integer segment ids of the keys (every cache slot with
            a cache).
        query_starts: ``(B, Tq)``: the absolute position where each query's segment
            starts, or None when positions do not restart at segments.
        key_starts: ``(B, Tk)``: the same for each key (every cache slot with a
            cache), or None.
        same_stream: Whether queries and keys are tokens of one stream (self
            attention, or decoding into a cache), so that a segment's queries and
            keys lie within one segment length of each other; False for cross
            attention (`max_segment_length` then bounds nothing).
    """

    query_ids: object
    key_ids: object
    query_starts: object = None
    key_starts: object = None
    same_stream: bool = True

    @property
    def mask(self):
        """Bool ``(B, 1, Tq, Tk)``, True where query and key share a segment."""
        return segment_mask(self.query_ids, self.key_ids)

    @property
    def reset_positions(self):
        return self.query_starts is not None

    def query_positions(self, positions, query_offset=0):
        """Absolute query positions ``(1, ...)`` -> ``(B, ...)`` counted from their segment starts."""
        positions = ops.cast(positions, "int32")
        index = positions - ops.cast(query_offset, "int32")
        return positions - _take_starts(self.query_starts, index)

    def key_positions(self, positions):
        """Absolute key positions ``(1, ...)`` -> ``(B, ...)`` counted from their segment starts."""
        positions = ops.cast(positions, "int32")
        return positions - _take_starts(self.key_starts, positions)


class SegmentRelative:
    """A score_mod seen through positions that restart at each segment.

    The engine calls it as it calls a score_mod; it hands the score_mod the same
    positions counted from the segment start of each query and key (with a batch
    axis). Patterns are not wrapped: they keep absolute positions.
    """

    def __init__(self, score_mod, segments, query_offset=0):
        self.score_mod = score_mod
        self.segments = segments
        self.query_offset = query_offset

    def __call__(self, logits, positions=None):
        relative = Positions(
            query=self.segments.query_positions(positions.query, self.query_offset),
            key=self.segments.key_positions(positions.key),
            head=positions.head,
        )
        return self.score_mod(logits, positions=relative)


class Packing(NamedTuple):
    """A layer's settings for packed sequences (its `reset_positions`, `max_segment_length`)."""

    reset_positions: bool = False
    max_segment_length: int | None = None


def for_call(ids, query, key, cache=None, cache_update_index=None, packing=Packing()):
    """The `Segments` of one attention call, checked, or None without segment ids.

    Args:
        ids: ``(segment_ids, query_segment_ids, key_segment_ids)`` as the layer got
            them: `segment_ids` for self-attention, or the other two.
        query: The call's query ``(B, Tq, dim)``; key: its key ``(B, Tk, dim)``.
        cache: The cache ``(B, 2, S, H, D)`` (then `key_segment_ids` covers every
            slot), or None.
        cache_update_index: The cache index (the queries' first slot), or None.
        packing: The layer's `Packing`: whether positions restart at each segment
            (`Segments` then carries the segment starts), and the bound on segment
            lengths, checked on ids known now.

    Raises:
        ValueError: only one of query/key ids, ids of the wrong shape or dtype, a
            known segment longer than ``packing.max_segment_length``, or ids with
            inputs of rank > 3.
    """
    if all(i is None for i in ids):
        return None
    if len(query.shape) > 3:
        raise ValueError(
            f"Segment ids need (B, T, dim) inputs. Received: query.shape={tuple(query.shape)}"
        )
    query_length, key_length = query.shape[1], key.shape[1]
    cache_slots = None if cache is None else cache.shape[2]
    reset_positions, max_segment_length = packing
    segment_ids, query_ids, key_ids = ids
    query_name = "query_segment_ids" if query_ids is not None else "segment_ids"
    key_name = "key_segment_ids" if key_ids is not None else "segment_ids"
    query_ids = segment_ids if query_ids is None else query_ids
    key_ids = segment_ids if key_ids is None else key_ids
    if query_ids is None and key_ids is None:
        return None
    if query_ids is None or key_ids is None:
        raise ValueError(
            "Pass `segment_ids` (self-attention), or both `query_segment_ids` and "
            "`key_segment_ids`. Received: only one of them."
        )
    check_segment_ids(query_ids, query_name, query_length, "the query length")
    if cache_slots is None:
        check_segment_ids(key_ids, key_name, key_length, "the key length")
    else:
        check_segment_ids(
            key_ids,
            key_name,
            cache_slots,
            "the number of cache slots: with a cache, `key_segment_ids` covers every slot",
        )
    # One stream: self attention, or the new tokens written into a cache.
    same_stream = cache_slots is not None or query_ids is key_ids
    if same_stream:
        # With a cache the unfilled slots may hold one long run of one id: only the
        # new tokens' ids are checked (give unfilled slots an id of their own).
        check_segment_lengths(query_ids if cache_slots is not None else key_ids, max_segment_length)
    if not reset_positions:
        return Segments(query_ids, key_ids, same_stream=same_stream)
    key_starts = segment_starts(key_ids)  # (B, Tk)
    if cache_slots is not None and cache_update_index is not None:
        # Decoding: the queries are the tokens written at the cache index.
        index = ops.arange(ops.shape(query_ids)[1], dtype="int32")
        query_starts = ops.take(key_starts, index + ops.cast(cache_update_index, "int32"), axis=1)
    else:
        query_starts = segment_starts(query_ids)
    return Segments(query_ids, key_ids, query_starts, key_starts, same_stream)


def check_segment_lengths(segment_ids, max_segment_length):
    """Raise if concrete ids hold a segment longer than `max_segment_length` (None: no bound)."""
    if max_segment_length is None:
        return
    known = concrete_ids(segment_ids)
    longest = None if known is None else longest_segment(known)
    if longest is not None and longest > max_segment_length:
        raise ValueError(
            "A segment is longer than the layer's `max_segment_length` (the longest "
            "segment any call will carry, which bounds the key blocks computed when "
            f"the ids are traced). Received: a segment of {longest} tokens, with "
            f"max_segment_length={max_segment_length}"
        )


def relative_score_mods(score_mods, segments, query_offset=0):
    """The score_mods seeing positions restarted at each segment, or None (as they are)."""
    if segments is None or not segments.reset_positions or not score_mods:
        return None
    return tuple(SegmentRelative(m, segments, query_offset) for m in score_mods)
