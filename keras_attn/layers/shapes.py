"""Shapes of the attention layers: arguments, projection equations, attention axes.

Inputs may have any rank >= 3, ``(B, *dims, features)``, as with
`keras.layers.MultiHeadAttention`: attention runs over `attention_axes` (by default
every axis of `dims`), and the other axes of `dims` act as extra batch axes. The
engine itself sees rank-3 sequences only, so `fold` turns projected heads
``(B, *dims, H, D)`` into ``(B * others, T, H, D)`` with ``T`` the product of the
attention axes, and `unfold` turns the result back.
"""

import math
import string

from keras import ops

from keras_attn.dispatch import Heads
from keras_attn.masks import heads_mask

__all__ = [
    "attention_axes_arg",
    "fold",
    "fold_mask",
    "output_shape_arg",
    "projection_equation",
    "resolve_attention_axes",
    "unfold",
    "unfold_weights",
]


def output_shape_arg(output_shape):
    """`output_shape` as a tuple of positive ints, or None (an int gives a 1-tuple).

    None, ``0``, ``()`` and ``[]`` mean the query's feature size, as in Keras.

    Raises:
        ValueError: with Keras's wording, for anything else.
    """
    if output_shape is None:
        return None
    if isinstance(output_shape, (int, list, tuple)) and not isinstance(output_shape, bool):
        if not output_shape:  # 0, () or []: unset, as Keras's layer reads them
            return None
    if isinstance(output_shape, int) and not isinstance(output_shape, bool):
        output_shape = (output_shape,)
    if not isinstance(output_shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in output_shape
    ):
        raise ValueError(
            f"Invalid `output_shape`: {output_shape}. When specified, the `output_shape` "
            "should be of type tuple, list, or int."
        )
    return tuple(output_shape)


def attention_axes_arg(attention_axes):
    """`attention_axes` as a tuple of ints, or None.

    Raises:
        ValueError: with Keras's wording, for anything but an int, list or tuple.
    """
    if attention_axes is None:
        return None
    if isinstance(attention_axes, int):
        return (attention_axes,)
    if not isinstance(attention_axes, (list, tuple)):
        raise ValueError(
            f"`attention_axes` must be an int, list, or tuple.Received: attention_axes={attention_axes}"
        )
    return tuple(attention_axes)


def resolve_attention_axes(attention_axes, input_rank):
    """Attention axes as positive input axes (Keras's rule for negative ones).

    Raises:
        ValueError: an axis that is the batch or feature axis, or out of range.
    """
    if attention_axes is None:
        return tuple(range(1, input_rank - 1))
    axes = tuple(a if a >= 0 else input_rank + a for a in attention_axes)
    if any(not 1 <= a < input_rank - 1 for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(
            "`attention_axes` must be distinct axes of the input other than the batch "
            f"axis and the feature axis. Received: attention_axes={attention_axes} for "
            f"inputs of rank {input_rank}"
        )
    return tuple(sorted(axes))


def projection_equation(free_dims, bound_dims, output_dims):
    """Keras's einsum equation of a projection, and its bias axes.

    ``free_dims`` input axes are kept, ``bound_dims`` are contracted with the kernel
    and ``output_dims`` are added: e.g. ``(2, 1, 2)`` gives ``"abc,cde->abde"``.
    """
    letters = string.ascii_lowercase
    free = letters[:free_dims]
    bound = letters[free_dims : free_dims + bound_dims]
    out = letters[free_dims + bound_dims : free_dims + bound_dims + output_dims]
    return f"{free}{bound},{bound}{out}->{free}{out}", out


def _order(input_rank, axes):
    # Batch, then the non-attention axes, then the attention axes.
    others = [a for a in range(1, input_rank - 1) if a not in axes]
    return [0, *others, *axes], others


def fold(heads, axes):
    """``(B, *dims, H, D)`` -> ``(B', T, H, D)``: other axes into the batch, attention axes into T."""
    rank = len(heads.shape) - 1  # the input's rank
    order, _ = _order(rank, axes)
    heads = ops.transpose(heads, (*order, rank - 1, rank))
    shape = ops.shape(heads)
    t = math.prod(shape[1 + len(order) - 1 - len(axes) : len(order)])
    return ops.reshape(heads, (-1, t, shape[-2], shape[-1]))


def unfold(output, query_heads, axes):
    """The inverse of `fold` for the output ``(B', Tq, H, Dv)``, shaped like the query heads."""
    rank = len(query_heads.shape) - 1
    order, _ = _order(rank, axes)
    q_shape = ops.shape(query_heads)
    folded_shape = [q_shape[a] for a in order] + [q_shape[-2], ops.shape(output)[-1]]
    output = ops.reshape(output, folded_shape)  # (B, *others, *axes, H, Dv)
    inverse = [order.index(a) for a in range(rank - 1)]
    return ops.transpose(output, (*inverse, rank - 1, rank))


def unfold_weights(weights, query_heads, key_heads, axes):
    """``(B', H, Tq, Tk)`` -> Keras's ``(B, *others, H, *query_axes, *key_axes)``."""
    rank = len(query_heads.shape) - 1
    _, others = _order(rank, axes)
    q_shape, k_shape = ops.shape(query_heads), ops.shape(key_heads)
    shape = (
        [q_shape[0]]
        + [q_shape[a] for a in others]
        + [q_shape[-2]]
        + [q_shape[a] for a in axes]
        + [k_shape[a] for a in axes]
    )
    return ops.reshape(weights, shape)


def fold_mask(mask, query_heads, key_heads, axes):
    """A Keras attention mask of high-rank inputs -> ``(B', 1 or H, Tq, Tk)``.

    The mask is broadcastable, after Keras's expansion at the head axis, to the
    scores ``(B, *others, H, *query_axes, *key_axes)``.
    """
    rank = len(query_heads.shape) - 1
    _, others = _order(rank, axes)
    n = len(axes)
    scores_rank = 1 + len(others) + 1 + 2 * n
    mask = ops.cast(mask, "bool")
    while len(mask.shape) < scores_rank:
        mask = ops.expand_dims(mask, axis=-2 * n - 1)
    q_shape, k_shape = ops.shape(query_heads), ops.shape(key_heads)
    heads = mask.shape[1 + len(others)]
    heads = 1 if heads == 1 else q_shape[-2]
    full = (
        [q_shape[0]]
        + [q_shape[a] for a in others]
        + [heads]
        + [q_shape[a] for a in axes]
        + [k_shape[a] for a in axes]
    )
    mask = ops.broadcast_to(mask, full)
    tq = math.prod(full[2 + len(others) : 2 + len(others) + n])
    tk = math.prod(full[2 + len(others) + n :])
    return ops.reshape(mask, (-1, heads, tq, tk))


def fold_heads(heads, axes, pattern):
    """`keras_attn.dispatch.Heads` ``(B, *axes, H, D)`` folded into one sequence axis.

    Args:
        heads: Heads of inputs of rank > 3, with a mask in Keras's layout (or None).
        axes: The attention axes.
        pattern: The call's pattern.

    Returns:
        `Heads` ``(B', T, H, D)`` with a ``(B'|1, 1|H, Tq, Tk)`` mask.

    Raises:
        ValueError: a pattern other than full over several axes.
    """
    query, key, value = heads.query, heads.key, heads.value
    if len(axes) > 1 and pattern.kernel_form != "full":
        raise ValueError(
            "A pattern (or use_causal_mask) orders keys along one axis, so it cannot "
            f"apply to attention over several axes. Received: attention_axes={axes}"
        )
    mask = None if heads.mask is None else heads_mask(fold_mask(heads.mask, query, key, axes))
    return Heads(fold(query, axes), fold(key, axes), fold(value, axes), mask)


def unfold_heads(output, weights, heads, axes):
    """The output (and weights, if any) of `fold_heads`'s heads, in the inputs' layout."""
    if weights is not None:
        weights = unfold_weights(weights, heads.query, heads.key, axes)
    return unfold(output, heads.query, axes), weights


def scores_shape(query_shape, key_shape, num_heads, attention_axes=None):
    """The shape of the weights a layer returns: ``(B, H, Tq, Tk)`` for rank-3 inputs.

    For inputs of higher rank, ``(B, *other axes, H, *query axes, *key axes)``, as
    `keras.layers.MultiHeadAttention` returns them.
    """
    if len(query_shape) == 3:
        return (query_shape[0], num_heads, query_shape[1], key_shape[1])
    axes = resolve_attention_axes(attention_axes, len(query_shape))
    others = [a for a in range(1, len(query_shape) - 1) if a not in axes]
    return (
        query_shape[0],
        *(query_shape[a] for a in others),
        num_heads,
        *(query_shape[a] for a in axes),
        *(key_shape[a] for a in axes),
    )


def check_input_shapes(query_shape, value_shape, key_shape):
    """Raise unless query, value and key have one rank (>= 3) and value/key agree.

    Raises:
        ValueError: naming the shapes received.
    """
    if tuple(value_shape[1:-1]) != tuple(key_shape[1:-1]):
        raise ValueError(
            "All dimensions of `value` and `key`, except the last one, must be equal. "
            f"Received: value_shape={tuple(value_shape)} and key_shape={tuple(key_shape)}"
        )
    for arg, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
        if len(shape) != len(query_shape) or len(shape) < 3:
            raise ValueError(
                f"`query`, `value` and `key` must have one rank, at least 3 "
                f"(batch, ..., features). Received: query.shape={tuple(query_shape)}, "
                f"value.shape={tuple(value_shape)}, key.shape={tuple(key_shape)}"
            )
        if shape[-1] is None:
            raise ValueError(
                f"The last dimension of `{arg}` must be known. Received: {arg}.shape={tuple(shape)}"
            )
