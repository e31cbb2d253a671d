"""Patterns: which (query i, key j) pairs may interact at all.

A pattern is a plain serializable object without weights. ``mask(positions)``
returns a bool tensor broadcastable to the logits ``(..., Tq, Tk)``, True where the
pair may interact. Patterns depend on positions only, never on data, so the engine
can work out ahead of time which blocks of the score matrix are empty.

``p1 | p2`` is the union of two patterns and ``p1 & p2`` their intersection: `Union`
and `Intersection`, defined beside `keras_attn.components.Pattern` and exported here
with the other built-in patterns.
"""

import numpy as np
from keras import ops

from keras_attn import validation
from keras_attn.block_layout import block_bounds
from keras_attn.block_layout import distance_bounds
from keras_attn.block_layout import holds_multiple
from keras_attn.block_layout import num_blocks
from keras_attn.components import Intersection
from keras_attn.components import Pattern
from keras_attn.components import Union
from keras_attn.components import builtin
from keras_attn.hookspecs import hookimpl


def _distance(positions):
    return positions.query - positions.key  # (..., Tq, Tk), > 0 for past keys


@builtin("pattern")
class Full(Pattern):
    """Every query sees every key (global attention)."""

    name = "full"

    @property
    def kernel_form(self):
        return "full" if type(self).mask is Full.mask else None

    def mask(self, positions):
        return ops.equal(positions.query * 0, positions.key * 0)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        return np.ones(
            (num_blocks(query_length, block_size), num_blocks(key_length, block_size)), bool
        )


@builtin("pattern")
class Causal(Pattern):
    """Query i sees keys j <= i."""

    name = "causal"

    @property
    def kernel_form(self):
        return "causal" if type(self).mask is Causal.mask else None

    def mask(self, positions):
        return _distance(positions) >= 0

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        _, high = distance_bounds(query_length, key_length, block_size, query_offset)
        return high >= 0

    @property
    def causal(self):
        return True


class _Banded(Pattern):
    """A pattern with an optional `causal` flag that drops later keys."""

    def __init__(self, causal=False):
        self._causal = validation.boolean(causal, "causal")

    @property
    def causal(self):
        return self._causal

    def _with_causal(self, mask, positions):
        return ops.logical_and(mask, _distance(positions) >= 0) if self._causal else mask


@builtin("pattern")
class Local(_Banded):
    """Sliding window: query i sees keys j with ``|i - j| < window``.

    Matches ``keras.layers.MultiHeadAttention(sliding_window=window)``.

    Args:
        window: Positive integer; ``window=1`` sees only the query's own position.
        causal: If True, only keys ``i - window < j <= i``.
    """

    name = "local"

    def __init__(self, window, causal=False):
        super().__init__(causal)
        self.window = validation.positive_int(window, "window")

    def mask(self, positions):
        d = _distance(positions)
        return self._with_causal(ops.abs(d) < self.window, positions)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        low, high = distance_bounds(query_length, key_length, block_size, query_offset)
        low = np.maximum(low, 0 if self.causal else 1 - self.window)
        return low <= np.minimum(high, self.window - 1)

    def get_config(self):
        return {"window": self.window, "causal": self.causal}


@builtin("pattern")
class Dilated(_Banded):
    """Dilated sliding window: keys every `dilation` positions, `window` on each side.

    Query i sees key j when ``(i - j) % dilation == 0`` and
    ``|i - j| < window * dilation``. ``dilation=1`` is `Local`.
    """

    name = "dilated"

    def __init__(self, window, dilation=2, causal=False):
        super().__init__(causal)
        self.window = validation.positive_int(window, "window")
        self.dilation = validation.positive_int(dilation, "dilation")

    def mask(self, positions):
        d = _distance(positions)
        m = ops.logical_and(
            ops.abs(d) < self.window * self.dilation, ops.equal(d % self.dilation, 0)
        )
        return self._with_causal(m, positions)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        low, high = distance_bounds(query_length, key_length, block_size, query_offset)
        reach = self.window * self.dilation - 1
        low = np.maximum(low, 0 if self.causal else -reach)
        return holds_multiple(low, np.minimum(high, reach), self.dilation)

    def get_config(self):
        return {"window": self.window, "dilation": self.dilation, "causal": self.causal}


@builtin("pattern")
class Strided(_Banded):
    """Strided pattern (Sparse Transformer): query i sees j when ``(i - j) % stride == 0``.

    ``local(stride, causal=True) | strided(stride, causal=True)`` is the Sparse
    Transformer's strided attention (Child et al., 2019).
    """

    name = "strided"

    def __init__(self, stride, causal=False):
        super().__init__(causal)
        self.stride = validation.positive_int(stride, "stride")

    def mask(self, positions):
        return self._with_causal(ops.equal(_distance(positions) % self.stride, 0), positions)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        low, high = distance_bounds(query_length, key_length, block_size, query_offset)
        if self.causal:
            low = np.maximum(low, 0)
        return holds_multiple(low, high, self.stride)

    def get_config(self):
        return {"stride": self.stride, "causal": self.causal}


@builtin("pattern")
class BlockLocal(_Banded):
    """Non-overlapping blocks: query i sees j when ``i // block_size == j // block_size``."""

    name = "block_local"

    def __init__(self, block_size, causal=False):
        super().__init__(causal)
        self.block_size = validation.positive_int(block_size, "block_size")

    def mask(self, positions):
        m = ops.equal(positions.query // self.block_size, positions.key // self.block_size)
        return self._with_causal(m, positions)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        qa, qb, ka, kb = block_bounds(query_length, key_length, block_size, query_offset)
        b = self.block_size
        # The query and key blocks share a group g; causal also needs some key <= query,
        # which (within a shared group) is the case exactly when ka <= qb.
        out = np.maximum(qa // b, ka // b) <= np.minimum(qb // b, kb // b)
        return out & (ka <= qb) if self.causal else out

    def get_config(self):
        return {"block_size": self.block_size, "causal": self.causal}


@builtin("pattern")
class GlobalTokens(Pattern):
    """Global tokens see every key and are seen by every query.

    On its own it is only the global rows and columns; combine it with a local
    pattern, e.g. ``local(64) | global_tokens(2)`` (Longformer, BigBird).

    Args:
        num_tokens: The first `num_tokens` positions are global.
        indices: Alternatively, an explicit list of global positions.
    """

    name = "global_tokens"

    def __init__(self, num_tokens=1, indices=None):
        if indices is not None:
            if not len(indices) or any(
                not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0
                for i in indices
            ):
                raise ValueError(
                    "`indices` must be a non-empty list of non-negative integers. "
                    f"Received: indices={indices!r}"
                )
            self.indices = sorted(int(i) for i in indices)
            self.num_tokens = None
        else:
            self.num_tokens = validation.positive_int(num_tokens, "num_tokens")
            self.indices = None

    def _is_global(self, position):
        if self.indices is None:
            return position < self.num_tokens
        hits = [ops.equal(position, i) for i in self.indices]
        out = hits[0]
        for h in hits[1:]:
            out = ops.logical_or(out, h)
        return out

    def mask(self, positions):
        return ops.logical_or(self._is_global(positions.query), self._is_global(positions.key))

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        qa, qb, ka, kb = block_bounds(query_length, key_length, block_size, query_offset)
        if self.indices is None:
            return (qa < self.num_tokens) | (ka < self.num_tokens)
        indices = np.asarray(self.indices)

        def holds_global(first, last):
            nxt = np.searchsorted(indices, first)  # first global position >= first
            return (nxt < len(indices)) & (indices[np.minimum(nxt, len(indices) - 1)] <= last)

        return holds_global(qa, qb) | holds_global(ka, kb)

    def get_config(self):
        return {"num_tokens": self.num_tokens, "indices": self.indices}


@builtin("pattern")
class SinkTokens(_Banded):
    """Sink tokens (StreamingLLM; Xiao et al., 2023): the first keys are always visible.

    Every query sees keys ``j < num_tokens``; unlike `GlobalTokens`, the sink tokens
    themselves see nothing more. Combine it with a window, e.g.
    ``local(1024, causal=True) | sink_tokens(4, causal=True)``, so that a streaming
    model keeps the first tokens in view however far the window has moved.

    Args:
        num_tokens: The first `num_tokens` positions are sinks.
        causal: If True, a query sees a sink only at or after its position.
    """

    name = "sink_tokens"

    def __init__(self, num_tokens=4, causal=False):
        super().__init__(causal)
        self.num_tokens = validation.positive_int(num_tokens, "num_tokens")

    def mask(self, positions):
        return self._with_causal(positions.key < self.num_tokens, positions)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        qa, qb, ka, kb = block_bounds(query_length, key_length, block_size, query_offset)
        out = np.broadcast_to(ka < self.num_tokens, (qa.shape[0], ka.shape[1]))
        # Causal: the block's first key (a sink) must be <= some query of the block.
        return out & (ka <= qb) if self.causal else out.copy()

    def get_config(self):
        return {"num_tokens": self.num_tokens, "causal": self.causal}


def with_causal(pattern, use_causal_mask=True):
    """`pattern` with Keras's ``use_causal_mask`` applied, in its simplest form.

    A causal pattern (or ``use_causal_mask=False``) is returned as it is,
    ``Local(w)`` becomes ``Local(w, causal=True)`` (the same pairs, and a form the
    ring cache and native kernels know), a full pattern becomes `Causal`, anything
    else ``pattern & Causal()``.
    """
    if not use_causal_mask or pattern.causal:
        return pattern
    if type(pattern) is Local:
        return Local(pattern.window, causal=True)
    if pattern.kernel_form == "full":
        return Causal()
    return pattern & Causal()


def reach(pattern):
    """How far a banded pattern reaches: ``(before, after)``, or None if it is not banded.

    Query i may see key j only when ``i - before <= j <= i + after``, whatever the
    positions (the pattern depends on ``i - j`` within that band or is narrower):
    `Local` ``(window - 1, window - 1)``, `Dilated` ``(window * dilation - 1, ...)``,
    `BlockLocal` ``(block_size - 1, ...)`` (``after`` is 0 when causal), `Causal`
    bounds only ``after``. A union reaches as far as its widest part, an
    intersection as far as its narrowest. Used to exchange only a window's
    neighbours (`keras_attn.context_parallel`'s halo).

    Args:
        pattern: A pattern.

    Returns:
        ``(before, after)`` non-negative ints, or None when either side is unbounded
        or unknown (`Full`, `Causal`, `Strided`, `GlobalTokens`, `SinkTokens`, a
        subclass that overrides ``mask``, a plugin pattern).
    """
    before, after = _bounds(pattern)
    return None if before is None or after is None else (before, after)


def _bounds(pattern):
    """``(before, after)`` of `reach`, each side None where unbounded or unknown."""
    cls = type(pattern)
    if isinstance(pattern, Causal) and cls.mask is Causal.mask:
        return None, 0
    if isinstance(pattern, Local) and cls.mask is Local.mask:
        side = pattern.window - 1
    elif isinstance(pattern, Dilated) and cls.mask is Dilated.mask:
        side = pattern.window * pattern.dilation - 1
    elif isinstance(pattern, BlockLocal) and cls.mask is BlockLocal.mask:
        side = pattern.block_size - 1
    elif isinstance(pattern, (Union, Intersection)) and cls.mask in (Union.mask, Intersection.mask):
        parts = [_bounds(p) for p in pattern.patterns]
        if cls.mask is Union.mask:
            return tuple(
                None if None in sides else max(sides) for sides in zip(*parts, strict=True)
            )
        return tuple(
            min((s for s in sides if s is not None), default=None)
            for sides in zip(*parts, strict=True)
        )
    else:
        return None, None
    return side, 0 if pattern.causal else side


@hookimpl
def register_patterns(register):
    for cls in (
        Full,
        Causal,
        Local,
        Dilated,
        Strided,
        BlockLocal,
        GlobalTokens,
        SinkTokens,
        Union,
        Intersection,
    ):
        register(cls)
