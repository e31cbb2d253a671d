"""Pictures of attention: masks drawn in the terminal, weights drawn as heatmaps."""

import numpy as np

ALLOWED = "█"
BLOCKED = "·"


def pattern_mask(pattern, query_length, key_length=None, query_offset=0):
    """A pattern's mask as a numpy bool array ``(Tq, Tk)``."""
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


def plot_attention(weights, path, tokens=None, key_tokens=None, title=None):
    """Save a heatmap of attention weights ``(Tq, Tk)`` or ``(H, Tq, Tk)`` as a PNG.

    Args:
        weights: Array of attention weights; with a leading head axis, one panel per head.
        path: Where to write the PNG.
        tokens: Optional labels of the queries (and keys, unless `key_tokens`).
        key_tokens: Optional labels of the keys.
        title: Optional figure title.

    Returns:
        `path`.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras_attn.viz.plot_attention needs matplotlib: pip install 'keras-attn[viz]'"
        ) from e
    weights = np.asarray(weights, dtype="float32")
    if weights.ndim == 2:
        weights = weights[None]
    if weights.ndim != 3:
        raise ValueError(
            f"`weights` must be (Tq, Tk) or (H, Tq, Tk). Received: weights.shape={weights.shape}"
        )
    key_tokens = tokens if key_tokens is None else key_tokens
    heads = weights.shape[0]
    fig, axes = plt.subplots(1, heads, figsize=(3.2 * heads + 1, 3.6), squeeze=False)
    for h, ax in enumerate(axes[0]):
        image = ax.imshow(weights[h], cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_title(f"head {h}")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if tokens is not None and len(tokens) <= 48:
            ax.set_yticks(range(len(tokens)), [str(t) for t in tokens], fontsize=6)
        if key_tokens is not None and len(key_tokens) <= 48:
            ax.set_xticks(
                range(len(key_tokens)), [str(t) for t in key_tokens], fontsize=6, rotation=90
            )
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
