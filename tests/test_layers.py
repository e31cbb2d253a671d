"""Tests of keras_attn.layers: every layer against a numpy reference and against Keras.

The reference below recomputes a whole layer in numpy from the layer's own weights
(projections, score, score_mods, pattern, data masks, normalizer, weighted sum and
output projection), written from the papers' formulas, not from the library code.
"""

import math
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import score_mods
from keras_attn import scores
from keras_attn.errors import ComponentKindError
from keras_attn.errors import UnknownComponentError
from tests.decoding import assert_decodes_like_one_pass

RNG = np.random.default_rng(1234)


def randn(*shape):
    return RNG.standard_normal(shape).astype("float32")


# -- numpy reference ------------------------------------------------------------------


def np_pattern(spec, q_pos, k_pos):
    """Bool (Tq, Tk) mask of a pattern given as a nested tuple, e.g. ("local", 2, True)."""
    i = np.asarray(q_pos)[:, None]
    j = np.asarray(k_pos)[None, :]
    kind, *args = spec
    if kind == "full":
        return np.ones((i.size, j.size), bool)
    if kind == "causal":
        return np.broadcast_to(j <= i, (i.size, j.size))
    if kind == "local":
        window, causal = args
        m = np.abs(i - j) < window
        return m & (j <= i) if causal else m
    if kind == "dilated":
        window, dilation, causal = args
        m = (np.abs(i - j) < window * dilation) & ((i - j) % dilation == 0)
        return m & (j <= i) if causal else m
    if kind == "strided":
        stride, causal = args
        m = (i - j) % stride == 0
        return m & (j <= i) if causal else m
    if kind == "block_local":
        size, causal = args
        m = (i // size) == (j // size)
        return m & (j <= i) if causal else m
    if kind == "global_tokens":
        (n,) = args
        return np.broadcast_to((i < n) | (j < n), (i.size, j.size))
    if kind == "|":
        return np_pattern(args[0], q_pos, k_pos) | np_pattern(args[1], q_pos, k_pos)
    if kind == "&":
        return np_pattern(args[0], q_pos, k_pos) & np_pattern(args[1], q_pos, k_pos)
    raise AssertionError(spec)


def t5_bucket(relative, num_buckets, max_distance, bidirectional):
    """T5's relative position bucket (Raffel et al., 2020), relative = key - query."""
    n = -np.asarray(relative)
    out = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        out += (n < 0).astype(n.dtype) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(np.maximum(n, 1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).astype(n.dtype)
    large = np.minimum(large, num_buckets - 1)
    return out + np.where(n < max_exact, n, large)


def np_score(layer, q, k):
    """Logits (B, H, Tq, Tk) from heads q (B, H, Tq, D), k (B, H, Tk, D)."""
    s = layer.score
    if type(s) is scores.Dot:
        return q @ np.swapaxes(k, -1, -2)
    if type(s) is scores.ScaledDot:
        scale = s.scale if s.scale is not None else 1 / math.sqrt(q.shape[-1])
        return q @ np.swapaxes(k, -1, -2) * scale
    if type(s) is scores.General:
        return q @ np.asarray(s.kernel) @ np.swapaxes(k, -1, -2)
    if type(s) is scores.Additive:
        qh = q @ np.asarray(s.query_kernel)  # (B, H, Tq, U)
        kh = k @ np.asarray(s.key_kernel)  # (B, H, Tk, U)
        hidden = np.tanh(qh[..., :, None, :] + kh[..., None, :, :] + np.asarray(s.bias))
        return hidden @ np.asarray(s.v)
    if type(s) is scores.Cosine:
        qn = q / (np.linalg.norm(q, axis=-1, keepdims=True) + s.epsilon)
        kn = k / (np.linalg.norm(k, axis=-1, keepdims=True) + s.epsilon)
        return s.scale * qn @ np.swapaxes(kn, -1, -2)
    raise AssertionError(type(s))


def np_score_mod(mod, logits, q_pos, k_pos):
    if type(mod) is score_mods.Softcap:
        return mod.cap * np.tanh(logits / mod.cap)
    if type(mod) is score_mods.RelativePosition:
        bucket = t5_bucket(
            k_pos[None, :] - q_pos[:, None], mod.num_buckets, mod.max_distance, mod.bidirectional
        )  # (Tq, Tk)
        table = np.asarray(mod.embeddings)  # (buckets, H)
        return logits + np.moveaxis(table[bucket], -1, 0)  # + (H, Tq, Tk)
    raise AssertionError(type(mod))


def np_sparsemax(z):
    s = np.sort(z)[::-1]
    cs = np.cumsum(s)
    k = np.arange(1, z.size + 1)
    kz = k[1 + k * s > cs][-1]
    tau = (cs[kz - 1] - 1) / kz
    return np.maximum(z - tau, 0)


def np_normalize(normalizer, logits, allowed):
    """Weights from logits and a bool mask of the same shape, row by row."""
    out = np.zeros(logits.shape, np.float64)
    rows_l = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    rows_a = np.broadcast_to(allowed, logits.shape).reshape(rows_l.shape)
    flat = out.reshape(rows_l.shape)
    for r, (z, a) in enumerate(zip(rows_l, rows_a, strict=True)):
        if not a.any():
            continue  # a row with no allowed key: all zeros
        za = z[a]
        if type(normalizer) is normalizers.Softmax:
            w = np.exp(za - za.max())
            w /= w.sum()
        elif type(normalizer) is normalizers.Hard:
            w = np.zeros_like(za)
            w[np.argmax(za)] = 1.0
        elif type(normalizer) is normalizers.TopK:
            kth = np.sort(za)[::-1][min(normalizer.k, za.size) - 1]
            keep = za >= kth
            w = np.where(keep, np.exp(za - za.max()), 0.0)
            w /= w.sum()
        elif type(normalizer) is normalizers.Sparsemax:
            w = np_sparsemax(za)
        else:
            raise AssertionError(type(normalizer))
        flat[r, a] = w
    return out


def weights_by_name(layer):
    """The projection weights keyed as "query/kernel", "attention_output/bias", ..."""
    return {"/".join(w.path.split("/")[-2:]): np.asarray(w) for w in layer.weights}


def np_project(x, w, name):
    out = np.einsum("btc,chd->bthd", x, w[f"{name}/kernel"])
    return out + w[f"{name}/bias"] if f"{name}/bias" in w else out


def reference(layer, query, value=None, key=None, *, pattern=("full",), mask=None, query_offset=0):
    """The whole layer in numpy: returns (output (B, Tq, E), weights (B, H, Tq, Tk)).

    Args:
        pattern: The layer's pattern as an `np_pattern` spec.
        mask: Bool data mask (B, Tq, Tk) or None.
    """
    value = query if value is None else value
    key = value if key is None else key
    w = weights_by_name(layer)
    q = np.swapaxes(np_project(query, w, "query"), 1, 2)  # (B, H, Tq, D)
    k = np.swapaxes(np_project(key, w, "key"), 1, 2)  # (B, H, Tk, D)
    v = np.swapaxes(np_project(value, w, "value"), 1, 2)  # (B, H, Tk, Dv)
    tq, tk = q.shape[2], k.shape[2]
    q_pos = np.arange(tq) + query_offset
    k_pos = np.arange(tk)
    logits = np_score(layer, q, k)
    for mod in layer.score_mods:
        logits = np_score_mod(mod, logits, q_pos, k_pos)
    allowed = np_pattern(pattern, q_pos, k_pos)[None, None]  # (1, 1, Tq, Tk)
    if mask is not None:
        allowed = allowed & np.asarray(mask, bool)[:, None]
    weights = np_normalize(layer.normalizer, logits, allowed)  # (B, H, Tq, Tk)
    out = np.swapaxes(weights @ v, 1, 2)  # (B, Tq, H, Dv)
    if "gate/kernel" in w:
        out = out / (1 + np.exp(-np_project(query, w, "gate")))
    out = np.einsum("bthd,hde->bte", out, w["attention_output/kernel"])
    if "attention_output/bias" in w:
        out = out + w["attention_output/bias"]
    return out, weights


def assert_close(actual, expected, atol=1e-5, rtol=1e-4):
    np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, atol=atol, rtol=rtol)


# -- drop-in for keras.layers.MultiHeadAttention --------------------------------------

B, TQ, TK = 2, 5, 7
X = randn(B, TQ, 8)  # query
C = randn(B, TK, 6)  # context (value)
K = randn(B, TK, 4)  # separate key
QMASK = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
VMASK = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], bool)
KMASK = np.array([[1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], bool)
ATT_MASK = RNG.random((B, TQ, TK)) > 0.4
ATT_MASK[0, 2] = False  # a query row with no allowed key


def mha_pair(call_args, **kwargs):
    """A keras and a keras_attn MultiHeadAttention with the same weights."""
    theirs = keras.layers.MultiHeadAttention(**kwargs)
    ours = keras_attn.MultiHeadAttention(**kwargs)
    # Keras's own fused path fails on JAX when value_dim != key_dim: build it unfused.
    theirs(*call_args, return_attention_scores=True)
    ours(*call_args)
    names = [w.path.split("/", 1)[1] for w in theirs.weights]
    assert [w.path.split("/", 1)[1] for w in ours.weights] == names
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    ours.set_weights(theirs.get_weights())
    return theirs, ours


def np_allowed(tq, tk, *, causal=False, window=None, mask=None):
    allowed = np.ones((B, tq, tk), bool)
    i, j = np.arange(tq)[:, None], np.arange(tk)[None, :]
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= np.abs(i - j) < window
    if mask is not None:
        allowed &= mask
    return allowed


MHA_CASES = {
    "self": (dict(num_heads=2, key_dim=4), (X, X), {}, {}),
    "cross": (dict(num_heads=2, key_dim=3), (X, C), {}, {}),
    "key_not_value": (dict(num_heads=3, key_dim=2), (X, C, K), {}, {}),
    "causal_self": (
        dict(num_heads=2, key_dim=4),
        (X, X),
        dict(use_causal_mask=True),
        dict(causal=True),
    ),
    "causal_cross": (
        dict(num_heads=2, key_dim=4),
        (X, C),
        dict(use_causal_mask=True),
        dict(causal=True),
    ),
    "padding_masks": (
        dict(num_heads=2, key_dim=4),
        (X, C, K),
        dict(query_mask=QMASK, value_mask=VMASK, key_mask=KMASK),
        dict(mask=QMASK[:, :, None] & VMASK[:, None] & KMASK[:, None]),
    ),
    "attention_mask": (
        dict(num_heads=2, key_dim=4),
        (X, C),
        dict(attention_mask=ATT_MASK),
        dict(mask=ATT_MASK),
    ),
    "attention_mask_and_causal": (
        dict(num_heads=2, key_dim=4),
        (X, C),
        dict(attention_mask=ATT_MASK, use_causal_mask=True),
        dict(mask=ATT_MASK, causal=True),
    ),
    "output_shape": (dict(num_heads=2, key_dim=4, output_shape=(10,)), (X, C), {}, {}),
    "output_shape_int": (dict(num_heads=2, key_dim=4, output_shape=3), (X, X), {}, {}),
    "no_bias": (dict(num_heads=2, key_dim=4, use_bias=False), (X, C), {}, {}),
    "value_dim": (dict(num_heads=2, key_dim=3, value_dim=5), (X, C, K), {}, {}),
    "gate": (dict(num_heads=2, key_dim=3, value_dim=5, use_gate=True), (X, C), {}, {}),
    "sliding_window": (dict(num_heads=2, key_dim=4, sliding_window=2), (X, X), {}, dict(window=2)),
    "sliding_window_causal": (
        dict(num_heads=2, key_dim=4, sliding_window=3),
        (X, C),
        dict(use_causal_mask=True, query_mask=QMASK),
        dict(window=3, causal=True, mask=QMASK[:, :, None]),
    ),
    "dropout_inference": (dict(num_heads=2, key_dim=4, dropout=0.5), (X, C), {}, {}),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multi_head_attention_matches_keras(case):
    kwargs, inputs, call_kwargs, allowed_kwargs = MHA_CASES[case]
    theirs, ours = mha_pair(inputs, **kwargs)
    tq, tk = inputs[0].shape[1], inputs[-1].shape[1]
    allowed = np_allowed(tq, tk, **allowed_kwargs)  # (B, Tq, Tk)
    rows = allowed.any(-1)  # (B, Tq): rows with at least one allowed key
    expected, expected_scores = theirs(*inputs, return_attention_scores=True, **call_kwargs)
    expected = ops.convert_to_numpy(expected)
    expected_scores = ops.convert_to_numpy(expected_scores)

    output, scores_ = ours(*inputs, return_attention_scores=True, **call_kwargs)
    assert ours.last_path == "dense"
    output, scores_ = ops.convert_to_numpy(output), ops.convert_to_numpy(scores_)
    np.testing.assert_allclose(output[rows], expected[rows], atol=1e-5)
    np.testing.assert_allclose(
        np.moveaxis(scores_, 1, 2)[rows], np.moveaxis(expected_scores, 1, 2)[rows], atol=1e-6
    )
    # Where keras spreads a masked row uniformly, keras_attn gives zero weights and
    # an output of just the output bias.
    np.testing.assert_array_equal(np.moveaxis(scores_, 1, 2)[~rows], 0.0)
    bias = weights_by_name(ours).get("attention_output/bias", 0.0)
    np.testing.assert_allclose(output[~rows], np.broadcast_to(bias, output[~rows].shape), atol=1e-6)

    fused = ops.convert_to_numpy(ours(*inputs, **call_kwargs))
    # The fused kernel needs a full or causal pattern and one head size for keys and values.
    fusable = (
        "sliding_window" not in kwargs
        and kwargs.get("value_dim", kwargs["key_dim"]) == kwargs["key_dim"]
    )
    expected_path = "fused" if fusable else "dense"
    assert ours.last_path == expected_path
    np.testing.assert_allclose(fused[rows], expected[rows], atol=1e-5)
    np.testing.assert_allclose(fused[~rows], output[~rows], atol=1e-6)


def test_multi_head_attention_matches_keras_with_propagated_keras_masks():
    tokens_q = np.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 1]], "int32")
    tokens_v = np.array([[1, 2, 0, 0, 0, 0, 0], [0, 0, 3, 4, 5, 6, 7]], "int32")
    allowed = (tokens_q != 0)[:, :, None] & (tokens_v != 0)[:, None, :]
    rows = allowed.any(-1)

    def model(attention_cls):
        q_in = keras.Input((TQ,), dtype="int32")
        v_in = keras.Input((TK,), dtype="int32")
        embed = keras.layers.Embedding(10, 8, mask_zero=True, name="embed")
        attention = attention_cls(num_heads=2, key_dim=4, name="mha")
        out = attention(embed(q_in), embed(v_in))
        return keras.Model([q_in, v_in], out)

    theirs, ours = model(keras.layers.MultiHeadAttention), model(keras_attn.MultiHeadAttention)
    ours.set_weights(theirs.get_weights())
    expected = ops.convert_to_numpy(theirs([tokens_q, tokens_v]))
    output = ops.convert_to_numpy(ours([tokens_q, tokens_v]))
    assert ours.get_layer("mha").last_path == "fused"
    np.testing.assert_allclose(output[rows], expected[rows], atol=1e-5)
    # Without the masks the outputs would differ: the test can fail.
    embed, mha = ours.get_layer("embed"), ours.get_layer("mha")
    table = np.asarray(embed.embeddings)
    plain = ops.convert_to_numpy(mha(table[tokens_q], table[tokens_v]))
    assert not np.allclose(plain[rows], expected[rows], atol=1e-3)

    # The query's Keras mask is kept on the output.
    out = mha(embed(tokens_q), embed(tokens_v))
    np.testing.assert_array_equal(ops.convert_to_numpy(out._keras_mask), tokens_q != 0)


def test_multi_head_attention_constructor_matches_keras():
    kwargs = dict(
        num_heads=3,
        key_dim=4,
        value_dim=2,
        dropout=0.1,
        use_bias=False,
        output_shape=(5,),
        attention_axes=None,
        kernel_initializer="he_normal",
        bias_initializer="ones",
        kernel_regularizer="l2",
        bias_regularizer="l1",
        activity_regularizer="l2",
        kernel_constraint="non_neg",
        bias_constraint="unit_norm",
        seed=3,
        use_gate=True,
        sliding_window=4,
        name="drop_in",
    )
    keras.layers.MultiHeadAttention(**kwargs)
    ours = keras_attn.MultiHeadAttention(**kwargs)
    assert ours.num_heads == 3 and ours.key_dim == 4 and ours.value_dim == 2
    assert ours.sliding_window == 4 and ours.use_gate and ours.name == "drop_in"
    ours(X)
    assert isinstance(ours.kernel_initializer, keras.initializers.HeNormal)
    assert len(ours.losses) > 0  # regularizers are applied


# -- every preset against the numpy reference -----------------------------------------

PRESET_CASES = {
    "attention_default": (lambda: keras_attn.Attention(), (X,), {}, ("full",)),
    "attention_dot_heads": (
        lambda: keras_attn.Attention(num_heads=2, score="dot", key_dim=3),
        (X, C),
        {},
        ("full",),
    ),
    "soft_general_dict": (
        lambda: keras_attn.SoftAttention(num_heads=2, score={"name": "general", "config": {}}),
        (X,),
        dict(query_mask=QMASK),
        ("full",),
    ),
    "hard_local_cross_4_heads": (
        lambda: keras_attn.HardAttention(num_heads=4, key_dim=2, pattern=patterns.Local(2)),
        (X, C),
        dict(value_mask=VMASK),
        ("local", 2, False),
    ),
    "cross_hard_local_4_heads": (
        lambda: keras_attn.CrossAttention(
            num_heads=4,
            key_dim=2,
            normalizer="hard",
            pattern={"name": "local", "config": {"window": 3}},
        ),
        (X, C),
        dict(context_mask=VMASK),
        ("local", 3, False),
    ),
    "global_additive": (
        lambda: keras_attn.GlobalAttention(num_heads=2, score=scores.Additive(units=5)),
        (X, C, K),
        dict(key_mask=KMASK),
        ("full",),
    ),
    "local_causal_cosine": (
        lambda: keras_attn.LocalAttention(window=2, causal=True, num_heads=2, score="cosine"),
        (X,),
        {},
        ("local", 2, True),
    ),
    "self_topk_causal": (
        lambda: keras_attn.SelfAttention(
            num_heads=2, normalizer={"name": "topk", "config": {"k": 2}}, pattern="causal"
        ),
        (X,),
        dict(mask=QMASK),
        ("causal",),
    ),
    "cross_sparsemax": (
        lambda: keras_attn.CrossAttention(
            num_heads=2, normalizer=normalizers.Sparsemax(), score="dot"
        ),
        (X, C),
        {},
        ("full",),
    ),
    "mha_score_mods": (
        lambda: keras_attn.MultiHeadAttention(
            num_heads=2,
            key_dim=3,
            score_mods=[
                {"name": "softcap", "config": {"cap": 1.5}},
                score_mods.RelativePosition(
                    num_buckets=8, max_distance=16, embeddings_initializer="random_normal"
                ),
            ],
        ),
        (X,),
        dict(use_causal_mask=True),
        ("causal",),
    ),
    "combined_pattern": (
        lambda: keras_attn.Attention(
            num_heads=2,
            pattern=patterns.Dilated(2, dilation=2) | patterns.GlobalTokens(1),
            score_mods="softcap",
            normalizer="sparsemax",
        ),
        (X,),
        dict(use_causal_mask=True),
        ("&", ("|", ("dilated", 2, 2, False), ("global_tokens", 1)), ("causal",)),
    ),
    "intersection_pattern": (
        lambda: keras_attn.Attention(
            pattern=patterns.Strided(2) & patterns.BlockLocal(4, causal=True),
            score=scores.ScaledDot(scale=0.3),
        ),
        (X, C),
        {},
        ("&", ("strided", 2, False), ("block_local", 4, True)),
    ),
    "relative_position_unidirectional_cross": (
        lambda: keras_attn.Attention(
            num_heads=3,
            key_dim=2,
            score="general",
            score_mods=[
                {
                    "name": "relative_position",
                    "config": {
                        "num_buckets": 6,
                        "max_distance": 8,
                        "bidirectional": False,
                        "embeddings_initializer": "random_normal",
                    },
                }
            ],
        ),
        (X, C),
        dict(attention_mask=ATT_MASK),
        ("full",),
    ),
}


def data_mask(call_kwargs, tq, tk):
    """The (B, Tq, Tk) data mask a call's keyword arguments describe, or None."""
    mask = np.ones((B, tq, tk), bool)
    if "query_mask" in call_kwargs:
        mask &= call_kwargs["query_mask"][:, :, None]
    if "mask" in call_kwargs:  # SelfAttention: query and key/value
        mask &= call_kwargs["mask"][:, :, None] & call_kwargs["mask"][:, None, :]
    for arg in ("value_mask", "key_mask", "context_mask"):
        if arg in call_kwargs:
            mask &= call_kwargs[arg][:, None, :]
    if "attention_mask" in call_kwargs:
        mask &= call_kwargs["attention_mask"]
    return mask


@pytest.mark.parametrize("case", list(PRESET_CASES))
def test_preset_matches_numpy_reference(case):
    make, inputs, call_kwargs, pattern = PRESET_CASES[case]
    layer = make()
    call_inputs = inputs[:2] if isinstance(layer, keras_attn.CrossAttention) else inputs
    call_inputs = inputs[:1] if isinstance(layer, keras_attn.SelfAttention) else call_inputs
    output, weights = layer(*call_inputs, return_attention_scores=True, **call_kwargs)
    tq, tk = inputs[0].shape[1], call_inputs[-1].shape[1]
    expected, expected_weights = reference(
        layer, *call_inputs, pattern=pattern, mask=data_mask(call_kwargs, tq, tk)
    )
    assert_close(weights, expected_weights)
    assert_close(output, expected)
    # The test can fail: the pattern or masks changed the weights somewhere.
    if pattern != ("full",) or call_kwargs:
        unmasked, _ = reference(layer, *call_inputs)
        assert not np.allclose(unmasked, expected, atol=1e-4)


def test_hard_attention_forward_is_one_hot_on_allowed_keys():
    layer = keras_attn.HardAttention(num_heads=2, pattern="causal")
    _, weights = layer(X, return_attention_scores=True)
    weights = ops.convert_to_numpy(weights)
    np.testing.assert_array_equal(np.sort(weights, -1)[..., -1], 1.0)
    np.testing.assert_array_equal(weights.sum(-1), 1.0)
    np.testing.assert_array_equal(np.triu(np.ones((TQ, TQ)), 1) * weights, 0.0)


def test_components_as_names_dicts_and_instances_agree():
    made = [
        keras_attn.Attention(num_heads=2, score="general", normalizer="topk", pattern="causal"),
        keras_attn.Attention(
            num_heads=2,
            score={"name": "general", "config": {}},
            normalizer={"name": "topk", "config": {"k": 8}},
            pattern={"name": "causal", "config": {}},
        ),
        keras_attn.Attention(
            num_heads=2,
            score=scores.General(),
            normalizer=normalizers.TopK(),
            pattern=patterns.Causal(),
        ),
    ]
    outputs = []
    for layer in made:
        layer(X)
        layer.set_weights(made[0].get_weights())
        assert type(layer.score) is scores.General
        assert type(layer.normalizer) is normalizers.TopK and layer.normalizer.k == 8
        assert type(layer.pattern) is patterns.Causal
        outputs.append(ops.convert_to_numpy(layer(X)))
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-6)
    np.testing.assert_allclose(outputs[2], outputs[0], atol=1e-6)


def test_keras_mask_propagates_through_every_layer():
    tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]], "int32")
    context_tokens = np.array([[1, 2, 3, 4, 0, 0, 0], [4, 5, 6, 7, 8, 9, 0]], "int32")
    embed = keras.layers.Embedding(10, 8, mask_zero=True)
    for layer in [
        keras_attn.Attention(num_heads=2),
        keras_attn.SelfAttention(num_heads=2, normalizer="hard"),
        keras_attn.CrossAttention(num_heads=2, score="dot"),
        keras_attn.LocalAttention(window=2),
    ]:
        x = embed(tokens)
        if isinstance(layer, keras_attn.CrossAttention):
            out = layer(x, embed(context_tokens))
            value_tokens = context_tokens
        else:
            out = layer(x)
            value_tokens = tokens
        np.testing.assert_array_equal(ops.convert_to_numpy(out._keras_mask), tokens != 0)
        # The masks were used: same as passing them explicitly.
        inputs = (embed(tokens), embed(value_tokens))
        plain = [ops.convert_to_numpy(ops.stop_gradient(t)) for t in inputs]
        if isinstance(layer, keras_attn.SelfAttention):
            explicit = layer(plain[0], mask=tokens != 0)
        elif isinstance(layer, keras_attn.CrossAttention):
            explicit = layer(
                plain[0], plain[1], query_mask=tokens != 0, context_mask=value_tokens != 0
            )
        else:
            explicit = layer(plain[0], query_mask=tokens != 0, value_mask=value_tokens != 0)
        assert_close(out, ops.convert_to_numpy(explicit), atol=1e-6)


def test_masked_inputs_do_not_make_the_projections_warn():
    embed = keras.layers.Embedding(10, 8, mask_zero=True)
    tokens = np.array([[1, 2, 0, 0, 0], [3, 4, 5, 6, 7]], "int32")
    layer = keras_attn.Attention(num_heads=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(embed(tokens))
    assert not [w for w in caught if "mask" in str(w.message)]


def test_subclass_overriding_compute_attention_receives_keras_arguments():
    # As keras.layers.MultiHeadAttention: Keras's signature, and a (B, Tq, Tk) mask that
    # holds the padding masks and the causal mask.
    seen = {}

    class Recording(keras_attn.Attention):
        def _compute_attention(
            self, query, key, value, attention_mask=None, training=None,
            return_attention_scores=False,
        ):  # fmt: skip
            seen["mask"] = ops.convert_to_numpy(attention_mask)
            return super()._compute_attention(
                query, key, value, attention_mask, training, return_attention_scores
            )

    layer = Recording(num_heads=2)
    output = layer(X, C, query_mask=QMASK, value_mask=VMASK, use_causal_mask=True)
    causal = np.tril(np.ones((TQ, TK), bool))
    np.testing.assert_array_equal(
        seen["mask"], QMASK[:, :, None] & VMASK[:, None, :] & causal[None]
    )
    plain = keras_attn.Attention(num_heads=2)
    plain(X, C)
    plain.set_weights(layer.get_weights())
    expected = plain(X, C, query_mask=QMASK, value_mask=VMASK, use_causal_mask=True)
    np.testing.assert_allclose(
        ops.convert_to_numpy(output), ops.convert_to_numpy(expected), atol=1e-5
    )

    # Keras masks reach the override too.
    embed = keras.layers.Embedding(10, 8, mask_zero=True)
    tokens = np.array([[1, 2, 0, 0, 0], [3, 0, 0, 0, 0]], "int32")
    layer = Recording(num_heads=2)
    layer(embed(tokens))
    np.testing.assert_array_equal(
        seen["mask"], (tokens != 0)[:, :, None] & (tokens != 0)[:, None, :]
    )


# -- KV cache ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras_attn.MultiHeadAttention(num_heads=2, key_dim=3),
        lambda: keras_attn.Attention(
            num_heads=2,
            score="general",
            score_mods=[
                score_mods.RelativePosition(
                    num_buckets=6,
                    max_distance=8,
                    bidirectional=False,
                    embeddings_initializer="random_normal",
                )
            ],
        ),
        lambda: keras_attn.HardAttention(num_heads=2, pattern=patterns.Local(2, causal=True)),
    ],
    ids=["multi_head", "relative_position", "hard_local"],
)
def test_kv_cache_decoding_matches_full_causal_pass(make):
    x = randn(B, 5, 8)
    layer = make()
    _, cache = assert_decodes_like_one_pass(layer, x, prefill=2)
    # The cache holds the projected keys and values of every position (of the last
    # `window` positions, slot p % window, for a causal sliding window's ring cache).
    w = weights_by_name(layer)
    slots = cache.shape[2]
    assert slots == (2 if isinstance(layer.pattern, patterns.Local) else 5)
    ring = [p % slots for p in range(5 - slots, 5)]
    np.testing.assert_allclose(
        cache[:, 0][:, ring], np_project(x, w, "key")[:, 5 - slots :], atol=1e-5
    )
    np.testing.assert_allclose(
        cache[:, 1][:, ring], np_project(x, w, "value")[:, 5 - slots :], atol=1e-5
    )


def test_kv_cache_queries_see_absolute_positions():
    layer = keras_attn.Attention(
        num_heads=2,
        score_mods=[
            score_mods.RelativePosition(
                num_buckets=8, max_distance=16, embeddings_initializer="random_normal"
            )
        ],
    )
    x = randn(B, 6, 8)
    cache = ops.zeros((B, 2, 6, 2, 4))
    _, cache = layer(x[:, :5], cache=cache, cache_update_index=0, use_causal_mask=True)
    out, weights, _ = layer(
        x[:, 5:], cache=cache, cache_update_index=5, return_attention_scores=True
    )
    expected, expected_weights = reference(layer, x[:, 5:], x, pattern=("causal",), query_offset=5)
    assert_close(weights, expected_weights)
    assert_close(out, expected)
    # At position 0 instead, the relative positions and so the output differ.
    wrong, _ = reference(layer, x[:, 5:], x, query_offset=0)
    assert not np.allclose(wrong, expected, atol=1e-4)


def test_cache_without_index_is_read_as_it_is():
    # KerasHub's convention (e.g. a cross-attention's keys and values, computed once).
    layer = keras_attn.Attention(num_heads=2)
    expected = layer(X, C)
    _, cache = layer(X, C, cache=ops.zeros((B, 2, TK, 2, 4)), cache_update_index=0)
    output, same_cache = layer(X, C, cache=cache)
    np.testing.assert_allclose(
        ops.convert_to_numpy(output), ops.convert_to_numpy(expected), atol=1e-5
    )
    np.testing.assert_array_equal(ops.convert_to_numpy(same_cache), ops.convert_to_numpy(cache))


def test_kv_cache_errors():
    layer = keras_attn.Attention(num_heads=2)
    layer(X)
    with pytest.raises(ValueError, match=r"Received: cache.shape"):
        layer(X, cache=ops.zeros((B, TQ, 2, 4)), cache_update_index=0)


# -- config and saving --------------------------------------------------------------------

ALL_LAYERS = {
    "attention": (
        lambda: keras_attn.Attention(
            num_heads=2,
            score="additive",
            score_mods=["softcap"],
            pattern=patterns.Local(3) | patterns.GlobalTokens(1),
            normalizer="topk",
            dropout=0.1,
            kernel_regularizer="l2",
        ),
        False,
    ),
    "soft": (lambda: keras_attn.SoftAttention(num_heads=2, score="general", key_dim=3), False),
    "hard": (
        lambda: keras_attn.HardAttention(num_heads=2, gumbel=True, temperature=0.5, seed=1),
        False,
    ),
    "global": (lambda: keras_attn.GlobalAttention(num_heads=2, score="cosine", value_dim=3), False),
    "local": (lambda: keras_attn.LocalAttention(window=2, causal=True, num_heads=2), False),
    "self": (
        lambda: keras_attn.SelfAttention(
            num_heads=2,
            score_mods=[
                {"name": "relative_position", "config": {"embeddings_initializer": "random_normal"}}
            ],
        ),
        False,
    ),
    "cross": (
        lambda: keras_attn.CrossAttention(num_heads=2, normalizer="sparsemax", output_shape=5),
        True,
    ),
    "multi_head": (
        lambda: keras_attn.MultiHeadAttention(
            num_heads=2, key_dim=3, use_gate=True, sliding_window=2
        ),
        True,
    ),
}


def call_layer(layer, x, context, cross):
    if isinstance(layer, keras_attn.SelfAttention) or not cross:
        return layer(x)
    return layer(x, context)


@pytest.mark.parametrize("name", list(ALL_LAYERS))
def test_get_config_from_config_round_trip(name):
    make, cross = ALL_LAYERS[name]
    layer = make()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    out = call_layer(layer, X, C, cross)
    call_layer(clone, X, C, cross)
    clone.set_weights(layer.get_weights())
    assert_close(call_layer(clone, X, C, cross), ops.convert_to_numpy(out), atol=0)
    # Also through keras's generic (de)serialization, by registered name.
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is type(layer) and again.get_config() == layer.get_config()


@pytest.mark.parametrize("name", list(ALL_LAYERS))
def test_saved_keras_file_gives_identical_outputs(name, tmp_path):
    make, cross = ALL_LAYERS[name]
    x_in = keras.Input((TQ, 8))
    c_in = keras.Input((TK, 6))
    layer = make()
    out = call_layer(layer, x_in, c_in, cross)
    model = keras.Model([x_in, c_in], keras.layers.Dense(3)(out))
    expected = ops.convert_to_numpy(model([X, C]))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert_close(loaded([X, C]), expected, atol=0)
    restored = loaded.layers[[type(lyr) for lyr in loaded.layers].index(type(layer))]
    assert restored.get_config() == layer.get_config()
    for w, w0 in zip(restored.weights, layer.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(w), np.asarray(w0))


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: keras_attn.Attention(num_heads=0), r"Received: num_heads=0"),
        (lambda: keras_attn.Attention(num_heads=-2), r"Received: num_heads=-2"),
        (lambda: keras_attn.MultiHeadAttention(num_heads=0, key_dim=2), r"Received: num_heads=0"),
        (lambda: keras_attn.Attention(key_dim=0), r"Received: key_dim=0"),
        (lambda: keras_attn.Attention(dropout=1.5), r"Received: dropout=1.5"),
        (lambda: keras_attn.LocalAttention(window=0), r"Received: window=0"),
        (lambda: keras_attn.LocalAttention(window=-1), r"Received: window=-1"),
        (lambda: keras_attn.LocalAttention(), r"Received: window=None"),
        (
            lambda: keras_attn.MultiHeadAttention(num_heads=2, key_dim=2, sliding_window=0),
            r"Received: sliding_window=0",
        ),
        (
            lambda: keras_attn.MultiHeadAttention(num_heads=2, key_dim=2, attention_axes="rows"),
            r"Received: attention_axes",
        ),
        (lambda: keras_attn.Attention(output_shape=2.5), r"Invalid `output_shape`: 2.5"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_component_names_list_the_available_ones():
    for arg, kind, known in [
        ("score", "score", "scaled_dot"),
        ("normalizer", "normalizer", "sparsemax"),
        ("pattern", "pattern", "local"),
        ("score_mods", "score_mod", "softcap"),
    ]:
        with pytest.raises(UnknownComponentError) as info:
            keras_attn.Attention(**{arg: "no_such_thing"})
        message = str(info.value)
        assert f"Unknown {kind} 'no_such_thing'" in message
        assert repr(known) in message and "plugin" in message


@pytest.mark.parametrize(
    "kwargs, expected, received",
    [
        (dict(score=normalizers.Softmax()), "score", "normalizer"),
        (dict(normalizer=scores.Dot()), "normalizer", "score"),
        (dict(pattern=normalizers.Hard()), "pattern", "normalizer"),
        (dict(normalizer=patterns.Causal()), "normalizer", "pattern"),
        (dict(score_mods=[scores.Dot()]), "score_mod", "score"),
    ],
)
def test_component_of_the_wrong_kind(kwargs, expected, received):
    with pytest.raises(
        ComponentKindError, match=rf"(?i)expected a {expected}.*received.*{received}"
    ):
        keras_attn.Attention(**kwargs)


@pytest.mark.parametrize(
    "layer_args, inputs, match",
    [
        ((), (randn(2, 8),), r"Received: query.shape=\(2, 8\)"),
        ((), (X, randn(2, 3, 4, 8)), r"one rank.*value.shape=\(2, 3, 4, 8\)"),
        ((), (X, C, randn(2, 6, 4)), r"must be equal. Received: .*key_shape=\(2, 6, 4\)"),
        ((), (randn(2, 5, 7),), r"Received: query.shape\[-1\]=7, num_heads=2"),
    ],
)
def test_bad_inputs_leave_the_layer_unbuilt(layer_args, inputs, match):
    layer = keras_attn.Attention(num_heads=2)
    with pytest.raises(ValueError, match=match):
        layer(*inputs)
    assert not layer.built and layer.weights == []
    # The same layer still builds and runs on good input afterwards.
    assert layer(X).shape == X.shape and len(layer.weights) == 8


def test_cross_attention_needs_a_context():
    layer = keras_attn.CrossAttention(num_heads=2)
    with pytest.raises(ValueError, match="Received: context=None"):
        layer(X)
    assert not layer.built and layer.weights == []
    with pytest.raises(ValueError, match="Received: context=None"):
        layer.call(X)


def test_bad_attention_mask_shape():
    layer = keras_attn.Attention(num_heads=2)
    layer(X)
    with pytest.raises(ValueError, match=r"Received: attention_mask.shape"):
        layer(X, attention_mask=np.ones((B, TQ, TQ, 1), bool))
    with pytest.raises(ValueError, match=r"Received: attention_mask.shape"):
        layer(X, C, attention_mask=np.ones((B, TQ, TQ), bool))


def test_relative_position_with_a_different_num_heads():
    mod = score_mods.RelativePosition(num_heads=3)
    layer = keras_attn.Attention(num_heads=2, score_mods=[mod])
    with pytest.raises(ValueError, match=r"num_heads=2.*Received: score_mods\[0\].num_heads=3"):
        layer(X)
    assert not layer.built and layer.weights == []


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="inspects a tf.function graph")
def test_the_fused_path_traces_the_same_graph_as_keras():
    # The dense causal benchmark compares the two layers; on the fused path they must
    # run the same operations, projections and kernel, forward and backward.
    import collections

    import tensorflow as tf

    def op_types(layer):
        x = keras.random.normal((1, 16, 32))
        layer(x, x, use_causal_mask=True)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, x, use_causal_mask=True))
            return tape.gradient(loss, [x, *layer.trainable_variables])

        graph = step.get_concrete_function(x).graph
        return collections.Counter(op.type for op in graph.get_operations())

    ours = keras_attn.MultiHeadAttention(num_heads=4, key_dim=8)
    assert op_types(ours) == op_types(keras.layers.MultiHeadAttention(num_heads=4, key_dim=8))
    assert ours.last_path == "fused"


# -- presets take every call argument ----------------------------------------------------


def same_weights(layer, reference, *inputs):
    layer(*inputs)
    reference(*inputs)
    reference.set_weights(layer.get_weights())
    return reference


def test_self_attention_takes_every_call_argument():
    layer = keras_attn.SelfAttention(num_heads=2, dropout=0.5, seed=1)
    reference = same_weights(layer, keras_attn.Attention(num_heads=2, dropout=0.5, seed=1), X)
    mask = np.tril(np.ones((TQ, TQ), bool))[None].repeat(B, 0)
    # A tensor keyword mixed with non-tensor ones, and `training` reaching the dropout.
    output, scores = layer(
        X, mask=QMASK, attention_mask=mask, use_causal_mask=True,
        return_attention_scores=True, training=False,
    )  # fmt: skip
    expected = reference(
        X, query_mask=QMASK, value_mask=QMASK, attention_mask=mask, use_causal_mask=True,
        return_attention_scores=True, training=False,
    )  # fmt: skip
    np.testing.assert_allclose(
        ops.convert_to_numpy(output), ops.convert_to_numpy(expected[0]), atol=1e-6
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(scores), ops.convert_to_numpy(expected[1]), atol=1e-6
    )
    assert not np.allclose(
        ops.convert_to_numpy(layer(X, training=True)),
        ops.convert_to_numpy(layer(X, training=False)),
    )
    # A cache, step by step.
    assert_decodes_like_one_pass(keras_attn.SelfAttention(num_heads=2), X)


def test_self_attention_with_two_inputs_is_a_clear_error():
    with pytest.raises(ValueError, match="SelfAttention takes one input"):
        keras_attn.SelfAttention(num_heads=2)(X, X)


def test_hard_self_attention_gets_training_for_its_gumbel_noise():
    layer = keras_attn.HardAttention(num_heads=2, gumbel=True, seed=3)
    layer(X)
    inference = [ops.convert_to_numpy(layer(X, training=False)) for _ in range(2)]
    np.testing.assert_array_equal(*inference)
    training = [ops.convert_to_numpy(layer(X, training=True)) for _ in range(4)]
    assert any(not np.allclose(t, inference[0]) for t in training)


def test_cross_attention_takes_every_call_argument():
    layer = keras_attn.CrossAttention(num_heads=2, dropout=0.5, seed=1)
    reference = same_weights(layer, keras_attn.Attention(num_heads=2, dropout=0.5, seed=1), X, C)
    mask = np.ones((B, TQ, TK), bool)
    mask[:, :, -1] = False
    kwargs = dict(attention_mask=mask, return_attention_scores=True, training=False)
    output, scores = layer(X, C, query_mask=QMASK, context_mask=VMASK, **kwargs)
    expected = reference(X, C, query_mask=QMASK, value_mask=VMASK, **kwargs)
    np.testing.assert_allclose(
        ops.convert_to_numpy(output), ops.convert_to_numpy(expected[0]), atol=1e-6
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(scores), ops.convert_to_numpy(expected[1]), atol=1e-6
    )
    assert not np.allclose(
        ops.convert_to_numpy(layer(X, C, training=True)),
        ops.convert_to_numpy(layer(X, C, training=False)),
    )
