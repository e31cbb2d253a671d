"""`keras_attn.convert` on KerasHub models: what it converts, what it says it leaves.

KerasHub backbones built from tiny configs with random weights (no download):

- the attention layers `convert` does not convert (a model's own attention class,
  Qwen3's and Gemma 3's with their QK-norm and rope; subclasses of Keras's attention
  with code of their own, Whisper's, Moonshine's and XLNet's) are named, path and class,
  in a warning or an error (`unconverted`);
- KerasHub's cached decoding of a converted BART and GPT-2 equals the uncached forward
  pass for every component that can be exact: on every layer the components that need
  no positions, and position-dependent ones (a causal local pattern, rope, learned
  relative positions) on self-attention only (`apply_to`), where the queries' positions
  are known; on KerasHub's cached cross-attention they are a clear error.
"""

import re
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import patterns

keras_hub = pytest.importorskip("keras_hub")

VOCAB, HEADS, HIDDEN, T, S = 40, 2, 16, 6, 5


def numpy(x):
    return ops.convert_to_numpy(x)


def keras_attn_warnings(caught):
    return [str(w.message) for w in caught if "keras_attn.convert" in str(w.message)]


def convert_recording(model, **kwargs):
    """`convert(model, **kwargs)` and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = keras_attn.convert(model, **kwargs)
    return converted, keras_attn_warnings(caught)


def sharpen(backbone):
    """Queries and keys 4 times larger: attention far from uniform, so that a component
    that changes it changes the outputs well beyond the tolerance."""
    kernels = [w for w in backbone.weights if re.search(r"(query|key)/kernel$", w.path)]
    assert kernels
    for kernel in kernels:
        kernel.assign(4.0 * kernel)
    return backbone


def ours(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras_attn.Attention)]


# -- what convert does not convert, it names ----------------------------------------------


def qwen3():
    return keras_hub.models.Qwen3Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=HEADS, num_key_value_heads=1,
        head_dim=8, hidden_dim=HIDDEN, intermediate_dim=32,
    )  # fmt: skip


def gemma3():
    return keras_hub.models.Gemma3Backbone(
        vocabulary_size=VOCAB, image_size=16, num_layers=1, num_query_heads=HEADS,
        num_key_value_heads=1, hidden_dim=HIDDEN, intermediate_dim=32, head_dim=8,
    )  # fmt: skip


def whisper():
    return keras_hub.models.WhisperBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=HEADS, hidden_dim=HIDDEN,
        intermediate_dim=32, num_mels=8, max_encoder_sequence_length=12,
        max_decoder_sequence_length=T,
    )  # fmt: skip


def moonshine():
    return keras_hub.models.MoonshineBackbone(
        vocabulary_size=VOCAB, filter_dim=HIDDEN, encoder_num_layers=1, decoder_num_layers=1,
        hidden_dim=HIDDEN, intermediate_dim=32, encoder_num_heads=HEADS,
        decoder_num_heads=HEADS, max_position_embeddings=64,
    )  # fmt: skip


def xlnet():
    return keras_hub.models.XLNetBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=HEADS, hidden_dim=HIDDEN,
        intermediate_dim=32,
    )  # fmt: skip


def attention_layers_named(model, class_name):
    found = [layer for layer in model._flatten_layers() if type(layer).__name__ == class_name]
    assert found, f"{model.name} has no {class_name}"
    return found


def assert_names_each(message, layers):
    for layer in layers:
        assert f"'{layer.path}' ({type(layer).__module__}.{type(layer).__name__})" in message


# Backbones none of whose attention `convert` converts, and the class of their attention.
UNCONVERTED_ONLY = {
    "qwen3": (qwen3, "Qwen3Attention"),
    "gemma3": (gemma3, "CachedGemma3Attention"),
    "whisper": (whisper, "WhisperCachedMultiHeadAttention"),
    "moonshine": (moonshine, "MoonshineMultiHeadAttention"),
    "xlnet": (xlnet, "TwoStreamRelativeAttention"),
}


@pytest.mark.parametrize("make, class_name", UNCONVERTED_ONLY.values(), ids=list(UNCONVERTED_ONLY))
def test_a_backbone_with_only_attention_it_does_not_convert_is_an_error_naming_them(
    make, class_name
):
    backbone = make()
    layers = attention_layers_named(backbone, class_name)
    with pytest.raises(ValueError, match="found no attention layer that it converts") as error:
        keras_attn.convert(backbone, pattern=patterns.Local(2))
    message = str(error.value)
    assert_names_each(message, layers)
    assert "does not map" in message  # says why, and what it does convert
    # Nothing but attention is named (no mask layer, no block holding an attention).
    named = re.findall(r"'([^']+)' \(", message.split("It has these")[1])
    assert sorted(named) == sorted(layer.path for layer in layers)


def qwen3_with_a_keras_attention_head():
    """A user's model: Qwen3 (its own attention) under Keras's MultiHeadAttention."""
    backbone = qwen3()
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    head = keras.layers.MultiHeadAttention(HEADS, 8, name="head")(hidden, hidden)
    model = keras.Model([token_ids, padding_mask], head)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(1, VOCAB, size=(2, T)).astype("int32"), np.ones((2, T), "int32")]
    return model, backbone, inputs


def test_attention_it_does_not_convert_beside_attention_it_does_is_a_warning():
    model, backbone, inputs = qwen3_with_a_keras_attention_head()
    qwen_layers = attention_layers_named(backbone, "Qwen3Attention")
    converted, messages = convert_recording(model)
    assert len(messages) == 1
    assert_names_each(messages[0], qwen_layers)
    assert "2 attention layer(s)" in messages[0] and "unconverted='raise'" in messages[0]
    # The rest is converted, Qwen3's attention kept as it is; the numbers are the model's.
    assert [layer.name for layer in ours(converted)] == ["head"]
    kept = [type(layer).__name__ for layer in converted._flatten_layers()]
    assert kept.count("Qwen3Attention") == 2
    np.testing.assert_allclose(numpy(converted(inputs)), numpy(model(inputs)), atol=1e-5)


def test_unconverted_raise_and_ignore():
    model, backbone, _ = qwen3_with_a_keras_attention_head()
    qwen_layers = attention_layers_named(backbone, "Qwen3Attention")
    with pytest.raises(ValueError, match="leaves 2 attention layer.*unconverted='raise'") as error:
        keras_attn.convert(model, unconverted="raise")
    assert_names_each(str(error.value), qwen_layers)
    converted, messages = convert_recording(model, unconverted="ignore")
    assert messages == []
    assert [layer.name for layer in ours(converted)] == ["head"]
    with pytest.raises(ValueError, match="unconverted='warn', 'raise' or 'ignore'.*'error'"):
        keras_attn.convert(model, unconverted="error")


def test_a_model_that_keras_attn_converts_entirely_gives_no_warning():
    converted, messages = convert_recording(bart())
    assert messages == []
    assert len(ours(converted)) == 3


# -- apply_to ----------------------------------------------------------------------


def bart():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=HEADS, hidden_dim=HIDDEN,
        intermediate_dim=32, max_sequence_length=8, dropout=0.0,
    )  # fmt: skip
    return sharpen(backbone)


def not_cross(layer):
    return "cross" not in layer.name


def test_apply_to_chooses_the_layers_that_take_the_arguments_and_survives_saving(tmp_path):
    backbone = bart()
    converted = keras_attn.convert(backbone, pattern=patterns.Local(2), apply_to=not_cross)
    kinds = {layer.path: type(layer.pattern).__name__ for layer in ours(converted)}
    assert kinds == {
        "transformer_encoder_layer_0/self_attention_layer": "Local",
        "transformer_decoder_layer_0/self_attention": "Local",
        "transformer_decoder_layer_0/cross_attention": "Full",
    }
    path = tmp_path / "bart.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    assert {layer.path: type(layer.pattern).__name__ for layer in ours(loaded)} == kinds
    inputs = bart_inputs()
    np.testing.assert_allclose(
        numpy(loaded(inputs)["decoder_sequence_output"]),
        numpy(converted(inputs)["decoder_sequence_output"]),
        atol=1e-6,
    )


def test_apply_to_that_chooses_nothing_or_is_not_callable_is_an_error():
    backbone = bart()
    with pytest.raises(ValueError, match="apply_to chose none of the attention layers"):
        keras_attn.convert(backbone, pattern=patterns.Local(2), apply_to=lambda layer: False)
    with pytest.raises(TypeError, match="apply_to=None or a callable.*Received: apply_to='self'"):
        keras_attn.convert(backbone, pattern=patterns.Local(2), apply_to="self")


# -- cached decoding of converted models equals their uncached forward pass ---------------


def bart_inputs():
    rng = np.random.default_rng(0)
    return {
        "encoder_token_ids": rng.integers(1, VOCAB, size=(2, S)).astype("int32"),
        "encoder_padding_mask": np.arange(S)[None, :] < np.array([[S], [3]]),
        "decoder_token_ids": rng.integers(1, VOCAB, size=(2, T)).astype("int32"),
        "decoder_padding_mask": np.ones((2, T), bool),
    }


def bart_cached_decoding(backbone, inputs, start=2):
    """KerasHub's cached decoding (BartSeq2SeqLM): the prompt fills both caches, then one
    token a step, the cross-attention cache read without an index."""
    lm = keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None)
    tokens, encoder_mask = inputs["decoder_token_ids"], inputs["encoder_padding_mask"]
    _, encoded, self_cache, cross_cache = lm._build_cache(
        inputs["encoder_token_ids"], encoder_mask, tokens
    )
    steps = []
    for i in range(start, T):
        _, hidden, self_cache, _ = lm.call_decoder_with_cache(
            encoded, encoder_mask, tokens[:, i : i + 1], self_cache, i, cross_cache
        )
        steps.append(numpy(hidden))
    return np.concatenate(steps, axis=1)


# Components that can be exact with KerasHub's cached decoding: those needing no
# positions on every layer; position-dependent ones on self-attention only.
EXACT = {
    "as_is": {},
    "sparsemax_everywhere": dict(normalizer="sparsemax"),
    "positions_on_self_attention": dict(
        pattern=patterns.Local(2, causal=True),
        position_encoding="rope",
        score_mods=("relative_position",),
        apply_to=not_cross,
    ),
}


@pytest.mark.parametrize("attention", EXACT.values(), ids=list(EXACT))
def test_bart_cached_decoding_equals_the_forward_pass(attention):
    backbone = bart()
    converted = keras_attn.convert(backbone, **attention)
    inputs = bart_inputs()
    forward = numpy(converted(inputs)["decoder_sequence_output"])[:, 2:]
    np.testing.assert_allclose(bart_cached_decoding(converted, inputs), forward, atol=1e-5)
    original = numpy(backbone(inputs)["decoder_sequence_output"])[:, 2:]
    if attention:  # the components took effect
        assert np.abs(forward - original).max() > 1e-3
    else:  # KerasHub's numbers
        np.testing.assert_allclose(forward, original, atol=1e-5)


@pytest.mark.parametrize(
    "attention, needs",
    [
        (dict(pattern=patterns.Local(2, causal=True)), "pattern 'local'"),
        (dict(position_encoding="rope"), "position_encoding 'rope'"),
        (dict(score_mods=("relative_position",)), "score_mod 'relative_position'"),
    ],
    ids=["local", "rope", "relative_position"],
)
def test_bart_position_dependent_cross_attention_is_a_clear_error(attention, needs):
    converted = keras_attn.convert(bart(), **attention)
    with pytest.raises(
        ValueError, match=f"'cross_attention'.*without `cache_update_index`.*{needs}"
    ):
        bart_cached_decoding(converted, bart_inputs())


def gpt2():
    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=HEADS, hidden_dim=HIDDEN,
        intermediate_dim=32, max_sequence_length=T, dropout=0.0,
    )  # fmt: skip
    return sharpen(backbone)


GPT2_EXACT = {
    "as_is": {},
    "positions_and_sparsemax": dict(
        pattern=patterns.Local(2, causal=True),
        position_encoding="rope",
        score_mods=("relative_position",),
        normalizer="sparsemax",
    ),
}


@pytest.mark.parametrize("attention", GPT2_EXACT.values(), ids=list(GPT2_EXACT))
def test_gpt2_cached_decoding_equals_the_forward_pass(attention, start=2):
    backbone = gpt2()
    converted = keras_attn.convert(backbone, **attention)
    tokens = np.random.default_rng(2).integers(1, VOCAB, size=(2, T)).astype("int32")
    inputs = {"token_ids": tokens, "padding_mask": np.ones((2, T), bool)}
    forward = numpy(converted(inputs))[:, start:]
    lm = keras_hub.models.GPT2CausalLM(backbone=converted, preprocessor=None)
    _, cache = lm._build_cache(tokens)  # the prompt fills the cache
    steps = []
    for i in range(start, T):
        _, hidden, cache = lm.call_with_cache(tokens[:, i : i + 1], cache, i)
        steps.append(numpy(hidden))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), forward, atol=1e-5)
    original = numpy(backbone(inputs))[:, start:]
    if attention:
        assert np.abs(forward - original).max() > 1e-3
    else:
        np.testing.assert_allclose(forward, original, atol=1e-5)
