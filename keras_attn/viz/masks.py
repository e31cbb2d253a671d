"""Masks drawn as text, for the terminal (`keras-attn pattern`)."""

import numpy as np

ALLOWED = "█"
BLOCKED = "·"


def pattern_mask(pattern, query_length, key_length=None, query_offset=0):
    """A pattern's mask as a numpy bool array.

    Args:
        pattern: A registered pattern name, a config dict or a `Pattern` instance.
        query_length: Number of queries, Tq.
        key_length: Number of keys, Tk; defaults to `query_length`.
        query_offset: Absolute position of the first query.

    Returns:
        Bool array ``(Tq, Tk)``, True where query i may attend to key j.
    """
    from keras import ops

    from keras_attn import plugins
    from keras_attn.positions import make_positions

    pattern = plugins.resolve("pattern", pattern)
    key_length = query_length if key_length is None else key_length
    positions = make_positions(query_length, key_length, 1, query_offset=query_offset)
    mask = ops.convert_to_numpy(pattern.mask(positions))
    return np.broadcast_to(mask, mask.shape[:-2] + (query_length, key_length)).reshape(
        -1, query_length, key_length
    )[0]


def render_mask(mask, allowed=ALLOWED, blocked=BLOCKED, query_offset=0):
    """Draw a 2-D bool mask as text: one line per query, one character per key.

    Args:
        mask: Bool array ``(Tq, Tk)``, True where the query may attend to the key.
        allowed: Character for an allowed pair.
        blocked: Character for a pair the pattern rules out.
        query_offset: Absolute position of the first query, shown in the margin.

    Returns:
        The drawing, with query positions in a left margin and a count of the
        allowed pairs in the last line.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be 2-D (Tq, Tk). Received: mask.shape={mask.shape}")
    width = len(str(query_offset + mask.shape[0] - 1))
    lines = [
        f"{query_offset + i:>{width}} " + "".join(allowed if m else blocked for m in row)
        for i, row in enumerate(mask)
    ]
    kept, total = int(mask.sum()), mask.size
    lines.append(f"{kept} of {total} pairs allowed ({kept / max(total, 1):.1%})")
    return "\n".join(lines)
