"""Data masks: padding, explicit attention masks and Keras masks, as one bool tensor.

Patterns (which pairs may interact, from positions alone) are not data masks: they
live in `keras_attn.patterns` and the engine adds them itself. A data mask here is
True where attention is allowed and broadcastable to the logits ``(B, H, Tq, Tk)``.
"""

from typing import NamedTuple

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
    "Padding",
    "call_mask",
    "check_attention_mask",
    "check_call",
    "combine_masks",
    "data_mask",
    "get_keras_mask",
    "heads_mask",
    "keras_form",
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


def heads_mask(mask):
    """A Keras attention mask as a bool ``(B|1, 1|H, Tq, Tk)`` tensor (None stays None).

    ``(Tq, Tk)`` and ``(B, Tq, Tk)`` (or anything broadcastable to it) get a head axis
    of 1, so a batch axis is never read as heads; ``(B, H, Tq, Tk)`` is per head.
    """
    if mask is None:
        return None
    mask = ops.cast(mask, "bool")
    if len(mask.shape) == 2:
        return mask[None, None]
    if len(mask.shape) == 3:
        return mask[:, None]
    return mask


def keras_form(mask):
    """A ``(B|1, 1|H, Tq, Tk)`` mask as Keras's layers pass it: ``(B|1, Tq, Tk)`` unless per head."""
    if mask is not None and mask.shape[1] == 1:
        return mask[:, 0]
    return mask


def check_attention_mask(attention_mask, query_length, key_length, num_heads=1):
    """Raise unless `attention_mask` fits the logits ``(B, H, Tq, Tk)``.

    It may be ``(Tq, Tk)``, ``(B, Tq, Tk)`` or anything broadcastable to it, or
    ``(B, num_heads, Tq, Tk)`` per head (a head axis of 1 broadcasts).

    Raises:
        ValueError: naming the shape received and the lengths expected.
    """
    if attention_mask is None:
        return
    shape = tuple(attention_mask.shape)
    expected = (query_length, key_length)
    heads = shape[1] if len(shape) == 4 else 1
    if (
        len(shape) not in (2, 3, 4)
        or heads not in (1, None, num_heads)
        or any(
            a is not None and b is not None and a not in (1, b)
            for a, b in zip(shape[-2:], expected, strict=True)
        )
    ):
        raise ValueError(
            "`attention_mask` must be broadcastable to (B, Tq, Tk) or, per head, be "
            f"(B, {num_heads}, Tq, Tk); here Tq={expected[0]} and Tk={expected[1]}. "
            f"Received: attention_mask.shape={shape}"
        )


class Padding(NamedTuple):
    """The padding masks of one call: bool ``(B, Tq)`` and ``(B, Tk)``, or None each.

    `of_call` takes the explicit ones, else the inputs' Keras masks (read, never
    removed: the caller's tensors keep their masks for the next reader).
    """

    query: object = None
    value: object = None
    key: object = None

    @classmethod
    def of_call(cls, query, value, key, query_mask=None, value_mask=None, key_mask=None):
        if query_mask is None:
            query_mask = get_keras_mask(query)
        if value_mask is None:
            value_mask = get_keras_mask(value)
        if key_mask is None and key is not value:
            key_mask = get_keras_mask(key)
        return cls(query_mask, value_mask, key_mask)

    @property
    def any(self):
        return any(m is not None for m in self)

    def check(self, query, value, key):
        """Raise unless each mask covers its input's axes but the features, naming the argument.

        Raises:
            ValueError: a mask whose shape is not its input's without the last axis.
        """
        for name, mask, x in (
            ("query_mask", self.query, query),
            ("value_mask", self.value, value),
            ("key_mask", self.key, key),
        ):
            if mask is None:
                continue
            shape, expected = tuple(mask.shape), tuple(x.shape[:-1])
            if len(shape) != len(expected) or any(
                a is not None and b is not None and a != b
                for a, b in zip(shape, expected, strict=True)
            ):
                raise ValueError(
                    f"`{name}` must have its input's shape without the feature axis, "
                    f"{expected} (B, T for (B, T, dim) inputs). Received: {name}.shape={shape}"
                )

    def scores_mask(self, attention_axes):
        """The padding of inputs of rank > 3 in the layout of Keras's scores, or None.

        Args:
            attention_axes: The input axes attended over (sorted, positive).

        Returns:
            Bool ``(B, *other axes, *query axes, *key axes)`` (other axes are those
            neither batch, features nor attended), which Keras's expansion at the
            head axis makes broadcastable to the scores; for one trailing axis it is
            Keras's own ``query_mask[..., None] & value_mask[..., None, :]``.
        """
        if not self.any:
            return None
        rank = len(next(m for m in self if m is not None).shape)  # the input's rank - 1
        others = [a for a in range(1, rank) if a not in attention_axes]
        order = [0, *others, *attention_axes]
        n = len(attention_axes)

        def laid_out(mask, at_query):
            mask = ops.transpose(ops.cast(mask, "bool"), order)  # (B, *others, *axes)
            for _ in range(n):
                mask = ops.expand_dims(mask, -1 if at_query else -n - 1)
            return mask

        query = None if self.query is None else laid_out(self.query, True)
        keys = [laid_out(m, False) for m in (self.value, self.key) if m is not None]
        return combine_masks(query, *keys)

    def zero_inputs(self, query, value, key):
        """`zero_padded_inputs` with these masks."""
        return zero_padded_inputs(query, value, key, self.query, self.value, self.key)


def check_call(query, value, key, padding, attention_mask, cache, num_heads):
    """Check one call's masks against its inputs (`Padding` and the attention mask).

    Raises:
        ValueError: a cache with inputs of rank > 3, or a mask of the wrong shape
            (naming the argument).
    """
    padding.check(query, value, key)
    if len(query.shape) > 3:
        if cache is not None:
            raise ValueError(
                "A cache needs (B, T, dim) inputs (one sequence axis). "
                f"Received: query.shape={tuple(query.shape)}"
            )
        return
    key_length = key.shape[1] if cache is None else cache.shape[2]
    check_attention_mask(attention_mask, query.shape[1], key_length, num_heads)


def call_mask(padding, attention_mask, cache_mask=None, attention_axes=None):
    """The data mask of one call: padding, the explicit mask and the cache's written slots.

    Args:
        padding: The call's `Padding`.
        attention_mask: The call's explicit mask, or None.
        cache_mask: Bool ``(1, 1, 1, S)`` of the cache slots written, or None.
        attention_axes: For inputs of rank > 3, the axes attended over; None for
            ``(B, T, dim)`` inputs.

    Returns:
        Bool ``(B|1, 1|H, Tq, Tk)``, or None; for inputs of rank > 3 a mask in the
        layout of Keras's attention masks, ``(B, *other axes, *query axes, *key
        axes)`` (folded later with the attention axes).
    """
    if attention_axes is not None:
        explicit = None if attention_mask is None else ops.cast(attention_mask, "bool")
        return combine_masks(explicit, padding.scores_mask(attention_axes))
    return combine_masks(
        data_mask(padding.query, padding.value, padding.key),
        heads_mask(attention_mask),
        cache_mask,
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
