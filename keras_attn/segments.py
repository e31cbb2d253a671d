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
    "Segments",
    "block_meets",
    "check_segment_ids",
    "concrete_ids",
    "longest_segment",
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


def _block_id_bounds(ids, num_blocks, block_size):
    """Smallest and largest id of each block, two ``(B, n)`` int32 tensors."""
    ids = ops.cast(ids, "int32")
    length = ids.shape[1]
    pad = num_blocks * block_size - length
    real = ops.arange(num_blocks * block_size) < length  # (n * bs,)
    real = ops.reshape(real, (1, num_blocks, block_size))
    ids = ops.pad(ids, [(0, 0), (0, pad)]) if pad else ids
    ids = ops.reshape(ids, (-1, num_blocks, block_size))  # (B, n, bs)
    # The padding of the last block takes no part (every block holds a real token).
    high, low = 2**31 - 1, -(2**31)
    smallest = ops.min(ops.where(real, ids, high), axis=-1)
    largest = ops.max(ops.where(real, ids, low), axis=-1)
    return smallest, largest


def block_meets(query_ids, key_ids, block_size):
    """Bool ``(B, nq, nk)``: whether a query block and a key block may share a segment.

    True where the intervals ``[min id, max id]`` of the two blocks overlap. Never
    False for two blocks that share an id; for packed ids (non-decreasing along the
    row) exactly the blocks that share one.
    """
    nq = -(-query_ids.shape[1] // block_size)
    nk = -(-key_ids.shape[1] // block_size)
    q_low, q_high = _block_id_bounds(query_ids, nq, block_size)  # (B, nq)
    k_low, k_high = _block_id_bounds(key_ids, nk, block_size)  # (B, nk)
    return ops.logical_and(
        q_low[:, :, None] <= k_high[:, None, :], k_low[:, None, :] <= q_high[:, :, None]
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
    index = ops.arange(ops.shape(ids)[1], dtype="int32")[None, :]  # (1, T)
    changed = ops.not_equal(ids[:, 1:], ids[:, :-1])  # (B, T - 1)
    first = ops.concatenate([ops.ones_like(changed[:, :1]), changed], axis=1)  # (B, T)
    # The start of the segment is the last start at or before each index.
    starts = ops.where(first, index, ops.zeros_like(index))
    # TensorFlow's scan runs through a tf.cond, whose output loses its static shape
    # in a tf.function: give it back (the rank is what later ops need).
    return ops.reshape(ops.associative_scan(ops.maximum, starts, axis=1), ops.shape(ids))


def _take_starts(starts, absolute):
    """``starts[b, absolute]`` for integer positions of any shape, with a leading 1 or B."""
    if absolute.shape[0] == 1:
        flat = ops.clip(ops.reshape(absolute, (-1,)), 0, ops.shape(starts)[1] - 1)
        taken = ops.take(starts, flat, axis=1)  # (B, N)
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
    """

    query_ids: object
    key_ids: object
    query_starts: object = None
    key_starts: object = None

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
