"""keras_attn.viz.heatmaps: a grid of layers by heads, with labels that stay readable."""

import itertools
import sys

import numpy as np
import pytest

from keras_attn import viz
from keras_attn.viz import heatmaps

pytest.importorskip("matplotlib")


def _weights(*shape, seed=0):
    """Random attention weights, rows summing to one: ``shape[:-1] + (Tk,)``."""
    return np.random.default_rng(seed).dirichlet(np.ones(shape[-1]), size=shape[:-1])


@pytest.fixture
def figure_of():
    def draw(*args, **kwargs):
        figure = viz.attention_figure(*args, **kwargs)
        figure.canvas.draw()
        return figure

    return draw


def _panels(figure):
    """The drawn panels (axes with an image), by their titles."""
    return [ax for ax in figure.axes if ax.images]


def test_plot_attention_writes_a_png(tmp_path):
    weights = _weights(2, 4, 4)  # (H, Tq, Tk)
    path = viz.plot_attention(weights, str(tmp_path / "w.png"), tokens=list("abcd"), title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"Received: shape=\(4,\)"):
        viz.plot_attention(np.ones(4), str(tmp_path / "bad.png"))


def test_plot_attention_without_matplotlib_names_the_viz_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"keras-attn\[viz\]"):
        viz.plot_attention(np.ones((2, 2)), str(tmp_path / "w.png"))


def test_drawing_leaves_pyplot_and_its_backend_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend, open_figures = matplotlib.get_backend(), plt.get_fignums()
    viz.plot_attention(_weights(2, 4, 4), str(tmp_path / "w.png"))
    viz.attention_figure(_weights(2, 4, 4))
    assert matplotlib.get_backend() == backend and plt.get_fignums() == open_figures


def test_grid_has_a_row_per_layer_and_a_panel_per_head_titled_by_its_index(figure_of):
    figure = figure_of({"block_0": _weights(3, 5, 5), "block_1": _weights(2, 5, 5)})
    rows = {}
    for ax in _panels(figure):
        rows.setdefault(round(ax.get_position().y0, 3), []).append(ax.get_title())
    assert sorted(rows.values(), key=len) == [["head 0", "head 1"], ["head 0", "head 1", "head 2"]]
    labels = {ax.get_ylabel() for ax in _panels(figure) if ax.get_ylabel()}
    assert labels == {"block_0\nquery", "block_1\nquery"}
    # The drawn numbers are the weights, panel by panel.
    first = _panels(figure)[0].images[0].get_array()
    np.testing.assert_allclose(first, _weights(3, 5, 5)[0], rtol=1e-6)


def test_heads_selects_by_count_or_index_and_titles_tell_the_truth(figure_of):
    weights = _weights(2, 4, 4)  # 2 heads: no panel may claim "heads 0-3"
    assert [ax.get_title() for ax in _panels(figure_of(weights))] == ["head 0", "head 1"]
    assert [ax.get_title() for ax in _panels(figure_of(weights, heads=4))] == ["head 0", "head 1"]
    assert [ax.get_title() for ax in _panels(figure_of(weights, heads=[1]))] == ["head 1"]
    with pytest.raises(ValueError, match=r"Received: heads=\[2\]"):
        figure_of(weights, heads=[2])


def test_batched_scores_are_drawn_for_the_chosen_example(figure_of):
    weights = _weights(3, 2, 4, 4)  # (B, H, Tq, Tk), as return_attention_scores gives
    figure = figure_of(weights, example=2)
    np.testing.assert_allclose(_panels(figure)[1].images[0].get_array(), weights[2, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="Received: example=3"):
        figure_of(weights, example=3)


def _text_boxes(figure):
    """Every visible, non-empty text of the figure with its extent in pixels."""
    renderer = figure.canvas.get_renderer()
    texts = [figure._suptitle] if figure._suptitle else []
    for ax in figure.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        texts += ax.get_xticklabels() + ax.get_yticklabels()
    return [(t, t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]


@pytest.mark.parametrize("length", [6, 40, 300])
def test_labels_neither_overlap_nor_fall_off_the_figure(figure_of, length):
    tokens = [f"token_{i:03d}" for i in range(length)]
    figure = figure_of(
        [_weights(4, length, length, seed=s) for s in range(2)], tokens, title="two layers"
    )
    boxes = _text_boxes(figure)
    page = figure.bbox
    for text, box in boxes:
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, text.get_text()
        assert page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, text.get_text()
    ticks = [(t, b) for t, b in boxes if t in _all_tick_labels(figure)]
    for (t1, b1), (t2, b2) in itertools.combinations(ticks, 2):
        assert not b1.overlaps(b2), (t1.get_text(), t2.get_text())
    for (text, box), ax in itertools.product(ticks, _panels(figure)):
        assert not box.overlaps(ax.bbox), (text.get_text(), ax.get_title())
    shown = [t for t, _ in ticks]
    assert min(t.get_fontsize() for t in shown) >= heatmaps.MIN_LABEL_POINTS
    if length <= 40:  # every token is labelled while there is room
        bottom = _panels(figure)[-1]
        assert [t.get_text() for t in bottom.get_xticklabels()] == tokens


def _all_tick_labels(figure):
    return {t for ax in figure.axes for t in ax.get_xticklabels() + ax.get_yticklabels()}


def test_whitespace_tokens_are_visible_and_long_ones_shortened(figure_of):
    tokens = [" ", "\n", "a" * 40, "b"]
    figure = figure_of(_weights(1, 4, 4), tokens)
    labels = [t.get_text() for t in _panels(figure)[0].get_yticklabels()]
    assert labels[:2] == ["␣", "⏎"]
    assert len(labels[2]) == heatmaps.MAX_LABEL_CHARS and labels[2].endswith("…")


def test_cross_attention_needs_key_labels_of_their_own(figure_of):
    weights = _weights(2, 3, 5)
    with pytest.raises(ValueError, match="give `key_tokens` too"):
        figure_of(weights, list("abc"))
    figure = figure_of(weights, list("abc"), key_tokens=list("vwxyz"))
    assert [t.get_text() for t in _panels(figure)[-1].get_xticklabels()] == list("vwxyz")


@pytest.mark.parametrize(
    "weights, message",
    [
        ([], "Received: weights=\\[\\]"),
        ([np.ones((1, 2, 2)), np.ones((1, 3, 3))], "same numbers of queries and keys"),
        (np.full((1, 2, 2), np.nan), "must be finite"),
        (np.ones((1, 0, 2)), "are empty"),
    ],
)
def test_bad_weights_are_rejected_with_what_was_received(figure_of, weights, message):
    with pytest.raises(ValueError, match=message):
        figure_of(weights)


def test_tokens_of_the_wrong_length_are_rejected(figure_of):
    with pytest.raises(ValueError, match=r"Received: len\(tokens\)=3"):
        figure_of(_weights(1, 4, 4), list("abc"))
    with pytest.raises(ValueError, match="not one string"):
        figure_of(_weights(1, 4, 4), "abcd")


def test_the_readme_lines_run(tmp_path):
    # README "Using it": the weights of a call, as a PNG and as the viewer's page.
    import keras_attn

    layer = keras_attn.SelfAttention(num_heads=2, key_dim=4)
    x = np.random.default_rng(0).random((1, 5, 8)).astype("float32")
    words = "the cat sat on mats".split()
    _, weights = layer(x, return_attention_scores=True)
    png = keras_attn.viz.plot_attention(weights, str(tmp_path / "heads.png"), tokens=words)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    viewer = keras_attn.viz.attention_viewer(weights, words, path=str(tmp_path / "a.html"))
    page = (tmp_path / "a.html").read_text()
    assert page == viewer.html and all(w in page for w in words)
