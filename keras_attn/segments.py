"""Packed sequences: several documents in one row, told apart by segment ids.

A row of ``T`` tokens may hold several documents; integer segment ids ``(B, T)`` say
which document each token belongs to. A query attends only to keys of its own
segment (ids equal), which is a data mask like padding (`segment_mask`), so every
path takes it. Positions may restart at each segment (`Segments` with
``reset_positions``): a segment starts where the id differs from the token before.
Patterns keep seeing absolute positions (the block layout is planned from them);
within a segment of consecutive tokens, a pattern that depends on ``query - key``
(causal, local, ...) is the same either way.
"""

from typing import NamedTuple

import keras
from keras import ops

from keras_attn.positions import Positions

__all__ = ["SegmentRelative", "Segments", "check_segment_ids", "segment_mask", "segment_starts"]


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
    return ops.associative_scan(ops.maximum, starts, axis=1)


def _take_starts(starts, absolute):
    """``starts[b, absolute]`` for integer positions of any shape with a leading 1."""
    flat = ops.clip(ops.reshape(absolute, (-1,)), 0, ops.shape(starts)[1] - 1)
    taken = ops.take(starts, flat, axis=1)  # (B, N)
    return ops.reshape(taken, (-1, *ops.shape(absolute)[1:]))


class Segments(NamedTuple):
    """The segments of one attention call, as the layer prepares them.

    Attributes:
        mask: Bool ``(B, 1, Tq, Tk)``, True where query and key share a segment.
        query_starts: ``(B, Tq)``: the absolute position where each query's segment
            starts, or None when positions do not restart at segments.
        key_starts: ``(B, Tk)``: the same for each key (every cache slot with a
            cache), or None.
    """

    mask: object
    query_starts: object = None
    key_starts: object = None

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
