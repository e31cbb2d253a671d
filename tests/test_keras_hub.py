"""KerasHub's layers and models on keras_attn's attention (`keras_attn.convert`).

KerasHub's TransformerEncoder, TransformerDecoder (cross-attention and cache) and
backbones built from config with random weights (no download) give the same outputs
once converted, padding masks and cached decoding included, at batch sizes 1, 2, 3.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn

keras_hub = pytest.importorskip("keras_hub")

HIDDEN, HEADS, T, S = 16, 2, 6, 5
BATCHES = [1, 2, 3]


def randn(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def padding(batch, length, seed=0):
    lengths = np.random.default_rng(seed).integers(2, length + 1, size=batch)
    lengths[0] = length
    return np.arange(length)[None, :] < lengths[:, None]


def numpy(x):
    return ops.convert_to_numpy(x)


def attention_classes(model):
    return {
        type(layer)
        for layer in model._flatten_layers()
        if isinstance(
            layer,
            (
                keras.layers.MultiHeadAttention,
                keras.layers.GroupQueryAttention,
                keras_attn.Attention,
            ),
        )
    }


def encoder_decoder_model():
    tokens = keras.Input((T, HIDDEN), name="tokens")
    context = keras.Input((S, HIDDEN), name="context")
    tokens_mask = keras.Input((T,), dtype="bool", name="tokens_mask")
    context_mask = keras.Input((S,), dtype="bool", name="context_mask")
    encoded = keras_hub.layers.TransformerEncoder(32, HEADS)(context, padding_mask=context_mask)
    decoded = keras_hub.layers.TransformerDecoder(32, HEADS)(
        tokens,
        encoded,
        decoder_padding_mask=tokens_mask,
        encoder_padding_mask=context_mask,
    )
    return keras.Model([tokens, context, tokens_mask, context_mask], decoded)


@pytest.mark.parametrize("batch", BATCHES)
def test_transformer_encoder_and_decoder(batch):
    model = encoder_decoder_model()
    converted = keras_attn.convert(model)
    assert attention_classes(converted) == {keras_attn.MultiHeadAttention}
    inputs = [
        randn(batch, T, HIDDEN),
        randn(batch, S, HIDDEN, seed=1),
        padding(batch, T),
        padding(batch, S, seed=1),
    ]
    np.testing.assert_allclose(numpy(converted(inputs)), numpy(model(inputs)), atol=1e-5)


def decode(decoder, tokens, context, context_mask):
    """Cached decoding, one token at a time, with a cross-attention cache computed once."""
    batch = tokens.shape[0]
    head_dim = HIDDEN // HEADS
    self_cache = ops.zeros((batch, 2, T, HEADS, head_dim))
    cross = decoder._cross_attention_layer
    cross_cache = ops.stack(
        [
            cross._key_dense(context),
            cross._value_dense(context),
        ],
        axis=1,
    )  # (B, 2, S, H, D)
    steps = []
    for i in range(T):
        out, self_cache, _ = decoder(
            tokens[:, i : i + 1],
            context,
            encoder_padding_mask=context_mask,
            self_attention_cache=self_cache,
            self_attention_cache_update_index=i,
            cross_attention_cache=cross_cache,
        )
        steps.append(numpy(out))
    return np.concatenate(steps, axis=1)


@pytest.mark.parametrize("batch", BATCHES)
def test_transformer_decoder_cached_decoding(batch):
    tokens = keras.Input((T, HIDDEN))
    context = keras.Input((S, HIDDEN))
    decoder = keras_hub.layers.TransformerDecoder(32, HEADS)
    model = keras.Model([tokens, context], decoder(tokens, context))
    converted = keras_attn.convert(model)
    ours = next(
        layer
        for layer in converted._flatten_layers()
        if isinstance(layer, keras_hub.layers.TransformerDecoder)
    )
    assert isinstance(ours._self_attention_layer, keras_attn.MultiHeadAttention)
    assert isinstance(ours._cross_attention_layer, keras_attn.MultiHeadAttention)
    x, c, c_mask = randn(batch, T, HIDDEN), randn(batch, S, HIDDEN, seed=1), padding(batch, S)
    expected = decode(decoder, x, c, c_mask)
    np.testing.assert_allclose(decode(ours, x, c, c_mask), expected, atol=1e-5)
    full = numpy(ours(x, c, encoder_padding_mask=c_mask))
    np.testing.assert_allclose(full, expected, atol=1e-5)


def gpt2():
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=40,
        num_layers=2,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=32,
        max_sequence_length=T,
    )


def token_inputs(batch):
    rng = np.random.default_rng(batch)
    return {
        "token_ids": rng.integers(1, 40, size=(batch, T)).astype("int32"),
        "padding_mask": padding(batch, T, seed=batch),
    }


@pytest.mark.parametrize("batch", BATCHES)
def test_gpt2_backbone_and_cached_decoding(batch):
    backbone = gpt2()
    converted = keras_attn.convert(backbone)
    assert attention_classes(converted) == {keras_attn.MultiHeadAttention}
    inputs = token_inputs(batch)
    np.testing.assert_allclose(numpy(converted(inputs)), numpy(backbone(inputs)), atol=1e-5)

    theirs = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    ours = keras_hub.models.GPT2CausalLM(backbone=converted, preprocessor=None)
    for lm in (theirs, ours):
        _, cache = lm._build_cache(inputs["token_ids"])
        logits, hidden, cache = lm.call_with_cache(inputs["token_ids"][:, 2:3], cache, 2)
        lm.result = numpy(logits), numpy(hidden)
    np.testing.assert_allclose(ours.result[0], theirs.result[0], atol=1e-4)
    np.testing.assert_allclose(ours.result[1], theirs.result[1], atol=1e-5)


@pytest.mark.parametrize("batch", BATCHES)
def test_bert_backbone(batch):
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=40,
        num_layers=2,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=32,
        max_sequence_length=T,
    )
    converted = keras_attn.convert(backbone)
    assert attention_classes(converted) == {keras_attn.MultiHeadAttention}
    inputs = {**token_inputs(batch), "segment_ids": np.zeros((batch, T), "int32")}
    expected, got = backbone(inputs), converted(inputs)
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_allclose(numpy(got[key]), numpy(expected[key]), atol=1e-5)
