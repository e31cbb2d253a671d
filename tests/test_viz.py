"""keras_attn.viz: masks drawn as text, weights drawn as heatmaps."""

import sys

import numpy as np
import pytest

from keras_attn import viz


def test_render_mask_draws_one_line_per_query():
    mask = np.tril(np.ones((3, 3), bool))
    assert viz.render_mask(mask) == "0 █··\n1 ██·\n2 ███\n6 of 9 pairs allowed (66.7%)"
    drawn = viz.render_mask(mask[:2], allowed="x", blocked=".", query_offset=9)
    assert drawn.splitlines()[:2] == [" 9 x..", "10 xx."]


def test_render_mask_rejects_other_ranks():
    with pytest.raises(ValueError, match="mask.shape=\\(2, 2, 2\\)"):
        viz.render_mask(np.ones((2, 2, 2), bool))


def test_pattern_mask_matches_numpy():
    np.testing.assert_array_equal(viz.pattern_mask("causal", 4), np.tril(np.ones((4, 4), bool)))
    i, j = np.arange(5)[:, None], np.arange(5)[None, :]
    local = {"name": "local", "config": {"window": 2}}
    np.testing.assert_array_equal(viz.pattern_mask(local, 5), np.abs(i - j) < 2)


def test_plot_attention_writes_a_png(tmp_path):
    weights = np.random.default_rng(0).dirichlet(np.ones(4), size=(2, 4))  # (H, Tq, Tk)
    path = viz.plot_attention(weights, str(tmp_path / "w.png"), tokens=list("abcd"), title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="weights.shape=\\(4,\\)"):
        viz.plot_attention(np.ones(4), str(tmp_path / "bad.png"))


def test_plot_attention_without_matplotlib_names_the_viz_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"keras-attn\[viz\]"):
        viz.plot_attention(np.ones((2, 2)), str(tmp_path / "w.png"))
