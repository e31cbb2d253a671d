"""Patterns: which (query i, key j) pairs may interact at all.

A pattern is a plain serializable object without weights. ``mask(positions)``
returns a bool tensor broadcastable to the logits ``(..., Tq, Tk)``, True where the
pair may interact. Patterns depend on positions only, never on data, so the engine
can work out ahead of time which blocks of the score matrix are empty.

``p1 | p2`` is the union of two patterns and ``p1 & p2`` their intersection.
"""

import numpy as np
from keras import ops

from keras_attn.hookspecs import hookimpl


class Pattern:
    """Base class of patterns. Subclasses set ``name`` and implement ``mask``.

    Constructor arguments must be plain Python values returned by ``get_config``.
    """

    name = None

    def mask(self, positions):
        """Bool tensor broadcastable to the logits: True where key j is visible to query i.

        Args:
            positions: `keras_attn.positions.Positions` with integer tensors
                ``query``, ``key`` and ``head`` holding absolute positions.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement mask(positions).")

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        """Which ``block_size`` x ``block_size`` blocks hold at least one allowed pair.

        Works for any pattern by evaluating ``mask`` one row of blocks at a time
        (memory ``block_size * key_length``); patterns with a closed form may
        override it. Returns a numpy bool array ``(ceil(Tq / bs), ceil(Tk / bs))``.
        """
        return _block_mask_by_rows(self, query_length, key_length, block_size, query_offset)

    @property
    def causal(self):
        """True if the pattern never lets a query see a later key."""
        return False

    def __or__(self, other):
        return Union([self, _check_pattern(other, "|")])

    def __and__(self, other):
        return Intersection([self, _check_pattern(other, "&")])

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, repr(self.get_config())))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _check_pattern(other, op):
    if not isinstance(other, Pattern):
        raise TypeError(
            f"Patterns combine with `{op}` only with other patterns. "
            f"Received: {other!r} (of type {type(other).__name__})"
        )
    return other


def _block_mask_by_rows(pattern, query_length, key_length, block_size, query_offset):
    from keras_attn.positions import Positions

    n_q = -(-query_length // block_size)
    n_k = -(-key_length // block_size)
    out = np.zeros((n_q, n_k), dtype=bool)
    key = np.arange(key_length, dtype="int32").reshape(1, 1, 1, key_length)
    head = np.zeros((1, 1, 1, 1), dtype="int32")
    pad = n_k * block_size - key_length
    for row in range(n_q):
        start = row * block_size
        stop = min(start + block_size, query_length)
        query = (np.arange(start, stop, dtype="int32") + query_offset).reshape(1, 1, -1, 1)
        m = ops.convert_to_numpy(pattern.mask(Positions(query, key, head)))
        m = np.broadcast_to(m, m.shape[:-2] + (stop - start, key_length))
        m = m.reshape(-1, stop - start, key_length).any(axis=(0, 1))
        out[row] = np.pad(m, (0, pad)).reshape(n_k, block_size).any(axis=1)
    return out


def _block_bounds(query_length, key_length, block_size, query_offset):
    """First and last absolute position of each query block ``(nq, 1)`` and key block ``(1, nk)``."""
    offset = int(query_offset)
    q_first = np.arange(0, query_length, block_size)
    q_last = np.minimum(q_first + block_size, query_length) - 1
    k_first = np.arange(0, key_length, block_size)
    k_last = np.minimum(k_first + block_size, key_length) - 1
    return (q_first[:, None] + offset, q_last[:, None] + offset, k_first[None, :], k_last[None, :])


def _distance_bounds(query_length, key_length, block_size, query_offset):
    """Smallest and largest ``query - key`` of each block ``(nq, nk)``.

    Query and key positions of a block are two intervals, so every distance between
    the two bounds occurs in the block.
    """
    qa, qb, ka, kb = _block_bounds(query_length, key_length, block_size, query_offset)
    return qa - kb, qb - ka


def _holds_multiple(low, high, step):
    """Whether the integer interval ``[low, high]`` holds a multiple of `step`."""
    return (low <= high) & (-(-low // step) * step <= high)


def _positive_int(value, arg):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{arg}` must be a positive integer. Received: {arg}={value!r}")
    return int(value)


def _distance(positions):
    return positions.query - positions.key  # (..., Tq, Tk), > 0 for past keys


class Full(Pattern):
    """Every query sees every key (global attention)."""

    name = "full"

    def mask(self, positions):
        return ops.equal(positions.query * 0, positions.key * 0)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        return np.ones((-(-query_length // block_size), -(-key_length // block_size)), bool)


class Causal(Pattern):
    """Query i sees keys j <= i."""

    name = "causal"

    def mask(self, positions):
        return _distance(positions) >= 0

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        _, high = _distance_bounds(query_length, key_length, block_size, query_offset)
        return high >= 0

    @property
    def causal(self):
        return True


class _Banded(Pattern):
    """A pattern with an optional `causal` flag that drops later keys."""

    def __init__(self, causal=False):
        if not isinstance(causal, bool):
            raise ValueError(f"`causal` must be a bool. Received: causal={causal!r}")
        self._causal = causal

    @property
    def causal(self):
        return self._causal

    def _with_causal(self, mask, positions):
        return ops.logical_and(mask, _distance(positions) >= 0) if self._causal else mask


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
        self.window = _positive_int(window, "window")

    def mask(self, positions):
        d = _distance(positions)
        return self._with_causal(ops.abs(d) < self.window, positions)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        low, high = _distance_bounds(query_length, key_length, block_size, query_offset)
        low = np.maximum(low, 0 if self.causal else 1 - self.window)
        return low <= np.minimum(high, self.window - 1)

    def get_config(self):
        return {"window": self.window, "causal": self.causal}


class Dilated(_Banded):
    """Dilated sliding window: keys every `dilation` positions, `window` on each side.

    Query i sees key j when ``(i - j) % dilation == 0`` and
    ``|i - j| < window * dilation``. ``dilation=1`` is `Local`.
    """

    name = "dilated"

    def __init__(self, window, dilation=2, causal=False):
        super().__init__(causal)
        self.window = _positive_int(window, "window")
        self.dilation = _positive_int(dilation, "dilation")

    def mask(self, positions):
        d = _distance(positions)
        m = ops.logical_and(
            ops.abs(d) < self.window * self.dilation, ops.equal(d % self.dilation, 0)
        )
        return self._with_causal(m, positions)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        low, high = _distance_bounds(query_length, key_length, block_size, query_offset)
        reach = self.window * self.dilation - 1
        low = np.maximum(low, 0 if self.causal else -reach)
        return _holds_multiple(low, np.minimum(high, reach), self.dilation)

    def get_config(self):
        return {"window": self.window, "dilation": self.dilation, "causal": self.causal}


class Strided(_Banded):
    """Strided pattern (Sparse Transformer): query i sees j when ``(i - j) % stride == 0``.

    ``local(stride, causal=True) | strided(stride, causal=True)`` is the Sparse
    Transformer's strided attention (Child et al., 2019).
    """

    name = "strided"

    def __init__(self, stride, causal=False):
        super().__init__(causal)
        self.stride = _positive_int(stride, "stride")

    def mask(self, positions):
        return self._with_causal(ops.equal(_distance(positions) % self.stride, 0), positions)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        low, high = _distance_bounds(query_length, key_length, block_size, query_offset)
        if self.causal:
            low = np.maximum(low, 0)
        return _holds_multiple(low, high, self.stride)

    def get_config(self):
        return {"stride": self.stride, "causal": self.causal}


class BlockLocal(_Banded):
    """Non-overlapping blocks: query i sees j when ``i // block_size == j // block_size``."""

    name = "block_local"

    def __init__(self, block_size, causal=False):
        super().__init__(causal)
        self.block_size = _positive_int(block_size, "block_size")

    def mask(self, positions):
        m = ops.equal(positions.query // self.block_size, positions.key // self.block_size)
        return self._with_causal(m, positions)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        qa, qb, ka, kb = _block_bounds(query_length, key_length, block_size, query_offset)
        b = self.block_size
        # The query and key blocks share a group g; causal also needs some key <= query,
        # which (within a shared group) is the case exactly when ka <= qb.
        out = np.maximum(qa // b, ka // b) <= np.minimum(qb // b, kb // b)
        return out & (ka <= qb) if self.causal else out

    def get_config(self):
        return {"block_size": self.block_size, "causal": self.causal}


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
                not isinstance(i, (int, np.integer)) or i < 0 for i in indices
            ):
                raise ValueError(
                    "`indices` must be a non-empty list of non-negative integers. "
                    f"Received: indices={indices!r}"
                )
            self.indices = sorted(int(i) for i in indices)
            self.num_tokens = None
        else:
            self.num_tokens = _positive_int(num_tokens, "num_tokens")
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
        qa, qb, ka, kb = _block_bounds(query_length, key_length, block_size, query_offset)
        if self.indices is None:
            return (qa < self.num_tokens) | (ka < self.num_tokens)
        indices = np.asarray(self.indices)

        def holds_global(first, last):
            nxt = np.searchsorted(indices, first)  # first global position >= first
            return (nxt < len(indices)) & (indices[np.minimum(nxt, len(indices) - 1)] <= last)

        return holds_global(qa, qb) | holds_global(ka, kb)

    def get_config(self):
        return {"num_tokens": self.num_tokens, "indices": self.indices}


class _Combined(Pattern):
    """A union or intersection of patterns."""

    def __init__(self, patterns):
        from keras_attn import plugins

        flat = []
        for p in patterns:
            p = plugins.resolve("pattern", p)
            # (a | b) | c is kept flat as a | b | c.
            flat.extend(p.patterns if type(p) is type(self) else [p])
        if len(flat) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least two patterns. Received: {patterns!r}"
            )
        self.patterns = flat

    def get_config(self):
        from keras_attn import plugins

        return {"patterns": [plugins.serialize(p) for p in self.patterns]}

    def __repr__(self):
        return "(" + f" {self.symbol} ".join(repr(p) for p in self.patterns) + ")"


class Union(_Combined):
    """Pairs allowed by any of the patterns (``p1 | p2``)."""

    name = "union"
    symbol = "|"

    def mask(self, positions):
        out = self.patterns[0].mask(positions)
        for p in self.patterns[1:]:
            out = ops.logical_or(out, p.mask(positions))
        return out

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        out = None
        for p in self.patterns:
            m = p.block_mask(query_length, key_length, block_size, query_offset)
            out = m if out is None else out | m
        return out

    @property
    def causal(self):
        return all(p.causal for p in self.patterns)


class Intersection(_Combined):
    """Pairs allowed by all of the patterns (``p1 & p2``)."""

    name = "intersection"
    symbol = "&"

    def mask(self, positions):
        out = self.patterns[0].mask(positions)
        for p in self.patterns[1:]:
            out = ops.logical_and(out, p.mask(positions))
        return out

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        # A block with a pair allowed by all patterns is kept by each of them. The
        # result may keep a few blocks with no such pair: those are masked exactly.
        out = None
        for p in self.patterns:
            m = p.block_mask(query_length, key_length, block_size, query_offset)
            out = m if out is None else out & m
        return out

    @property
    def causal(self):
        return any(p.causal for p in self.patterns)


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
        Union,
        Intersection,
    ):
        register(cls)
