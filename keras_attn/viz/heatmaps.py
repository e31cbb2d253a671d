"""Attention weights drawn as heatmaps: a grid of layers (rows) by heads (columns).

Label sizes follow from the space a panel has: tokens are thinned until each shown
label has room for its font, key labels are turned upright, and the layout is
worked out by matplotlib's constrained layout, so labels neither overlap nor fall
off the figure however long the sequence.
"""

import math

import numpy as np

from keras_attn.viz.inputs import attention_layers
from keras_attn.viz.inputs import token_labels

MAX_FIGURE_INCHES = (24.0, 30.0)  # (width, height): past this, panels shrink
PANEL_INCHES = (1.8, 4.5)  # (smallest, largest) side of one panel
MAX_LABEL_CHARS = 12
MIN_LABEL_POINTS = 4.5  # below this a label is not readable: show fewer labels instead


def _new_figure(**kwargs):
    """A figure of its own, drawn with Agg: no pyplot state, the user's backend untouched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras_attn.viz.plot_attention needs matplotlib: pip install 'keras-attn[viz]'"
        ) from e
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def plot_attention(
    weights,
    path,
    tokens=None,
    key_tokens=None,
    title=None,
    *,
    layer_names=None,
    heads=None,
    example=0,
    max_labels=40,
    dpi=120,
):
    """Save a grid of heatmaps of attention weights, layers by heads, as a PNG.

    Args:
        weights: One layer's weights, ``(Tq, Tk)``, ``(H, Tq, Tk)`` or
            ``(B, H, Tq, Tk)``; or a list of them, one per layer; or a dict
            ``{layer name: weights}``. Each layer is a row, each head a column.
        path: Where to write the PNG.
        tokens: Optional labels of the queries (and of the keys, unless
            `key_tokens`), one per position.
        key_tokens: Optional labels of the keys.
        title: Optional figure title.
        layer_names: Optional row names, one per layer (default: the dict's keys).
        heads: Which heads to draw: None for all, an int n for the first n, or a
            sequence of head indices. Panels are titled with the true index.
        example: Which example of a batch ``(B, H, Tq, Tk)`` to draw.
        max_labels: Most labels shown along one axis; longer sequences are thinned.
        dpi: Resolution of the PNG.

    Returns:
        `path`.
    """
    figure = attention_figure(
        weights,
        tokens,
        key_tokens,
        title,
        layer_names=layer_names,
        heads=heads,
        example=example,
        max_labels=max_labels,
    )
    figure.savefig(path, dpi=dpi)
    return path


def attention_figure(
    weights,
    tokens=None,
    key_tokens=None,
    title=None,
    *,
    layer_names=None,
    heads=None,
    example=0,
    max_labels=40,
):
    """The figure `plot_attention` saves, for showing or further drawing.

    Args:
        weights, tokens, key_tokens, title, layer_names, heads, example, max_labels:
            as for `plot_attention`.

    Returns:
        A `matplotlib.figure.Figure` with one panel per (layer, head) drawn and
        one shared colour bar. It is not registered with pyplot: Jupyter shows it
        as a cell's value, ``figure.savefig(path)`` writes it.
    """
    layers = attention_layers(weights, layer_names, example)
    _, query_length, key_length = layers[0][1].shape
    query_labels = token_labels(tokens, query_length)
    if key_tokens is None and tokens is not None and key_length != query_length:
        raise ValueError(
            f"`tokens` labels {query_length} queries but the keys are {key_length}: "
            f"give `key_tokens` too. Received: len(tokens)={len(query_labels)}"
        )
    key_labels = token_labels(key_tokens if key_tokens is not None else tokens, key_length)
    key_labels = key_labels if (key_tokens is not None or tokens is not None) else None
    rows = [(name, _chosen_heads(heads, w.shape[0], name), w) for name, w in layers]
    columns = max(len(chosen) for _, chosen, _ in rows)

    width = _panel_side(key_length, columns, MAX_FIGURE_INCHES[0])
    height = _panel_side(query_length, len(rows), MAX_FIGURE_INCHES[1])
    figure = _new_figure(
        figsize=(columns * width + 1.6, len(rows) * height + (1.2 if title else 0.8)),
        layout="constrained",
    )
    axes = figure.subplots(len(rows), columns, squeeze=False)
    vmax = max(float(w[chosen].max()) for _, chosen, w in rows) or 1.0
    image = None
    for r, (name, chosen, w) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            if c >= len(chosen):
                ax.set_axis_off()
                continue
            image = ax.imshow(w[chosen[c]], cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
            ax.set_title(f"head {chosen[c]}", fontsize=9)
            last_in_column = r == len(rows) - 1 or c >= len(rows[r + 1][1])
            shown_queries = query_labels if tokens is not None else None
            _label_axis(ax, "x", key_labels, width, max_labels, show=last_in_column)
            _label_axis(ax, "y", shown_queries, height, max_labels, show=c == 0)
            if last_in_column:
                ax.set_xlabel("key", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{name}\nquery" if len(rows) > 1 else "query", fontsize=9)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="weight")
    if title:
        figure.suptitle(title)
    return figure


def _chosen_heads(heads, num_heads, name):
    """The head indices to draw of a layer with `num_heads` heads."""
    if heads is None:
        return list(range(num_heads))
    if isinstance(heads, int):
        if heads <= 0:
            raise ValueError(f"`heads` must be a positive count. Received: heads={heads}")
        return list(range(min(heads, num_heads)))
    chosen = [int(h) for h in heads]
    if not chosen or any(not 0 <= h < num_heads for h in chosen):
        raise ValueError(
            f"`heads` must index the {num_heads} heads of layer {name!r}. "
            f"Received: heads={list(heads)!r}"
        )
    return chosen


def _panel_side(length, count, limit):
    """Inches along one side of a panel: `length` positions, `count` panels in a line."""
    side = float(np.clip(0.12 * length + 1.0, *PANEL_INCHES))
    return min(side, max((limit - 1.6) / count, 0.8))


def _label_axis(ax, which, labels, inches, max_labels, show):
    """Ticks along one axis of a panel: every `step`-th label, sized to its room."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    if labels is None:
        from matplotlib.ticker import MaxNLocator

        axis.set_major_locator(MaxNLocator(nbins=min(max_labels, 6), integer=True))
        ax.tick_params(axis=which, labelsize=7)
    else:
        room = 0.8 * inches * 72  # points along the axis that the labels may use
        step = max(math.ceil(len(labels) / max_labels), 1)
        step = max(step, math.ceil(len(labels) * (MIN_LABEL_POINTS + 1) / room))
        positions = list(range(0, len(labels), step))
        size = min(8.0, room / len(positions) - 1)
        axis.set_ticks(positions, [_short(labels[i]) for i in positions], fontsize=size)
        if which == "x":
            ax.tick_params(axis="x", labelrotation=90)
    if which == "x":
        ax.tick_params(axis="x", labelbottom=show)
    else:
        ax.tick_params(axis="y", labelleft=show)


def _short(label):
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"
