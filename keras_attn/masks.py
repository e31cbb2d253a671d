"""Data masks: padding, explicit attention masks and Keras masks, as one bool tensor.

Patterns (which pairs may interact, from positions alone) are not data masks: they
live in `keras_attn.patterns` and the engine adds them itself. A data mask here is
True where attention is allowed and broadcastable to the logits ``(B, H, Tq, Tk)``.
"""

from keras import ops

try:  # Keras keeps masks on tensors; this is how its own layers read them.
    from keras.src.backend import get_keras_mask
    from keras.src.backend import set_keras_mask
except ImportError:  # pragma: no cover

    def get_keras_mask(x):
        return getattr(x, "_keras_mask", None)

    def set_keras_mask(x, mask):
        pass


__all__ = [
    "check_attention_mask",
    "combine_masks",
    "data_mask",
    "get_keras_mask",
    "pattern_mask_or_none",
    "set_keras_mask",
    "zero_padded_inputs",
]


def combine_masks(*masks):
    """Logical and of the masks that are not None (None if all are)."""
    out = None
    for m in masks:
        if m is None:
            continue
        m = ops.cast(m, "bool")
        out = m if out is None else ops.logical_and(out, m)
    return out


def pattern_mask_or_none(pattern, positions):
    """The pattern's mask, or None when it allows every pair."""
    if pattern.kernel_form == "full":
        return None
    return pattern.mask(positions)


def check_attention_mask(attention_mask, query_length, key_length):
    """Raise if `attention_mask` is not ``(B, Tq, Tk)`` or ``(Tq, Tk)`` for these lengths.

    Raises:
        ValueError: naming the shape received and the one expected.
    """
    if attention_mask is None:
        return
    shape = tuple(attention_mask.shape)
    expected = (query_length, key_length)
    if len(shape) not in (2, 3) or any(
        a is not None and b is not None and a != b
        for a, b in zip(shape[-2:], expected, strict=True)
    ):
        raise ValueError(
            "`attention_mask` must have shape (B, Tq, Tk) or (Tq, Tk), here "
            f"Tq={expected[0]} and Tk={expected[1]}. "
            f"Received: attention_mask.shape={shape}"
        )


def data_mask(query_mask=None, value_mask=None, key_mask=None, attention_mask=None):
    """Padding and explicit masks as one bool ``(B, 1, Tq, Tk)``-broadcastable tensor, or None.

    Args:
        query_mask: ``(B, Tq)``, True for real queries, or None.
        value_mask: ``(B, Tk)``, True for real values, or None.
        key_mask: ``(B, Tk)``, True for real keys, or None.
        attention_mask: ``(B, Tq, Tk)`` or ``(Tq, Tk)`` (checked by
            `check_attention_mask`), or None.

    Returns:
        A bool tensor of rank 4 with a head axis of 1, or None if no mask is given.
    """
    masks = []
    if query_mask is not None:
        masks.append(ops.cast(query_mask, "bool")[:, :, None])  # (B, Tq, 1)
    if value_mask is not None:
        masks.append(ops.cast(value_mask, "bool")[:, None, :])  # (B, 1, Tk)
    if key_mask is not None:
        masks.append(ops.cast(key_mask, "bool")[:, None, :])  # (B, 1, Tk)
    if attention_mask is not None:
        masks.append(ops.cast(attention_mask, "bool"))
    mask = combine_masks(*masks)
    if mask is None:
        return None
    if len(mask.shape) == 2:
        mask = mask[None]
    return mask[:, None, :, :]  # (B, 1, Tq, Tk)


def zero_padded_inputs(query, value, key, query_mask=None, value_mask=None, key_mask=None):
    """The inputs with their padded rows set to zero, by selection (new tensors).

    A padded position must have no influence at all: a NaN or inf there would
    otherwise reach the projections' weight gradients as ``0 * nan``. Selecting with
    ``where`` cuts it (the caller's tensors are not modified). An input shared by
    two roles with the same mask stays one tensor.

    Args:
        query: ``(B, Tq, dim)``; value ``(B, Tk, dim_v)``; key ``(B, Tk, dim_k)``.
        query_mask: ``(B, Tq)``; value_mask, key_mask ``(B, Tk)``; True for real
            positions; None for none padded.

    Returns:
        ``(query, value, key)``.
    """
    key_rows = value_mask if key_mask is None else key_mask
    if value_mask is not None and key_mask is not None and value_mask is not key_mask:
        key_rows = combine_masks(value_mask, key_mask)
    done = {}

    def zero(x, mask):
        if mask is None:
            return x
        if (id(x), id(mask)) not in done:
            rows = ops.cast(mask, "bool")
            while len(rows.shape) < len(x.shape):
                rows = ops.expand_dims(rows, -1)
            done[(id(x), id(mask))] = ops.where(rows, x, ops.zeros_like(x))
        return done[(id(x), id(mask))]

    return zero(query, query_mask), zero(value, key_rows), zero(key, key_rows)
