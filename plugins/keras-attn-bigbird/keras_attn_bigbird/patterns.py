"""BigBird and Longformer: sliding window + global tokens (+ random blocks).

Both are `keras_attn.Pattern`s: functions of absolute (query, key) positions only,
so the engine can work out ahead of time which blocks of the score matrix are
empty. Both give a closed-form `block_mask`, so long inputs run on keras_attn's
block-sparse path without evaluating the mask element by element.
"""

import numpy as np
from keras import ops

import keras_attn
from keras_attn.block_layout import block_bounds
from keras_attn.block_layout import num_blocks
from keras_attn.validation import boolean
from keras_attn.validation import integer

# Random blocks come from a small integer hash. Every intermediate stays below 2**31,
# so int32 tensors (TensorFlow, JAX) and numpy int64 arrays give the same numbers.
_PRIME = 32749  # < 2**15: the product of two residues is < 2**30


def random_block(query_block, draw, seed, num_candidates):
    """The `draw`-th random key block of `query_block`: an integer in [0, num_candidates).

    Works elementwise on Python ints, numpy arrays and keras tensors alike.
    """
    h = (query_block % _PRIME) * 181 + (draw + 1) * 7993 + (seed % _PRIME) * 97
    h = h % _PRIME
    h = (h * h + 12345) % _PRIME
    h = (h * h + 54321) % _PRIME
    return h % num_candidates


def _mark_intervals(out_row, starts, stops):
    """Set ``out_row[start : stop + 1]`` for every (start, stop) pair, vectorized."""
    diff = np.zeros(len(out_row) + 1, dtype=np.int64)
    np.add.at(diff, starts, 1)
    np.add.at(diff, np.asarray(stops) + 1, -1)
    out_row |= np.cumsum(diff[:-1]) > 0


def _rows_of_blocks(query_length, block_size, query_offset):
    """First and last absolute query position of each row of blocks, ``(nq,)`` each."""
    first, last, _, _ = block_bounds(query_length, 0, block_size, query_offset)
    return first[:, 0], last[:, 0]


class Longformer(keras_attn.Pattern):
    """Longformer attention (Beltagy et al., 2020): sliding window + global tokens.

    Query i sees key j when ``|i - j| < window``, or when i or j is a global
    position (global tokens see every key and every query sees them).

    Args:
        window: Positive integer, as `keras_attn`'s ``local`` pattern: each query
            sees ``window - 1`` keys on each side and itself.
        num_global: The first `num_global` positions are global (e.g. ``[CLS]``).
        global_indices: Alternatively, an explicit list of global positions.
        causal: Also require ``j <= i`` (a decoder).

    Example:

    ```python
    keras_attn.Attention(num_heads=8, pattern={"name": "longformer", "config": {"window": 256}})
    ```
    """

    name = "longformer"

    def __init__(self, window=256, num_global=1, global_indices=None, causal=False):
        self.window = integer(window, "window", 1)
        if global_indices is not None:
            if not isinstance(global_indices, (list, tuple)) or not global_indices:
                raise ValueError(
                    "`global_indices` must be a non-empty list of non-negative integers. "
                    f"Received: global_indices={global_indices!r}"
                )
            global_indices = sorted({integer(i, "global_indices", 0) for i in global_indices})
            num_global = None
        else:
            num_global = integer(num_global, "num_global", 0)
        self.num_global = num_global
        self.global_indices = global_indices
        self._causal = boolean(causal, "causal")

    @property
    def causal(self):
        return self._causal

    def _global_positions(self):
        if self.global_indices is not None:
            return np.asarray(self.global_indices, dtype=np.int64)
        return np.arange(self.num_global, dtype=np.int64)

    def _is_global(self, position):
        if self.global_indices is None:
            return position < self.num_global
        out = ops.equal(position, self.global_indices[0])
        for index in self.global_indices[1:]:
            out = ops.logical_or(out, ops.equal(position, index))
        return out

    def mask(self, positions):
        distance = positions.query - positions.key  # (..., Tq, Tk)
        mask = ops.abs(distance) < self.window
        if self.num_global != 0:
            is_global = ops.logical_or(
                self._is_global(positions.query), self._is_global(positions.key)
            )
            mask = ops.logical_or(mask, is_global)
        if self._causal:
            mask = ops.logical_and(mask, distance >= 0)
        return mask

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        """Closed form: the band's blocks, plus the rows and columns of global tokens."""
        first, last = _rows_of_blocks(query_length, block_size, query_offset)
        n_k = num_blocks(key_length, block_size)
        col_first = np.arange(n_k) * block_size
        col_last = np.minimum(col_first + block_size, key_length) - 1
        low = first - self.window + 1
        high = last if self._causal else last + self.window - 1
        out = (col_first[None] <= high[:, None]) & (col_last[None] >= low[:, None])
        g = self._global_positions()
        if len(g):
            # Rows holding a global query see every key (up to that query if causal).
            index = np.searchsorted(g, last, side="right") - 1
            top = np.where(index >= 0, g[np.maximum(index, 0)], -1)  # last global query
            has_global = top >= first
            sees = col_first[None] <= (top[:, None] if self._causal else key_length)
            out |= has_global[:, None] & sees
            # Columns holding a global key are seen by every row (later rows if causal).
            keys = g[g < key_length]
            earliest = np.full(n_k, np.iinfo(np.int64).max)
            np.minimum.at(earliest, keys // block_size, keys)
            if self._causal:
                out |= earliest[None] <= last[:, None]
            else:
                out |= (earliest < np.iinfo(np.int64).max)[None]
        return out

    def get_config(self):
        return {
            "window": self.window,
            "num_global": self.num_global,
            "global_indices": self.global_indices,
            "causal": self._causal,
        }


class BigBird(keras_attn.Pattern):
    """BigBird attention (Zaheer et al., 2020): window, global and random blocks.

    Positions are grouped into blocks of `block_size`. Query block a sees key
    block b when

    - ``|a - b| <= num_window_blocks // 2`` (a sliding window of blocks);
    - ``a < num_global_blocks`` or ``b < num_global_blocks`` (global blocks, the
      "ITC" variant: the first blocks see and are seen by everything);
    - b is one of a's `num_random_blocks` random blocks, drawn by a hash of
      ``(a, draw, seed)``: from blocks ``0 .. 2a + 1`` (centred on a) or, if
      `causal`, from blocks ``0 .. a``. Draws past the last key block are dropped
      and two draws may coincide, so a row has at most `num_random_blocks`.

    The random blocks depend on the seed and the block index only, never on the
    sequence length or the data, so a pattern is the same in training, at
    inference on longer inputs, and after saving and loading.

    Args:
        block_size: Positive integer, positions per block.
        num_window_blocks: Odd positive integer, width of the window in blocks.
        num_global_blocks: Number of leading global blocks.
        num_random_blocks: Random key blocks per query block.
        seed: Non-negative integer seed of the random blocks.
        causal: Also require key position <= query position (a decoder).
    """

    name = "bigbird"

    def __init__(
        self,
        block_size=64,
        num_window_blocks=3,
        num_global_blocks=1,
        num_random_blocks=2,
        seed=0,
        causal=False,
    ):
        self.block_size = integer(block_size, "block_size", 1)
        self.num_window_blocks = integer(num_window_blocks, "num_window_blocks", 1)
        if self.num_window_blocks % 2 == 0:
            raise ValueError(
                "`num_window_blocks` must be odd (the query's block and as many on each "
                f"side). Received: num_window_blocks={num_window_blocks}"
            )
        self.num_global_blocks = integer(num_global_blocks, "num_global_blocks", 0)
        self.num_random_blocks = integer(num_random_blocks, "num_random_blocks", 0)
        self.seed = integer(seed, "seed", 0)
        self._causal = boolean(causal, "causal")

    @property
    def causal(self):
        return self._causal

    def _candidates(self, query_block):
        return query_block + 1 if self._causal else 2 * query_block + 2

    def random_blocks(self, num_query_blocks, query_block_offset=0):
        """The random key blocks drawn for each query block, as numpy ``(Nq, r)``.

        Row a lists the draws of query block ``query_block_offset + a``; some may lie
        past the last key block of a given input (those are dropped).
        """
        a = np.arange(num_query_blocks, dtype=np.int64)[:, None] + query_block_offset
        draws = np.arange(self.num_random_blocks, dtype=np.int64)[None]
        return random_block(a, draws, self.seed, self._candidates(a))

    def mask(self, positions):
        query_block = positions.query // self.block_size  # (..., Tq, 1)
        key_block = positions.key // self.block_size  # (..., 1, Tk)
        mask = ops.abs(query_block - key_block) <= self.num_window_blocks // 2
        if self.num_global_blocks:
            is_global = ops.logical_or(
                query_block < self.num_global_blocks, key_block < self.num_global_blocks
            )
            mask = ops.logical_or(mask, is_global)
        candidates = self._candidates(query_block)
        for draw in range(self.num_random_blocks):
            chosen = random_block(query_block, draw, self.seed, candidates)
            mask = ops.logical_or(mask, ops.equal(key_block, chosen))
        if self._causal:
            mask = ops.logical_and(mask, positions.key <= positions.query)
        return mask

    def _key_blocks(self, query_block, num_key_blocks):
        """Bool ``(num_key_blocks,)``: the key blocks query block `query_block` sees."""
        b = np.arange(num_key_blocks)
        sees = np.abs(query_block - b) <= self.num_window_blocks // 2
        if query_block < self.num_global_blocks:
            sees[:] = True
        sees[: self.num_global_blocks] = True
        chosen = self.random_blocks(1, query_block)[0]
        sees[chosen[chosen < num_key_blocks]] = True
        return sees

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        """Closed form, from the pattern's own blocks (which need not be `block_size`)."""
        bs = self.block_size
        first, last = _rows_of_blocks(query_length, block_size, query_offset)
        n_k = num_blocks(key_length, block_size)
        out = np.zeros((len(first), n_k), dtype=bool)
        for row, (start, stop) in enumerate(zip(first, last, strict=True)):
            for a in range(start // bs, stop // bs + 1):
                limit = key_length - 1
                if self._causal:  # the latest query of block a in this row
                    limit = min(limit, stop, (a + 1) * bs - 1)
                b = np.nonzero(self._key_blocks(a, num_blocks(key_length, bs)))[0]
                b = b[b * bs <= limit]
                _mark_intervals(
                    out[row],
                    b * bs // block_size,
                    np.minimum((b + 1) * bs - 1, limit) // block_size,
                )
        return out

    def get_config(self):
        return {
            "block_size": self.block_size,
            "num_window_blocks": self.num_window_blocks,
            "num_global_blocks": self.num_global_blocks,
            "num_random_blocks": self.num_random_blocks,
            "seed": self.seed,
            "causal": self._causal,
        }


@keras_attn.hookimpl
def register_patterns(register):
    register(Longformer)
    register(BigBird)
