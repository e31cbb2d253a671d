"""Property tests (hypothesis) of the attention layers.

- Weights are zero outside the pattern (random patterns, combined with | and &) and
  outside the data masks.
- Rows sum to 1 (softmax, topk, sparsemax) or are one-hot (hard); a row with no
  allowed key is all zeros.
- A causal layer's output at position i does not change when inputs after i change.
"""

import functools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn import patterns

B, H, D = 2, 2, 8

# -- patterns as plain data, their numpy masks and their keras_attn objects -------------

windows = st.integers(1, 4)
flags = st.booleans()
leaves = st.one_of(
    st.just(("full",)),
    st.just(("causal",)),
    st.tuples(st.just("local"), windows, flags),
    st.tuples(st.just("dilated"), windows, st.integers(1, 3), flags),
    st.tuples(st.just("strided"), st.integers(1, 4), flags),
    st.tuples(st.just("block_local"), st.integers(1, 4), flags),
    st.tuples(st.just("global_tokens"), st.integers(1, 2)),
)
pattern_specs = st.recursive(
    leaves,
    lambda children: st.tuples(st.sampled_from(["|", "&"]), children, children),
    max_leaves=4,
)


def np_mask(spec, i, j):
    """The pattern's mask from its definition; i (Tq, 1) and j (1, Tk) positions."""
    kind, *args = spec
    causal = j <= i
    if kind == "full":
        return np.ones_like(i - j, bool)
    if kind == "causal":
        return causal
    if kind == "global_tokens":
        return (i < args[0]) | (j < args[0])
    if kind in ("|", "&"):
        a, b = np_mask(args[0], i, j), np_mask(args[1], i, j)
        return a | b if kind == "|" else a & b
    *params, is_causal = args
    d = i - j
    if kind == "local":
        m = np.abs(d) < params[0]
    elif kind == "dilated":
        m = (np.abs(d) < params[0] * params[1]) & (d % params[1] == 0)
    elif kind == "strided":
        m = d % params[0] == 0
    else:  # block_local
        m = i // params[0] == j // params[0]
    return m & causal if is_causal else m


def make_pattern(spec):
    kind, *args = spec
    if kind == "full":
        return patterns.Full()
    if kind == "causal":
        return patterns.Causal()
    if kind in ("|", "&"):
        a, b = make_pattern(args[0]), make_pattern(args[1])
        return a | b if kind == "|" else a & b
    cls = {
        "local": patterns.Local,
        "dilated": patterns.Dilated,
        "strided": patterns.Strided,
        "block_local": patterns.BlockLocal,
        "global_tokens": patterns.GlobalTokens,
    }[kind]
    return cls(*args)


# -- weights ------------------------------------------------------------------------------


@given(
    spec=pattern_specs,
    normalizer=st.sampled_from(["softmax", "hard", "topk", "sparsemax"]),
    lengths=st.sampled_from([(5, 5), (4, 7)]),
    use_causal_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_weights_are_zero_outside_the_pattern_and_rows_normalize(
    spec, normalizer, lengths, use_causal_mask, seed
):
    tq, tk = lengths
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((B, tq, D)).astype("float32")
    value = rng.standard_normal((B, tk, D)).astype("float32")
    value_mask = rng.random((B, tk)) > 0.2
    normalizer_spec = {"name": "topk", "config": {"k": 2}} if normalizer == "topk" else normalizer
    layer = keras_attn.Attention(
        num_heads=H, pattern=make_pattern(spec), normalizer=normalizer_spec
    )
    _, weights = layer(
        query,
        value,
        value_mask=value_mask,
        use_causal_mask=use_causal_mask,
        return_attention_scores=True,
    )
    weights = ops.convert_to_numpy(weights)  # (B, H, Tq, Tk)

    i, j = np.arange(tq)[:, None], np.arange(tk)[None, :]
    allowed = np_mask(spec, i, j) & value_mask[:, None, None, :]  # (B, 1, Tq, Tk)
    if use_causal_mask:
        allowed = allowed & (j <= i)
    allowed = np.broadcast_to(allowed, weights.shape)
    np.testing.assert_array_equal(weights[~allowed], 0.0)
    assert (weights >= 0).all()

    has_key = allowed.any(-1)
    np.testing.assert_array_equal(weights.sum(-1)[~has_key], 0.0)
    np.testing.assert_allclose(weights.sum(-1)[has_key], 1.0, atol=1e-5)
    if normalizer == "hard":
        rows = weights[has_key]
        np.testing.assert_array_equal(rows.max(-1), 1.0)
        np.testing.assert_array_equal((rows > 0).sum(-1), 1)
    if normalizer == "topk":
        assert ((weights > 0).sum(-1) <= 2).all()  # no ties among random logits


# -- causality ------------------------------------------------------------------------------

T = 6
CAUSAL_LAYERS = {
    "softmax_fused": (lambda: keras_attn.Attention(num_heads=H, pattern="causal"), {}),
    "use_causal_mask": (
        lambda: keras_attn.MultiHeadAttention(num_heads=H, key_dim=4),
        dict(use_causal_mask=True),
    ),
    "hard_additive": (
        lambda: keras_attn.HardAttention(num_heads=H, pattern="causal", score="additive"),
        {},
    ),
    "sparsemax_general": (
        lambda: keras_attn.Attention(
            num_heads=H, pattern="causal", score="general", normalizer="sparsemax"
        ),
        {},
    ),
    "topk_cosine": (
        lambda: keras_attn.Attention(
            num_heads=H, pattern="causal", score="cosine", normalizer="topk"
        ),
        {},
    ),
    "relative_position": (
        lambda: keras_attn.Attention(
            num_heads=H,
            score_mods=[
                {
                    "name": "relative_position",
                    "config": {"num_buckets": 8, "embeddings_initializer": "random_normal"},
                },
                "softcap",
            ],
        ),
        dict(use_causal_mask=True),
    ),
    "local_causal": (lambda: keras_attn.LocalAttention(window=2, causal=True, num_heads=H), {}),
    "dilated_or_strided": (
        lambda: keras_attn.Attention(
            num_heads=H,
            pattern=patterns.Dilated(2, causal=True) | patterns.Strided(3, causal=True),
        ),
        {},
    ),
}


@functools.cache
def built_layer(name):
    make, call_kwargs = CAUSAL_LAYERS[name]
    layer = make()
    layer(np.zeros((B, T, D), "float32"), **call_kwargs)
    return layer, call_kwargs


@given(
    name=st.sampled_from(sorted(CAUSAL_LAYERS)),
    position=st.integers(0, T - 2),
    return_scores=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal_output_ignores_later_inputs(name, position, return_scores, seed):
    layer, call_kwargs = built_layer(name)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype("float32")
    changed = x.copy()
    changed[:, position + 1 :] = rng.standard_normal((B, T - position - 1, D)) * 3

    def run(inputs):
        out = layer(inputs, return_attention_scores=return_scores, **call_kwargs)
        return ops.convert_to_numpy(out[0] if return_scores else out)

    before, after = run(x), run(changed)
    np.testing.assert_allclose(after[:, : position + 1], before[:, : position + 1], atol=1e-6)
    # The change did reach the later positions (the test can fail).
    assert not np.allclose(after[:, position + 1 :], before[:, position + 1 :], atol=1e-4)
