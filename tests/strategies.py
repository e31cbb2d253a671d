"""Hypothesis strategies shared by tests: random built-in patterns and their combinations."""

from hypothesis import strategies as st

from keras_attn import patterns as P

simple_patterns = st.one_of(
    st.builds(P.Local, st.integers(1, 40), causal=st.booleans()),
    st.builds(P.Dilated, st.integers(1, 8), st.integers(1, 4), causal=st.booleans()),
    st.builds(P.Strided, st.integers(1, 12), causal=st.booleans()),
    st.builds(P.BlockLocal, st.integers(1, 20), causal=st.booleans()),
    st.builds(P.GlobalTokens, st.integers(1, 3)),
    st.builds(
        lambda idx: P.GlobalTokens(indices=idx),
        st.lists(st.integers(0, 90), min_size=1, max_size=3, unique=True),
    ),
    st.just(P.Causal()),
)


@st.composite
def any_pattern(draw):
    """One to three simple patterns joined by ``|`` and ``&``."""
    parts = draw(st.lists(simple_patterns, min_size=1, max_size=3))
    out = parts[0]
    for p in parts[1:]:
        out = out | p if draw(st.booleans()) else out & p
    return out
