"""keras_attn.viz.masks: a pattern's mask, drawn as text."""

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
