"""The GPT example past its `max_length`: no learned positions, a causal sliding window,
a ring cache of `window` slots per layer (constant memory), exact against the model
run uncached over the whole sequence."""

import pathlib
import sys
import types

import keras
import numpy as np
import pytest
from keras import ops

# examples/ is a folder of the repository, not an installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples import gpt  # noqa: E402
from examples.gpt import __main__ as gpt_cli  # noqa: E402

VOCAB, MAX_LENGTH, WINDOW = 32, 16, 4


def windowed_gpt(causal=True, position_embedding="none", pattern="local", seed=0):
    keras.utils.set_random_seed(seed)
    config = {"window": WINDOW, "causal": True} if causal else {"window": WINDOW}
    attention = {"position_encoding": "rope"}
    if pattern == "local":
        attention["pattern"] = {"name": "local", "config": config}
    model = gpt.build_gpt(
        VOCAB,
        MAX_LENGTH,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        attention=attention,
        position_embedding=position_embedding,
    )
    # Larger random matrices than Keras's initializers: greedy decoding of the
    # initial weights falls into a short cycle, of these it wanders over the vocabulary.
    rng = np.random.default_rng(1)
    model.set_weights(
        [
            rng.normal(0, 0.3, w.shape).astype("float32") if w.ndim > 1 else w
            for w in model.get_weights()
        ]
    )
    return model


def logits_of(model, ids):
    return ops.convert_to_numpy(model(np.asarray(ids, "int32")))


def test_generates_ten_times_max_length_as_the_full_model_greedily():
    # The pattern is local without causal: the blocks make it causal, and it still rings.
    model = windowed_gpt(causal=False)
    generator = gpt.Generator(model)
    assert generator.ring_windows == (WINDOW, WINDOW) and generator.unbounded
    prompt = np.random.default_rng(3).integers(0, VOCAB, (2, 3)).astype("int32")
    total = 10 * MAX_LENGTH
    out = generator.generate(prompt, total - 3)  # one compiled loop, cache of 4 slots
    assert out.shape == (2, total)
    cache_shapes = generator._decoders[True].cache_shapes  # (B, 2, S, H, D) per block
    assert [shape[1:] for shape in cache_shapes] == [(2, WINDOW, 2, 8)] * 2  # S: 4, not 160
    np.testing.assert_array_equal(out[:, :3], prompt)
    # Greedy decoding is exact iff every token is the argmax of the uncached model's
    # logits over the sequence before it (rope at absolute positions, window 4).
    reference = logits_of(model, out[:, :-1])  # (2, 159, V), past max_length
    np.testing.assert_array_equal(out[:, 3:], reference[:, 2:].argmax(-1))
    assert min(len(set(row[3:].tolist())) for row in out) > 8  # not a short cycle
    # Without chunks: generate_text of an unbounded model is one `generate` call.
    np.testing.assert_array_equal(generator.generate_text(prompt, 2 * MAX_LENGTH), out[:, :35])


def test_ring_cache_keeps_its_shape_and_gives_the_full_models_logits():
    model = windowed_gpt(causal=True)
    ids = np.random.default_rng(5).integers(0, VOCAB, (2, 5 * MAX_LENGTH)).astype("int32")
    want = logits_of(model, ids)  # (2, 80, V), one uncached pass
    layers = [b.attention for b in model.blocks]
    shape = layers[0].cache_shape(2, MAX_LENGTH)
    assert shape == (2, 2, WINDOW, 2, 8)  # (B, 2, window, H, D): not max_length slots
    caches = [ops.zeros(layer.cache_shape(2, MAX_LENGTH)) for layer in layers]
    decoder = gpt.generation._Decoder(gpt.Generator(model), use_cache=True)
    prefill = 6  # longer than the window
    logits, caches = decoder._step(ids[:, :prefill], 0, caches)
    got = [ops.convert_to_numpy(logits)]
    for t in range(prefill, ids.shape[1]):
        logits, caches = decoder._step(ids[:, t : t + 1], ops.convert_to_tensor(t), caches)
        assert all(tuple(c.shape) == shape for c in caches)
        got.append(ops.convert_to_numpy(logits))
    got = np.stack(got, axis=1)  # (2, 75, V): logits at positions 5..79
    np.testing.assert_allclose(got, want[:, prefill - 1 :], atol=1e-4)
    np.testing.assert_allclose(got[:, -1], want[:, -1], atol=1e-4)


def test_past_max_length_needs_no_learned_positions_and_a_window():
    prompt = np.zeros((1, 10), "int32")
    learned = windowed_gpt(position_embedding="learned")
    with pytest.raises(ValueError, match="longer than the model's maximum length 16"):
        learned(np.zeros((1, 17), "int32"))
    with pytest.raises(ValueError, match="position embedding is 'learned'"):
        gpt.generate(learned, prompt, 7)
    full = windowed_gpt(pattern="full")
    assert logits_of(full, np.zeros((1, 20), "int32")).shape == (1, 20, VOCAB)  # any length
    with pytest.raises(ValueError, match=r"causal sliding window \(\['full', 'full'\]\)"):
        gpt.generate(full, prompt, 7)
    with pytest.raises(ValueError, match="position_embedding='none'"):
        gpt.generate(full, prompt, 7)
    with pytest.raises(ValueError, match="position_embedding.*Received: position_embedding='rope'"):
        gpt.build_gpt(VOCAB, 8, position_embedding="rope")


def test_saved_configs_keep_the_position_embedding(tmp_path):
    model = windowed_gpt()
    assert model.get_config()["position_embedding"] == "none"
    assert not model.embedding.weights[1:]  # the token embedding only
    assert "position_embedding" not in windowed_gpt(position_embedding="learned").get_config()
    path = str(tmp_path / "gpt.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.position_embedding == "none" and gpt.Generator(loaded).unbounded
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 2 * MAX_LENGTH)).astype("int32")
    np.testing.assert_array_equal(logits_of(model, ids), logits_of(loaded, ids))


def test_the_position_embedding_flag_reaches_the_model():
    args = gpt_cli.make_parser().parse_args(["train", "--position-embedding", "none"])
    assert args.position_embedding == "none"
    assert gpt_cli.make_parser().parse_args(["train"]).position_embedding == "learned"
    args.seq_len, args.max_length, args.num_layers, args.hidden_dim = 8, 8, 1, 8
    args.dropout, args.learning_rate = 0.0, 1e-3
    data = types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=VOCAB))
    model = gpt_cli.new_model(args, None, data)
    assert model.position_embedding == "none"
    assert logits_of(model, np.zeros((1, 12), "int32")).shape == (1, 12, VOCAB)
