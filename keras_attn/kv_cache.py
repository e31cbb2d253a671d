"""The key/value cache of incremental decoding.

A cache is one tensor ``(B, 2, S, H, D)``: keys at ``[:, 0]``, values at ``[:, 1]``,
``S`` slots, ``H`` key/value heads of size ``D``. A decoding step writes its new keys
and values at the cache index and attends over every slot written so far.
"""

import warnings
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_attn import plugins
from keras_attn.patterns import Local

__all__ = [
    "CacheRead",
    "cache_shape",
    "check_cache",
    "concrete_int",
    "read_write",
    "read_write_ring",
    "ring_window",
    "ring_window_of_call",
    "check_read_only",
    "update",
]


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
    shape = tuple(cache.shape)
    if (
        len(shape) != 5
        or shape[1] != 2
        or shape[3] not in (None, num_heads)
        or shape[4] not in (None, key_dim)
    ):
        raise ValueError(
            f"`cache` must have shape (B, 2, S, {num_heads}, {key_dim}): keys and values "
            f"of {num_heads} heads of size {key_dim} (`layer.cache_shape(B, S)` gives it). "
            f"Received: cache.shape={shape}"
        )


def concrete_int(value):
    """`value` as a Python int if it is known now (not traced), else None.

    Python and numpy integers, eager TensorFlow tensors, JAX arrays outside a trace
    and PyTorch tensors are known; a value inside ``tf.function`` or ``jax.jit`` is not.
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, np.ndarray):
        return int(value) if value.ndim == 0 else None
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            if tf.executing_eagerly() and isinstance(value, tf.Tensor):
                return int(value.numpy())
        elif backend == "jax":
            import jax

            if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
                return int(value)
        elif backend == "torch":
            return int(value)
    except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError):
        pass
    return None


def update(cache, key, value, index):
    """Write `key` and `value` into the cache at `index`.

    A write must fit: ``0 <= index`` and ``index + T <= S``. Where the index is known
    when the call runs (a Python int, or an eager tensor), one that does not fit raises
    a ``ValueError``. Where it is traced (inside ``tf.function``, ``jax.jit`` or a
    compiled Keras model), it cannot raise; the backends' slice update would clamp the
    write to the cache's end and put the keys in the wrong slots, silently. Instead,
    a write that does not fit writes NaN keys and values (to the clamped slots) and
    marks every slot as written, so the outputs of that step, and of every later step
    that reads the cache, are NaN: wrong loudly, never silently. Grow the cache
    (`cache_shape` with a larger ``max_length``) or stop decoding before it is full.

    Args:
        cache: ``(B, 2, S, H, D)``.
        key: ``(B, T, H, D)``, the new keys.
        value: ``(B, T, H, D)``, the new values.
        index: Slot of the first new key (Python int or integer scalar tensor).

    Returns:
        ``(keys (B, S, H, D), values (B, S, H, D), cache (B, 2, S, H, D),
        filled (1, 1, 1, S))``: the cache's keys and values after the write, the
        updated cache and a bool mask of the slots written so far.

    Raises:
        ValueError: the index is known and the write does not fit.
    """
    slots, length = cache.shape[2], key.shape[1]
    known = concrete_int(index)
    if known is not None and slots is not None and length is not None:
        if known < 0 or known + length > slots:
            raise ValueError(
                f"A key/value cache write must fit in the cache: cache_update_index + "
                f"T <= S (S={slots} slots), with cache_update_index >= 0. Received: "
                f"cache_update_index={known}, T={length} new keys (they would fill slots "
                f"{known}..{known + length - 1})"
            )
    index = ops.cast(index, "int32")
    # One update of the whole cache (not a stack of two new halves), which XLA can do
    # in place inside a decoding loop.
    new = ops.stack([key, value], axis=1)  # (B, 2, T, H, D)
    if known is None:
        # Traced: a write that does not fit writes NaN, and counts every slot as written.
        fits = ops.logical_and(index >= 0, index + ops.shape(key)[1] <= ops.shape(cache)[2])
        new = ops.where(fits, new, ops.full_like(new, float("nan")))
        index_end = ops.where(fits, index + ops.shape(key)[1], ops.shape(cache)[2])
    cache = ops.slice_update(cache, [0, 0, index, 0, 0], ops.cast(new, cache.dtype))
    keys, values = cache[:, 0], cache[:, 1]  # (B, S, H, D)
    filled = index + ops.shape(key)[1] if known is not None else index_end
    valid = ops.arange(ops.shape(cache)[2])[None, None, None, :] < filled  # (1, 1, 1, S)
    return keys, values, cache, valid


class CacheRead(NamedTuple):
    """What attention reads after a cache write (`read_write`).

    Attributes:
        key: ``(B, S, H, D)`` (or the call's own keys without a cache).
        value: ``(B, S, H, Dv)``.
        cache: The updated cache ``(B, 2, S, H, D)``, or None without one.
        mask: Bool ``(1, 1, 1, S)`` of the slots written so far, or None.
        query_offset: Absolute position of the first query: the cache index (a
            Python int where it is known when the call runs), or 0.
    """

    key: object
    value: object
    cache: object = None
    mask: object = None
    query_offset: object = 0


def read_write(cache, key, value, index, window=None):
    """Write the call's keys and values into `cache` at `index` and read it back.

    Without a cache the call's own keys and values are read. A cache without an
    index is read as it is (KerasHub's convention for cross-attention: keys and
    values computed once): nothing is written, every slot counts and the queries'
    positions are unknown, so a position-dependent component must not run on it
    (the layer checks that).

    Args:
        cache: ``(B, 2, S, H, D)`` or None.
        key: ``(B, T, H, D)``; value ``(B, T, H, Dv)``: the call's new heads.
        index: Slot of the first new key (int, numpy or scalar tensor), or None.
        window: The layer's `ring_window`, or None. A cache of exactly `window`
            slots is then a ring (`read_write_ring`).

    Returns:
        A `CacheRead`.

    Raises:
        ValueError: a cache that cannot hold these heads (`check_cache`), from `update`.
    """
    if cache is None:
        return CacheRead(key, value)
    check_cache(cache, key.shape[-2], key.shape[-1], value.shape[-1])
    if index is None:
        return CacheRead(cache[:, 0], cache[:, 1], cache)
    if window is not None and cache.shape[2] == window:
        return read_write_ring(cache, key, value, index, window)
    keys, values, cache, filled = update(cache, key, value, index)
    # An index known now (numpy, an eager tensor) is a Python int for the planner, so
    # the block-sparse path plans its blocks from it as from an int.
    known = concrete_int(index)
    return CacheRead(keys, values, cache, filled, index if known is None else known)


def ring_window(pattern):
    """The window of a causal sliding-window pattern (a ring cache of that many slots), or None.

    Only `keras_attn.patterns.Local(window, causal=True)` itself (not a subclass that
    changes its mask, not a combination) qualifies: its mask depends on ``query - key``
    alone and never reaches further back than ``window - 1``, so a ring of `window`
    slots holds every key a query can see.
    """
    if type(pattern) is not Local or not pattern.causal:
        return None
    return pattern.window


def ring_window_of_call(pattern, cache, extras=(), owner="the layer", index=None, length=None):
    """The window of the ring cache this call reads and writes, or None (a full cache).

    A causal sliding-window layer whose cache has exactly `window` slots (what its
    `cache_shape` gives) keeps it as a ring (`read_write_ring`): memory
    proportional to the window. A ring's slots do not keep their positions, so a
    call with masks or segment ids reads such a cache as a full one, which it is
    while its tokens fit in it (KerasHub's caches of the sequence length).

    Args:
        pattern: The call's pattern (`ring_window` says whether it has a ring).
        cache: ``(B, 2, S, H, D)`` or None.
        extras: The call's key/value padding masks, `attention_mask` and segments
            (None where absent).
        owner: The layer, as the error names it.
        index: The call's cache index, or None.
        length: The number of new tokens, or None.

    Raises:
        ValueError: masks or segment ids with tokens past the cache's `window` slots
            (an index known now).
    """
    window = ring_window(pattern)
    if cache is None or window is None or cache.shape[2] != window:
        return None
    if all(extra is None for extra in extras):
        return window
    known = concrete_int(index)
    if known is not None and length is not None and known + length > window:
        raise ValueError(
            f"{owner}: a cache of {window} slots (a causal sliding window's "
            "`cache_shape`) is a ring past its last slot, and a ring takes no key/value "
            "padding masks, `attention_mask` or segment ids: its slots do not keep their "
            "positions. Received: tokens up to position "
            f"{known + length - 1} with masks or segment ids. Use a cache of the full "
            "length (kv_cache.cache_shape) for those."
        )
    return None


def check_read_only(components, position_encoding, owner, self_attention):
    """Check a call that reads a cache without `cache_update_index` (writing nothing).

    KerasHub computes a cross-attention cache once and reads it as it is; such a call
    says nothing of where its queries stand, so a component that needs positions
    (a pattern other than full, a score_mod, a position encoding) would run at
    made-up positions: it raises instead. A self-attention call reading its own
    cache without an index is surely a mistake, and warns.

    Args:
        components: The call's `keras_attn.components.Components` (its pattern).
        position_encoding: The layer's position encoding, or None.
        owner: The layer, as messages name it.
        self_attention: Whether the call is self-attention.

    Raises:
        ValueError: naming the components that need positions.
    """
    if self_attention:
        warnings.warn(
            f"{owner}: a self-attention call was given a `cache` without "
            "`cache_update_index`, so the cache is only read and the new keys and values "
            "are not written. Pass `cache_update_index` (the slot of the first new token) "
            "to decode with it.",
            stacklevel=4,
        )
    needs = []
    if components.pattern.kernel_form != "full":
        needs.append(f"pattern {plugins.registry_name(components.pattern)!r}")
    needs += [f"score_mod {plugins.registry_name(m)!r}" for m in components.score_mods]
    if position_encoding is not None:
        needs.append(f"position_encoding {plugins.registry_name(position_encoding)!r}")
    if needs:
        raise ValueError(
            f"{owner} was given a `cache` without `cache_update_index`: the cache is read "
            "as it is (KerasHub's convention for cross-attention) and the queries' "
            f"positions are unknown, but {', '.join(needs)} need(s) them. Pass "
            "`cache_update_index` (the position of the first query), or use a full "
            "pattern without position-dependent components for this layer (e.g. convert "
            "only self-attention layers)."
        )


def read_write_ring(cache, key, value, index, window):
    """Attend over a ring cache of `window` slots: memory proportional to the window.

    Slot ``s`` holds the keys and values of the absolute position ``p`` with
    ``p % window == s``, for the `window` positions before `index`. A call reads them
    in order of position, appends its own ``T`` new keys, and writes back the last
    ``min(T, window)`` of them. Positions are counted from the oldest slot, so the
    queries sit at `window`; a causal sliding window of `window` (or any pattern of
    ``query - key`` within that reach) sees exactly the keys it would see in a full
    cache. Position encodings stay absolute: keys are encoded before they are written.

    Args:
        cache: ``(B, 2, window, H, D)``.
        key: ``(B, T, H, D)``; value ``(B, T, H, Dv)``: the call's new heads.
        index: Absolute position of the first new token (int or scalar tensor), any
            size: the ring never fills up.
        window: The ring's slots.

    Returns:
        A `CacheRead` of ``window + T`` keys and values, the mask of the slots
        written so far, and ``query_offset=window``.
    """
    index = ops.cast(index, "int32")
    length = ops.shape(key)[1]
    slots = ops.arange(window, dtype="int32")
    order = ops.mod(index + slots, window)  # slot of position index - window + j
    old_keys = ops.take(cache[:, 0], order, axis=1)  # (B, window, H, D), oldest first
    old_values = ops.take(cache[:, 1], order, axis=1)
    keys = ops.concatenate([old_keys, ops.cast(key, cache.dtype)], axis=1)  # (B, W + T, H, D)
    values = ops.concatenate([old_values, ops.cast(value, cache.dtype)], axis=1)
    written = ops.concatenate(
        [index - window + slots >= 0, ops.ones((length,), "bool")], axis=0
    )  # (W + T,)
    # Slot s keeps the position p in [index + T - window, index + T) with p % window == s.
    recent = ops.stack([keys[:, -window:], values[:, -window:]], axis=1)  # (B, 2, W, H, D)
    new_cache = ops.take(recent, ops.mod(slots - index - length, window), axis=2)
    return CacheRead(keys, values, new_cache, written[None, None, None, :], window)
