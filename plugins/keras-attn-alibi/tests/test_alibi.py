"""keras-attn-alibi against numpy references written here."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops
from keras_attn_alibi import Alibi
from keras_attn_alibi import alibi_slopes

import keras_attn
from keras_attn.positions import Positions


def positions(heads, query_length, key_length, query_offset=0):
    q = np.arange(query_offset, query_offset + query_length, dtype="int32")
    return Positions(
        q.reshape(1, 1, -1, 1),
        np.arange(key_length, dtype="int32").reshape(1, 1, 1, -1),
        np.arange(heads, dtype="int32").reshape(1, -1, 1, 1),
    )


def test_registered_by_its_entry_point():
    entry = keras_attn.plugins.get_entry("score_mod", "alibi")
    assert entry.cls is Alibi
    assert (entry.distribution, entry.version) == ("keras-attn-alibi", "0.1.0")


def test_slopes_are_the_papers():
    np.testing.assert_allclose(alibi_slopes(8), [1 / 2**i for i in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(1), [1 / 256])
    np.testing.assert_allclose(alibi_slopes(4), [1 / 4, 1 / 16, 1 / 64, 1 / 256])
    # Not a power of two: the 4-head slopes, then every other slope of 8 heads.
    np.testing.assert_allclose(alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])
    np.testing.assert_allclose(
        alibi_slopes(12), [1 / 2**i for i in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    )
    with pytest.raises(ValueError, match="num_heads=0"):
        alibi_slopes(0)


@settings(deadline=None, max_examples=12, derandomize=True)
@given(
    heads=st.integers(1, 12),
    lengths=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(0, 20)),
    causal=st.booleans(),
)
def test_bias_matches_reference(heads, lengths, causal):
    tq, tk, offset = lengths
    logits = np.random.default_rng(heads).normal(size=(2, heads, tq, tk)).astype("float32")
    out = Alibi(num_heads=heads, causal=causal)(logits, positions=positions(heads, tq, tk, offset))
    i = np.arange(offset, offset + tq)[:, None]
    j = np.arange(tk)[None, :]
    distance = (i - j) if causal else np.abs(i - j)
    slopes = np.array(alibi_slopes(heads))[:, None, None]
    np.testing.assert_allclose(ops.convert_to_numpy(out), logits - slopes * distance, atol=1e-5)


def test_causal_and_symmetric_agree_on_past_keys():
    pos = positions(4, 7, 7)
    zeros = np.zeros((1, 4, 7, 7), "float32")
    causal = ops.convert_to_numpy(Alibi(4, causal=True)(zeros, positions=pos))
    symmetric = ops.convert_to_numpy(Alibi(4)(zeros, positions=pos))
    past = np.tril(np.ones((7, 7), bool))
    np.testing.assert_array_equal(causal[..., past], symmetric[..., past])
    assert (causal[..., ~past] > 0).all() and (symmetric[..., ~past] < 0).all()


def test_needs_num_heads_outside_a_layer():
    with pytest.raises(ValueError, match="num_heads"):
        Alibi()(np.zeros((1, 2, 3, 3), "float32"), positions=positions(2, 3, 3))
    with pytest.raises(ValueError, match="causal"):
        Alibi(causal="yes")


def test_layer_sets_num_heads():
    layer = keras_attn.Attention(num_heads=6, score_mods=["alibi"])
    layer(np.zeros((1, 5, 12), "float32"))
    assert layer.score_mods[0].num_heads == 6


@pytest.mark.parametrize("causal", [False, True])
def test_honours_the_score_mod_interface(keras_attn_check, causal):
    keras_attn_check(Alibi(causal=causal))


def test_model_saves_and_loads(tmp_path):
    inputs = keras.Input((6, 8))
    spec = {"name": "alibi", "config": {"causal": True}}
    outputs = keras_attn.Attention(num_heads=4, score_mods=[spec])(inputs, use_causal_mask=True)
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "alibi.keras")
    loaded = keras.saving.load_model(tmp_path / "alibi.keras")
    mod = loaded.layers[1].score_mods[0]
    assert isinstance(mod, Alibi) and (mod.num_heads, mod.causal) == (4, True)
    x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))


# -- a tiny GPT-like model: no learned positions, trained short, run long -------------

VOCAB, DIM, HEADS = 8, 32, 8


def tiny_gpt(score_mods):
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM)(tokens)
    y = keras_attn.Attention(num_heads=HEADS, score_mods=score_mods)(x, use_causal_mask=True)
    x = keras.layers.LayerNormalization()(x + y)
    x = x + keras.layers.Dense(DIM)(keras.layers.Dense(64, activation="gelu")(x))
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(x))


def previous_token_task(n, length, seed):
    """Predict the previous token: only possible with some notion of order."""
    x = np.random.default_rng(seed).integers(0, VOCAB, size=(n, length)).astype("int32")
    return x, np.concatenate([x[:, :1], x[:, :-1]], axis=1)


def accuracy(model, length):
    x, y = previous_token_task(256, length, seed=1)
    predicted = model.predict(x, verbose=0, batch_size=256).argmax(-1)
    return float((predicted == y)[:, 1:].mean())


def train(score_mods):
    keras.utils.set_random_seed(0)
    model = tiny_gpt(score_mods)
    model.compile(
        keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(*previous_token_task(2048, 16, seed=0), epochs=3, batch_size=64, verbose=0)
    return model


def test_gpt_trained_on_16_tokens_runs_on_64():
    alibi = train(["alibi"])
    short, long = accuracy(alibi, 16), accuracy(alibi, 64)
    assert short > 0.9 and long > 0.85 and long > short - 0.1, (short, long)
    # Without ALiBi the same model has no notion of order and cannot learn the task.
    assert accuracy(train([]), 64) < 0.5
