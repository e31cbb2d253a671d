"""Absolute positions, the coordinates that score_mods and patterns see."""

from typing import NamedTuple

from keras import ops


class Positions(NamedTuple):
    """Integer position tensors, each broadcastable to logits ``(B, H, Tq, Tk)``.

    Attributes:
        query: Absolute query positions, shape ``(1, 1, Tq, 1)``. During cached
            decoding they start at the cache index (a step at 517 sees 517).
        key: Absolute key positions, shape ``(1, 1, 1, Tk)``.
        head: Head indices, shape ``(1, H, 1, 1)``.
    """

    query: object
    key: object
    head: object


def make_positions(query_length, key_length, num_heads, query_offset=0, key_offset=0):
    """Positions for a ``(B, H, Tq, Tk)`` score matrix.

    Args:
        query_length: Tq.
        key_length: Tk.
        num_heads: H.
        query_offset: Absolute position of the first query (a Python int or an
            integer scalar tensor, e.g. the KV-cache index).
        key_offset: Absolute position of the first key.
    """
    q = ops.arange(query_length, dtype="int32") + ops.cast(query_offset, "int32")
    k = ops.arange(key_length, dtype="int32") + ops.cast(key_offset, "int32")
    h = ops.arange(num_heads, dtype="int32")
    return Positions(
        query=ops.reshape(q, (1, 1, query_length, 1)),
        key=ops.reshape(k, (1, 1, 1, key_length)),
        head=ops.reshape(h, (1, num_heads, 1, 1)),
    )
