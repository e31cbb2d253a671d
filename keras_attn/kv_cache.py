"""The key/value cache of incremental decoding.

A cache is one tensor ``(B, 2, S, H, D)``: keys at ``[:, 0]``, values at ``[:, 1]``,
``S`` slots, ``H`` key/value heads of size ``D``. A decoding step writes its new keys
and values at the cache index and attends over every slot written so far.
"""

from keras import ops

__all__ = ["cache_shape", "check_cache", "update"]


def cache_shape(batch_size, max_length, num_heads, head_dim):
    """The shape of a cache: ``(batch_size, 2, max_length, num_heads, head_dim)``."""
    return (batch_size, 2, max_length, num_heads, head_dim)


def check_cache(cache, num_heads, key_dim, value_dim):
    """Raise if `cache` cannot hold these heads.

    Raises:
        ValueError: the shape is not ``(B, 2, S, num_heads, key_dim)``, or
            ``key_dim != value_dim`` (keys and values share one tensor).
    """
    if value_dim != key_dim:
        raise ValueError(
            "A key/value cache needs key_dim == value_dim. Received: "
            f"key_dim={key_dim}, value_dim={value_dim}"
        )
    if len(cache.shape) != 5 or cache.shape[1] != 2:
        raise ValueError(
            f"`cache` must have shape (B, 2, S, {num_heads}, {key_dim}). "
            f"Received: cache.shape={cache.shape}"
        )


def update(cache, key, value, index):
    """Write `key` and `value` into the cache at `index`.

    Args:
        cache: ``(B, 2, S, H, D)``.
        key: ``(B, T, H, D)``, the new keys.
        value: ``(B, T, H, D)``, the new values.
        index: Slot of the first new key (Python int or integer scalar tensor).

    Returns:
        ``(keys (B, S, H, D), values (B, S, H, D), cache (B, 2, S, H, D),
        filled (1, 1, 1, S))``: the cache's keys and values after the write, the
        updated cache and a bool mask of the slots written so far.
    """
    index = ops.cast(index, "int32")
    # One update of the whole cache (not a stack of two new halves), which XLA can do
    # in place inside a decoding loop.
    new = ops.stack([key, value], axis=1)  # (B, 2, T, H, D)
    cache = ops.slice_update(cache, [0, 0, index, 0, 0], ops.cast(new, cache.dtype))
    keys, values = cache[:, 0], cache[:, 1]  # (B, S, H, D)
    filled = index + ops.shape(key)[1]
    valid = ops.arange(ops.shape(cache)[2])[None, None, None, :] < filled  # (1, 1, 1, S)
    return keys, values, cache, valid
