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
    # Every arange here names its start: jax2onnx (Keras's ONNX export on JAX) takes
    # no ``stop=None``, which Keras's JAX arange passes for ``arange(n)``.
    q = ops.arange(0, query_length, dtype="int32") + ops.cast(query_offset, "int32")
    k = ops.arange(0, key_length, dtype="int32") + ops.cast(key_offset, "int32")
    h = ops.arange(0, num_heads, dtype="int32")
    return Positions(
        query=ops.reshape(q, (1, 1, query_length, 1)),
        key=ops.reshape(k, (1, 1, 1, key_length)),
        head=ops.reshape(h, (1, num_heads, 1, 1)),
    )


def encode_heads(
    encoding, query, key, *, self_attention, query_offset=0, cached=False, segments=None
):
    """Apply a position encoding to projected heads ``(B, T, H, D)``, before the score.

    Positions are absolute: queries from `query_offset` (the cache index with a
    cache), keys from it too when they are being written into a cache (`cached`),
    else from 0; with `segments` that reset positions, counted from each token's
    segment start.

    Args:
        encoding: A `keras_attn.PositionEncoding`, or None (heads returned as they are).
        query: ``(B, Tq, H, D)``; key ``(B, Tk, Hkv, D)``.
        self_attention: Whether queries and keys are one stream at the same positions
            (the encoding then sees both at once).
        query_offset: Absolute position of the first query (int or scalar tensor).
        cached: Whether the keys are the new tokens written at `query_offset`.
        segments: The call's `keras_attn.segments.Segments`, or None.

    Returns:
        ``(query, key)``, encoded.

    Raises:
        ValueError: heads of rank other than 4 (inputs of rank > 3).
    """
    if encoding is None:
        return query, key
    if len(query.shape) != 4:
        raise ValueError(
            "A position encoding needs (B, T, dim) inputs (one sequence axis). "
            f"Received: heads of shape {tuple(query.shape)}"
        )
    offset = ops.cast(query_offset, "int32")
    # Starts named for jax2onnx, as in `make_positions`.
    query_positions = ops.arange(0, ops.shape(query)[1], dtype="int32")[None, :] + offset  # (1, Tq)
    key_positions = ops.arange(0, ops.shape(key)[1], dtype="int32")[None, :]  # (1, Tk)
    if cached:
        key_positions = key_positions + offset
    if segments is not None and segments.reset_positions:
        query_positions = segments.query_positions(query_positions, offset)  # (B, Tq)
        key_positions = segments.key_positions(key_positions)  # (B, Tk)
    qh = ops.transpose(query, (0, 2, 1, 3))  # (B, H, Tq, D)
    kh = ops.transpose(key, (0, 2, 1, 3))  # (B, Hkv, Tk, D)
    if self_attention:
        qh, kh = encoding(qh, kh, query_positions[:, None, :])
    else:
        qh = encoding(qh, qh, query_positions[:, None, :])[0]
        kh = encoding(kh, kh, key_positions[:, None, :])[1]
    return ops.transpose(qh, (0, 2, 1, 3)), ops.transpose(kh, (0, 2, 1, 3))
