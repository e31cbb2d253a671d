"""`keras_attn.layers.classic`: Luong's and Bahdanau's attention against Keras's and numpy.

`LuongAttention` and `BahdanauAttention` (`AdditiveAttention`) give the numbers of
`keras.layers.Attention` and `keras.layers.AdditiveAttention` after `set_weights`, and of
an independent numpy reference; with another pattern or normalizer they give the numpy
reference of that attention. Keras's own test files run in test_keras_classic_suites.py.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import plugins
from keras_attn.layers import classic
from keras_attn.patterns import Local

RNG = np.random.default_rng(7)

# name -> (Keras's class, keras_attn's class, constructor arguments)
CASES = {
    "dot": (keras.layers.Attention, keras_attn.LuongAttention, {}),
    "dot_scaled": (keras.layers.Attention, keras_attn.LuongAttention, {"use_scale": True}),
    "concat": (keras.layers.Attention, keras_attn.LuongAttention, {"score_mode": "concat"}),
    "concat_scaled": (
        keras.layers.Attention,
        keras_attn.LuongAttention,
        {"score_mode": "concat", "use_scale": True},
    ),
    "additive": (keras.layers.AdditiveAttention, keras_attn.BahdanauAttention, {}),
    "additive_unscaled": (
        keras.layers.AdditiveAttention,
        keras_attn.BahdanauAttention,
        {"use_scale": False},
    ),
}


def normal(*shape):
    return RNG.normal(size=shape).astype("float32")


def np_(x):
    return ops.convert_to_numpy(x)


# -- numpy references, written from the papers' formulas ------------------------------


def np_logits(case, q, k, weights):
    """Logits ``(..., Tq, Tk)``; `weights` are Keras's, in Keras's order."""
    kwargs = CASES[case][2]
    weights = list(weights)
    if CASES[case][0] is keras.layers.AdditiveAttention:
        v = weights[0] if kwargs.get("use_scale", True) else np.ones(q.shape[-1])
        return (np.tanh(q[..., :, None, :] + k[..., None, :, :]) * v).sum(-1)
    scale = weights.pop(0) if kwargs.get("use_scale") else 1.0
    if kwargs.get("score_mode") == "concat":
        weight = weights.pop(0)
        return weight * np.tanh(scale * (q[..., :, None, :] + k[..., None, :, :])).sum(-1)
    return scale * (q @ np.swapaxes(k, -1, -2))


def np_softmax(logits, allowed):
    x = np.where(allowed, logits, -np.inf)
    e = np.where(allowed, np.exp(x - x.max(-1, keepdims=True)), 0.0)
    return e / e.sum(-1, keepdims=True)


def np_sparsemax(logits, allowed):
    """Sparsemax (Martins & Astudillo, 2016) over the allowed keys of each row."""
    out = np.zeros_like(logits)
    for index in np.ndindex(*logits.shape[:-1]):
        keep = np.broadcast_to(allowed, logits.shape)[index]
        z = logits[index][keep]
        s = np.sort(z)[::-1]
        ks = np.arange(1, len(s) + 1)
        support = ks[1 + ks * s > np.cumsum(s)].max()
        tau = (s[:support].sum() - 1) / support
        out[index][keep] = np.maximum(z - tau, 0)
    return out


def np_attention(logits, value, allowed, query_mask=None, normalize=np_softmax):
    weights = normalize(logits, allowed)
    output = weights @ value
    if query_mask is not None:
        output = np.where(query_mask[..., None], output, 0.0)
    return output, weights


def causal(tq, tk):
    return np.arange(tq)[:, None] >= np.arange(tk)[None, :]


def local(tq, tk, window):
    return np.abs(np.arange(tq)[:, None] - np.arange(tk)[None, :]) < window


def pair(case, **ours_kwargs):
    """Keras's layer with random weights and keras_attn's holding the same, both built."""
    keras_cls, ours_cls, kwargs = CASES[case]
    theirs, ours = keras_cls(**kwargs), ours_cls(**kwargs, **ours_kwargs)
    shapes = [(2, 4, 6), (2, 5, 6)]
    theirs.build(shapes)
    ours.build(shapes)
    theirs.set_weights([normal(*w.shape) + 1.0 for w in theirs.get_weights()])
    ours.set_weights(theirs.get_weights())
    return theirs, ours


# -- Keras's numbers and numpy's ----------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_weights_as_keras_in_the_same_order(case):
    theirs, ours = pair(case)
    assert [(w.name, tuple(w.shape)) for w in ours.weights] == [
        (w.name, tuple(w.shape)) for w in theirs.weights
    ]
    assert len(ours.trainable_weights) == len(theirs.trainable_weights)
    if theirs.scale is not None:
        np.testing.assert_array_equal(np_(ours.scale), np_(theirs.scale))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("use_causal_mask", [False, True])
@pytest.mark.parametrize("with_key", [False, True])
def test_outputs_and_scores_equal_keras_and_numpy(case, use_causal_mask, with_key):
    theirs, ours = pair(case)
    q, v, k = normal(2, 4, 6), normal(2, 5, 6), normal(2, 5, 6)
    query_mask = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], bool)
    value_mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], bool)  # key 0 always seen
    inputs = [q, v, k] if with_key else [q, v]
    call = dict(mask=[query_mask, value_mask], return_attention_scores=True)
    want, want_scores = theirs(inputs, use_causal_mask=use_causal_mask, **call)
    got, got_scores = ours(inputs, use_causal_mask=use_causal_mask, **call)
    np.testing.assert_allclose(np_(got), np_(want), atol=1e-5)
    np.testing.assert_allclose(np_(got_scores), np_(want_scores), atol=1e-6)

    allowed = value_mask[:, None, :] & (causal(4, 5) if use_causal_mask else True)
    logits = np_logits(case, q, k if with_key else v, theirs.get_weights())
    ref, ref_weights = np_attention(logits, v, allowed, query_mask)
    np.testing.assert_allclose(np_(got), ref, atol=1e-5)
    np.testing.assert_allclose(np_(got_scores), ref_weights, atol=1e-5)


@pytest.mark.parametrize("case", ["dot_scaled", "concat", "additive"])
def test_inputs_of_rank_4_equal_keras(case):
    theirs, ours = pair(case)
    q, v = normal(2, 3, 4, 6), normal(2, 3, 5, 6)
    value_mask = RNG.random((2, 3, 5)) < 0.7
    value_mask[..., 0] = True
    query_mask = RNG.random((2, 3, 4)) < 0.7
    call = dict(mask=[query_mask, value_mask], return_attention_scores=True, use_causal_mask=True)
    want, want_scores = theirs([q, v], **call)
    got, got_scores = ours([q, v], **call)
    assert got.shape == (2, 3, 4, 6) and got_scores.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(np_(got), np_(want), atol=1e-5)
    np.testing.assert_allclose(np_(got_scores), np_(want_scores), atol=1e-6)


@pytest.mark.parametrize("case", ["dot", "concat_scaled", "additive"])
def test_dropout_with_keras_seed_drops_what_keras_drops(case):
    keras_cls, ours_cls, kwargs = CASES[case]
    theirs = keras_cls(dropout=0.5, seed=11, **kwargs)
    ours = ours_cls(dropout=0.5, seed=11, **kwargs)
    q, v = normal(2, 4, 6), normal(2, 5, 6)
    theirs([q, v])
    ours([q, v])
    ours.set_weights(theirs.get_weights())
    want, want_scores = theirs([q, v], training=True, return_attention_scores=True)
    got, got_scores = ours([q, v], training=True, return_attention_scores=True)
    # The scores returned are the dropped-out weights, as Keras's: some are zero.
    assert (np_(got_scores) == 0).any()
    np.testing.assert_allclose(np_(got_scores), np_(want_scores), atol=1e-6)
    np.testing.assert_allclose(np_(got), np_(want), atol=1e-5)
    # Outside training, no dropout.
    want, want_scores = theirs([q, v], return_attention_scores=True)
    np.testing.assert_allclose(np_(ours([q, v])), np_(want), atol=1e-5)


def test_a_row_with_no_allowed_key_gets_zero_weights():
    # The one difference from Keras, whose weights are uniform over masked keys there.
    ours = keras_attn.LuongAttention()
    q, v = normal(2, 3, 4), normal(2, 4, 4)
    value_mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)
    out, scores = ours([q, v], mask=[None, value_mask], return_attention_scores=True)
    np.testing.assert_array_equal(np_(scores)[1], 0.0)
    np.testing.assert_array_equal(np_(out)[1], 0.0)
    ref, _ = np_attention(np_logits("dot", q[:1], v[:1], []), v[:1], True)
    np.testing.assert_allclose(np_(out)[:1], ref, atol=1e-5)


def test_keras_masks_of_the_inputs_are_used_and_the_query_mask_is_kept():
    tokens = np.array([[3, 5, 2, 0, 0], [4, 1, 1, 7, 0]])
    inputs = keras.Input((5,), dtype="int32")
    embedding = keras.layers.Embedding(9, 6, mask_zero=True)
    x = embedding(inputs)
    theirs, ours = pair("concat_scaled")
    want = keras.Model(inputs, theirs([x, x]))(tokens)
    attended = ours([x, x])
    model = keras.Model(inputs, attended)
    got = model(tokens)
    np.testing.assert_allclose(np_(got), np_(want), atol=1e-5)
    mask = tokens != 0
    np.testing.assert_array_equal(np_(got)[~mask], 0.0)
    emb = np_(embedding(tokens))
    logits = np_logits("concat_scaled", emb, emb, theirs.get_weights())
    ref, _ = np_attention(logits, emb, mask[:, None, :], mask)
    np.testing.assert_allclose(np_(got), ref, atol=1e-5)
    np.testing.assert_array_equal(np_(ours.compute_mask([x, x], [mask, mask])), mask)


# -- keras_attn's attention, one argument away -------------------------------------


@pytest.mark.parametrize("case", ["dot_scaled", "concat", "additive"])
@pytest.mark.parametrize("use_causal_mask", [False, True])
def test_a_pattern_gives_that_attention(case, use_causal_mask):
    theirs, ours = pair(case, pattern=Local(2))
    q, v = normal(2, 4, 6), normal(2, 5, 6)
    value_mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 1, 1]], bool)
    got, scores = ours(
        [q, v], mask=[None, value_mask], use_causal_mask=use_causal_mask,
        return_attention_scores=True,
    )  # fmt: skip
    allowed = value_mask[:, None, :] & local(4, 5, 2) & (causal(4, 5) if use_causal_mask else True)
    ref, ref_weights = np_attention(np_logits(case, q, v, theirs.get_weights()), v, allowed)
    np.testing.assert_allclose(np_(got), ref, atol=1e-5)
    np.testing.assert_allclose(np_(scores), ref_weights, atol=1e-5)
    # Keras's helper sees the pattern too.
    score_mask = ours._calculate_score_mask(np_(scores), value_mask, use_causal_mask)
    np.testing.assert_array_equal(np_(score_mask), allowed)


@pytest.mark.parametrize("case", ["dot", "concat_scaled", "additive_unscaled"])
def test_a_normalizer_gives_that_attention(case):
    theirs, ours = pair(case, normalizer="sparsemax")
    q, v = normal(2, 4, 6), normal(2, 5, 6)
    value_mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 1, 1]], bool)
    got, scores = ours([q, v], mask=[None, value_mask], return_attention_scores=True)
    logits = np_logits(case, q, v, theirs.get_weights())
    ref, ref_weights = np_attention(logits, v, value_mask[:, None, :], normalize=np_sparsemax)
    np.testing.assert_allclose(np_(scores), ref_weights, atol=1e-5)
    np.testing.assert_allclose(np_(got), ref, atol=1e-5)
    assert (np_(scores) == 0).sum() > (~value_mask).sum() * 4  # sparse beyond the mask


def test_a_local_pattern_on_long_inputs_takes_the_block_sparse_path():
    ours = keras_attn.LuongAttention(use_scale=True, pattern=Local(8))
    q, v = normal(1, 1024, 8) * 0.3, normal(1, 1024, 8)
    ours([q, v])
    ours.set_weights([np.float32(0.7)])
    got = ours([q, v])
    assert ours.last_path == "block_sparse"
    logits = 0.7 * (q @ np.swapaxes(v, -1, -2))
    ref, _ = np_attention(logits, v, local(1024, 1024, 8))
    np.testing.assert_allclose(np_(got), ref, atol=1e-5)


def test_the_scores_are_registered_components_of_any_layer():
    assert {"luong", "bahdanau"} <= set(plugins.names("score"))
    assert {"luong", "bahdanau"} <= set(plugins.names("layer"))
    assert plugins.get("layer", "bahdanau") is keras_attn.AdditiveAttention
    # Bahdanau's score on projected heads: his attention with learned projections.
    layer = keras_attn.Attention(num_heads=1, score="bahdanau", use_bias=False)
    x = normal(2, 3, 4)
    out, scores = layer(x, x, return_attention_scores=True)
    wq, wk, wv, wo, v = (np_(w) for w in layer.weights)
    q, k = x @ wq[:, 0], x @ wk[:, 0]  # (B, T, D)
    ref_weights = np_softmax((np.tanh(q[:, :, None] + k[:, None]) * v).sum(-1), True)
    np.testing.assert_allclose(np_(scores)[:, 0], ref_weights, atol=1e-5)
    ref = (ref_weights @ (x @ wv[:, 0])) @ wo[0]
    np.testing.assert_allclose(np_(out), ref, atol=1e-5)


# -- configuration, saving, errors ----------------------------------------------------


def test_config_round_trips_with_keras_arguments_and_components():
    layer = keras_attn.LuongAttention(
        use_scale=True, score_mode="concat", dropout=0.25, seed=5, pattern=Local(3),
        normalizer="sparsemax", name="luong",
    )  # fmt: skip
    config = layer.get_config()
    assert {k: config[k] for k in ("use_scale", "score_mode", "dropout", "seed")} == {
        "use_scale": True, "score_mode": "concat", "dropout": 0.25, "seed": 5,
    }  # fmt: skip
    again = keras_attn.LuongAttention.from_config(config)
    assert again.get_config() == config
    assert again.pattern == Local(3)
    assert plugins.registry_name(again.normalizer) == "sparsemax"
    bahdanau = keras_attn.AdditiveAttention(use_scale=False, pattern="causal")
    assert "score_mode" not in bahdanau.get_config()
    assert keras_attn.BahdanauAttention.from_config(bahdanau.get_config()).get_config() == (
        bahdanau.get_config()
    )


@pytest.mark.parametrize("case", ["concat_scaled", "additive"])
def test_a_model_saves_and_loads(case, tmp_path):
    _, ours = pair(case, pattern=Local(2), normalizer="sparsemax")
    query, value = keras.Input((4, 6)), keras.Input((5, 6))
    model = keras.Model([query, value], ours([query, value], use_causal_mask=True))
    q, v = normal(2, 4, 6), normal(2, 5, 6)
    want = np_(model([q, v]))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np_(loaded([q, v])), want, atol=1e-6)
    [layer] = [la for la in loaded.layers if isinstance(la, type(ours))]
    assert layer.pattern == Local(2)


def test_errors_say_what_was_received():
    with pytest.raises(ValueError, match="score_mode.*Received: score_mode=general"):
        keras_attn.LuongAttention(score_mode="general")
    with pytest.raises(ValueError, match="`use_scale` must be a bool. Received: use_scale='yes'"):
        keras_attn.BahdanauAttention(use_scale="yes")
    with pytest.raises(ValueError, match="`dropout` must be a number in"):
        keras_attn.LuongAttention(dropout=1.5)
    with pytest.raises(ValueError, match=r"same last dimension.*query.shape=\(2, 3, 4\)"):
        keras_attn.BahdanauAttention()([normal(2, 3, 4), normal(2, 5, 6)])
    with pytest.raises(ValueError, match="must be called on a list"):
        keras_attn.LuongAttention()(normal(2, 3, 4))


# -- from Keras's layers ------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_keras_holds_the_weights_and_gives_the_numbers(case):
    theirs, _ = pair(case)
    ours = classic.from_keras(theirs)
    assert type(ours) is CASES[case][1]
    q, v = normal(2, 4, 6), normal(2, 5, 6)
    np.testing.assert_allclose(np_(ours([q, v])), np_(theirs([q, v])), atol=1e-5)


@pytest.mark.parametrize("case", ["dot_scaled", "additive"])
def test_from_keras_with_a_pattern_and_a_normalizer(case):
    theirs, _ = pair(case)
    ours = CASES[case][1].from_keras(theirs, pattern=Local(2), normalizer="sparsemax")
    q, v = normal(2, 4, 6), normal(2, 5, 6)
    allowed = np.broadcast_to(local(4, 5, 2), (2, 4, 5))
    logits = np_logits(case, q, v, theirs.get_weights())
    ref, _ = np_attention(logits, v, allowed, normalize=np_sparsemax)
    np.testing.assert_allclose(np_(ours([q, v])), ref, atol=1e-5)


def test_from_keras_of_an_unbuilt_layer_and_what_it_refuses():
    unbuilt = classic.from_keras(keras.layers.AdditiveAttention(use_scale=False, dropout=0.1))
    assert not unbuilt.built and unbuilt.dropout == 0.1 and not unbuilt.use_scale
    assert classic.from_keras(keras.layers.Dense(3)) is None

    class Custom(keras.layers.Attention):
        pass

    with pytest.raises(TypeError, match="not a subclass.*Custom"):
        classic.from_keras(Custom())
    with pytest.raises(TypeError, match="takes a keras.layers.Attention"):
        keras_attn.LuongAttention.from_keras(keras.layers.AdditiveAttention())
    with pytest.raises(ValueError, match="Received: num_heads=4"):
        classic.from_keras(keras.layers.Attention(), num_heads=4)


# -- keras.layers.X -> keras_attn.X ------------------------------------------------


SNIPPETS = {
    "MultiHeadAttention": "keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)",
    "GroupQueryAttention": (
        "keras.layers.GroupQueryAttention(head_dim=3, num_query_heads=4, num_key_value_heads=2)"
    ),
    "AdditiveAttention": "keras.layers.AdditiveAttention(use_scale=True)",
}


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_replacing_keras_layers_by_keras_attn_in_code_works(name):
    source = SNIPPETS[name]
    theirs = eval(source, {"keras": keras})
    ours = eval(source.replace("keras.layers.", "keras_attn."), {"keras_attn": keras_attn})
    assert type(ours).__module__.startswith("keras_attn.")
    q, v = normal(2, 4, 6), normal(2, 5, 6)
    if name == "AdditiveAttention":
        call = lambda layer: layer([q, v], return_attention_scores=True)  # noqa: E731
    else:
        call = lambda layer: layer(q, v, return_attention_scores=True)  # noqa: E731
    call(theirs)
    call(ours)
    theirs.set_weights([normal(*w.shape) for w in theirs.get_weights()])
    ours.set_weights(theirs.get_weights())
    for got, want in zip(call(ours), call(theirs), strict=True):
        np.testing.assert_allclose(np_(got), np_(want), atol=1e-5)
    assert keras_attn.GroupQueryAttention is keras_attn.GroupedQueryAttention


@pytest.mark.parametrize("case", ["concat_scaled", "additive"])
def test_a_training_step_changes_the_weights_as_keras(case):
    # Compiled where the backend compiles by default (jit on JAX and TensorFlow).
    theirs, ours = pair(case)
    initial = theirs.get_weights()
    q, v = normal(8, 4, 6), normal(8, 5, 6)
    target = normal(8, 4, 6)
    weights = []
    for layer in (theirs, ours):
        query, value = keras.Input((4, 6)), keras.Input((5, 6))
        model = keras.Model([query, value], layer([query, value], use_causal_mask=True))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        model.fit([q, v], target, epochs=2, batch_size=4, shuffle=False, verbose=0)
        weights.append([np_(w) for w in layer.weights])
    assert not np.allclose(weights[0][0], initial[0])
    for got, want in zip(weights[1], weights[0], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("case", ["dot_scaled", "concat", "additive"])
def test_convert_replaces_keras_layers_and_one_argument_changes_the_attention(case, tmp_path):
    theirs, _ = pair(case)
    query, value = keras.Input((4, 6)), keras.Input((5, 6))
    model = keras.Model([query, value], theirs([query, value]))
    q, v = normal(2, 4, 6), normal(2, 5, 6)
    same = keras_attn.convert(model)
    [layer] = [la for la in same._flatten_layers() if isinstance(la, CASES[case][1])]
    np.testing.assert_allclose(np_(same([q, v])), np_(model([q, v])), atol=1e-6)

    local_sparse = keras_attn.convert(model, pattern=Local(2), normalizer="sparsemax")
    allowed = np.broadcast_to(local(4, 5, 2), (2, 4, 5))
    logits = np_logits(case, q, v, theirs.get_weights())
    ref, _ = np_attention(logits, v, allowed, normalize=np_sparsemax)
    got = np_(local_sparse([q, v]))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    local_sparse.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np_(loaded([q, v])), got, atol=1e-6)
