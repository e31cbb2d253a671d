"""KerasHub's own subclasses of Keras's attention, run on keras_attn's `MultiHeadAttention`.

Whisper, Moonshine and XLNet subclass `keras.layers.MultiHeadAttention` and build their
projections themselves from Keras's private attributes (`_num_heads`, `_key_dim`,
`_use_bias`, `_kernel_initializer`, ...), then compute with what `_build_attention` sets
(`_dot_product_equation`, `_combine_equation`, `_masked_softmax`, `_dropout_layer`).
Here their classes, unchanged, are given keras_attn's class as base (`on_keras_attn`),
the backbones are built from config with random weights (no download), given Keras's
weights, and must give Keras's outputs: padding included, cached decoding where the
model has it.
"""

import types

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn.layers import keras_compat

keras_hub = pytest.importorskip("keras_hub")

from keras_hub.src.models.moonshine import moonshine_decoder  # noqa: E402
from keras_hub.src.models.moonshine import moonshine_encoder  # noqa: E402
from keras_hub.src.models.whisper import whisper_decoder  # noqa: E402
from keras_hub.src.models.whisper import whisper_encoder  # noqa: E402
from keras_hub.src.models.xlnet import xlnet_encoder  # noqa: E402

HIDDEN, HEADS, T = 16, 2, 6
BATCH = 3  # the first row unpadded, the others padded

# Where KerasHub's models name their attention classes.
ATTENTION_NAMES = {
    whisper_encoder: "WhisperCachedMultiHeadAttention",
    whisper_decoder: "WhisperCachedMultiHeadAttention",
    moonshine_encoder: "MoonshineMultiHeadAttention",
    moonshine_decoder: "MoonshineMultiHeadAttention",
    xlnet_encoder: "TwoStreamRelativeAttention",
}


def numpy(x):
    return ops.convert_to_numpy(x)


def padding(batch, length, seed=0):
    lengths = np.random.default_rng(seed).integers(2, length + 1, size=batch)
    lengths[0] = length
    return np.arange(length)[None, :] < lengths[:, None]


# -- the same class on keras_attn's base ---------------------------------------------


def _with_class_cell(function, cls):
    """`function` with its ``__class__`` cell (zero-argument ``super()``) set to `cls`."""
    if (
        not isinstance(function, types.FunctionType)
        or "__class__" not in function.__code__.co_freevars
    ):
        return function
    cells = [
        types.CellType(cls) if name == "__class__" else cell
        for name, cell in zip(function.__code__.co_freevars, function.__closure__, strict=True)
    ]
    copy = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__,
        tuple(cells),
    )  # fmt: skip
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    return copy


_REBASED = {keras.layers.MultiHeadAttention: keras_attn.MultiHeadAttention}


def rebased(cls):
    """`cls` with the same body, on keras_attn's `MultiHeadAttention` instead of Keras's."""
    if cls not in _REBASED:
        bases = tuple(rebased(base) if issubclass(base, keras.layers.MultiHeadAttention) else base
                      for base in cls.__bases__)  # fmt: skip
        namespace = {
            name: value
            for name, value in vars(cls).items()
            if name not in ("__dict__", "__weakref__")
        }
        new = type(cls.__name__, bases, namespace)
        for name, value in namespace.items():
            if isinstance(value, (staticmethod, classmethod)):
                continue
            if isinstance(value, property):
                value = property(
                    *(_with_class_cell(f, new) if f else None
                      for f in (value.fget, value.fset, value.fdel)),
                    doc=value.__doc__,
                )  # fmt: skip
            else:
                value = _with_class_cell(value, new)
            setattr(new, name, value)
        _REBASED[cls] = new
    return _REBASED[cls]


@pytest.fixture
def on_keras_attn(monkeypatch):
    """While the test runs, KerasHub's models build their attention on keras_attn's base."""
    for module, name in ATTENTION_NAMES.items():
        monkeypatch.setattr(module, name, rebased(getattr(module, name)))


def attention_layers(model):
    return [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, (keras.layers.MultiHeadAttention, keras_attn.Attention))
    ]


def twin(backbone):
    """`backbone`'s class built from its config (inside `on_keras_attn`), holding its weights."""
    ours = type(backbone).from_config(backbone.get_config())
    theirs_layers, our_layers = attention_layers(backbone), attention_layers(ours)
    assert len(our_layers) == len(theirs_layers) > 0
    assert all(isinstance(layer, keras_attn.MultiHeadAttention) for layer in our_layers)
    assert not any(isinstance(layer, keras.layers.MultiHeadAttention) for layer in our_layers)
    ours.set_weights(backbone.get_weights())
    return ours


def assert_same_outputs(ours, theirs, inputs, atol=1e-5):
    got, expected = ours(inputs), theirs(inputs)
    if isinstance(expected, dict):
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_allclose(numpy(got[key]), numpy(expected[key]), atol=atol)
    else:
        np.testing.assert_allclose(numpy(got), numpy(expected), atol=atol)


# -- Keras's private attributes on keras_attn's class --------------------------------

# Keras's constructor arguments, compared through their serialized form.
CONSTRUCTOR_KWARGS = dict(
    num_heads=2,
    key_dim=4,
    value_dim=3,
    dropout=0.25,
    use_bias=False,
    output_shape=(5,),
    kernel_initializer="ones",
    bias_initializer="zeros",
    kernel_regularizer="l2",
    bias_regularizer="l1",
    activity_regularizer="l1",
    kernel_constraint="non_neg",
    bias_constraint="unit_norm",
)


def serialized(value):
    return keras.saving.serialize_keras_object(value)


@pytest.mark.parametrize(
    "shape, axes",
    [((2, 5, 8), None), ((2, 3, 4, 8), (2,)), ((2, 3, 4, 8), (1, 2)), ((2, 3, 4, 8), (-2,))],
)
def test_private_attributes_have_keras_values(shape, axes):
    theirs = keras.layers.MultiHeadAttention(attention_axes=axes, **CONSTRUCTOR_KWARGS)
    ours = keras_attn.MultiHeadAttention(attention_axes=axes, **CONSTRUCTOR_KWARGS)
    constructor = [n for n in keras_compat.KERAS_PRIVATE_ATTRIBUTES if not n.endswith("dense")]
    built = ("_dot_product_equation", "_combine_equation", "_softmax", "_dropout_layer")
    for name in set(constructor) - set(built):
        assert serialized(getattr(ours, name)) == serialized(getattr(theirs, name)), name
    theirs.build(shape, shape)
    ours.build(shape, shape)
    for name in ("_attention_axes", "_dot_product_equation", "_combine_equation"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours._dropout_layer.rate == theirs._dropout_layer.rate
    for name in keras_compat.KERAS_PRIVATE_ATTRIBUTES:
        if name != "_gate_dense":
            assert hasattr(ours, name), name

    # `_softmax` over Keras's scores: the same weights (every row allows a key).
    rng = np.random.default_rng(0)
    query = rng.normal(size=(*shape[:-1], 2, 4)).astype("float32")
    key = rng.normal(size=(*shape[:-1], 2, 4)).astype("float32")
    scores = ops.einsum(ours._dot_product_equation, key, query)
    mask = rng.random(scores.shape) < 0.6
    mask[(..., *[0] * len(ours._attention_axes))] = True
    np.testing.assert_allclose(
        numpy(ours._softmax(scores, mask=mask)), numpy(theirs._softmax(scores, mask=mask)),
        atol=1e-6,
    )  # fmt: skip
    value = rng.normal(size=(*shape[:-1], 2, 3)).astype("float32")
    weights = theirs._softmax(scores)
    np.testing.assert_allclose(
        numpy(ops.einsum(ours._combine_equation, weights, value)),
        numpy(ops.einsum(theirs._combine_equation, weights, value)),
        atol=1e-6,
    )


def test_private_attributes_write_through():
    # XLNet's `build` sets `self._use_bias = False` before building its projections.
    layer = keras_attn.MultiHeadAttention(num_heads=2, key_dim=4)
    layer._use_bias = False
    layer.build((2, 5, 8), (2, 5, 8))
    assert layer.use_bias is False and layer.get_config()["use_bias"] is False
    assert [v.path.split("/")[-1] for v in layer.weights] == ["kernel"] * 4
    assert layer._inverse_sqrt_key_dim == 0.5


def test_grouped_query_attention_equations():
    theirs = keras.layers.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2)
    ours = keras_attn.GroupedQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2)
    theirs.build((2, 5, 8), (2, 5, 8))
    ours.build((2, 5, 8), (2, 5, 8))
    for name in ("_dot_product_equation", "_combine_equation", "_inverse_sqrt_head_dim"):
        assert getattr(ours, name) == getattr(theirs, name), name


# -- Whisper ------------------------------------------------------------------------

MELS, AUDIO = 8, 12


def whisper():
    return keras_hub.models.WhisperBackbone(
        vocabulary_size=40,
        num_layers=1,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=32,
        num_mels=MELS,
        max_encoder_sequence_length=AUDIO,
        max_decoder_sequence_length=T,
    )


def whisper_inputs(batch):
    rng = np.random.default_rng(batch)
    return {
        "encoder_features": rng.normal(size=(batch, AUDIO, MELS)).astype("float32"),
        "decoder_token_ids": rng.integers(1, 40, size=(batch, T)).astype("int32"),
        "decoder_padding_mask": padding(batch, T, seed=batch).astype("int32"),
    }


def test_whisper_backbone(on_keras_attn):
    keras.utils.set_random_seed(0)
    backbone = whisper()
    ours = twin(backbone)
    assert_same_outputs(ours, backbone, whisper_inputs(BATCH))
    assert {layer.last_path for layer in attention_layers(ours)} <= {"fused", "dense"}


def decode_with_cache(decoders, hidden, encoded):
    """KerasHub's cached decoding through a stack of decoder layers, one token a step.

    Each layer's cross-attention cache is computed once from `encoded` (KerasHub's
    convention: read as it is, no index).
    """
    batch, length, _ = hidden.shape
    self_caches = [ops.zeros((batch, 2, length, HEADS, HIDDEN // HEADS)) for _ in decoders]
    cross_caches = [
        ops.stack(
            [layer._cross_attention_layer._key_dense(encoded),
             layer._cross_attention_layer._value_dense(encoded)],
            axis=1,
        )  # (B, 2, S, H, D)
        for layer in decoders
    ]  # fmt: skip
    steps = []
    for i in range(length):
        x = hidden[:, i : i + 1]
        for j, layer in enumerate(decoders):
            x, self_caches[j], _ = layer(
                x,
                encoded,
                self_attention_cache=self_caches[j],
                self_attention_cache_update_index=i,
                cross_attention_cache=cross_caches[j],
            )
        steps.append(numpy(x))
    return np.concatenate(steps, axis=1)


def test_whisper_cached_decoding(on_keras_attn):
    keras.utils.set_random_seed(1)
    backbone = whisper()
    ours = twin(backbone)
    inputs = whisper_inputs(BATCH)
    encoded = backbone(inputs)["encoder_sequence_output"]
    our_encoded = ours(inputs)["encoder_sequence_output"]
    hidden = np.random.default_rng(BATCH).normal(size=(BATCH, T, HIDDEN)).astype("float32")
    expected = decode_with_cache(backbone.decoder_transformer_layers, hidden, encoded)
    got = decode_with_cache(ours.decoder_transformer_layers, hidden, our_encoded)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # And the cached steps are the uncached forward pass.
    full = hidden
    for layer in ours.decoder_transformer_layers:
        full = layer(full, our_encoded)
    np.testing.assert_allclose(got, numpy(full), atol=1e-5)
    # Every attention ran on keras_attn's engine.
    assert {layer.last_path for layer in attention_layers(ours)} <= {"fused", "dense"}


# -- Moonshine ----------------------------------------------------------------------

SAMPLES = 4000  # 8 encoder positions after Moonshine's three convolutions


def moonshine():
    return keras_hub.models.MoonshineBackbone(
        vocabulary_size=40,
        filter_dim=HIDDEN,
        encoder_num_layers=1,
        decoder_num_layers=1,
        hidden_dim=HIDDEN,
        intermediate_dim=32,
        encoder_num_heads=HEADS,
        decoder_num_heads=HEADS,
        max_position_embeddings=64,
    )


def moonshine_inputs(batch):
    rng = np.random.default_rng(batch)
    lengths = rng.integers(SAMPLES // 2, SAMPLES + 1, size=batch)
    lengths[0] = SAMPLES
    return {
        "encoder_input_values": rng.normal(size=(batch, SAMPLES, 1)).astype("float32"),
        "encoder_padding_mask": np.arange(SAMPLES)[None, :] < lengths[:, None],
        "decoder_token_ids": rng.integers(1, 40, size=(batch, T)).astype("int32"),
        "decoder_padding_mask": padding(batch, T, seed=batch),
    }


def test_moonshine_backbone(on_keras_attn):
    keras.utils.set_random_seed(2)
    backbone = moonshine()
    ours = twin(backbone)
    assert_same_outputs(ours, backbone, moonshine_inputs(BATCH))
    assert {layer.last_path for layer in attention_layers(ours)} <= {"fused", "dense"}


def moonshine_steps(task, inputs, start=2):
    """Cached decoding with Moonshine's task: the prompt seeds the cache, then each token."""
    tokens = inputs["decoder_token_ids"]
    _, self_cache, cross_cache, encoded, encoded_mask = task._build_cache(
        inputs["encoder_input_values"], inputs["encoder_padding_mask"], tokens,
        inputs["decoder_padding_mask"],
    )  # fmt: skip
    logits = []
    for i in range(start, T):
        step, _, self_cache, _ = task.call_decoder_with_cache(
            encoded, encoded_mask, tokens[:, i : i + 1], self_cache, i, cross_cache
        )
        logits.append(numpy(step))
    return np.concatenate(logits, axis=1)


def test_moonshine_cached_decoding(on_keras_attn):
    keras.utils.set_random_seed(3)
    backbone = moonshine()
    ours = twin(backbone)
    inputs = moonshine_inputs(BATCH)
    expected = moonshine_steps(keras_hub.models.MoonshineAudioToText(backbone), inputs)
    got = moonshine_steps(keras_hub.models.MoonshineAudioToText(ours), inputs)
    np.testing.assert_allclose(got, expected, atol=1e-4)


# -- XLNet --------------------------------------------------------------------------


def xlnet():
    return keras_hub.models.XLNetBackbone(
        vocabulary_size=40,
        num_layers=1,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=32,
    )


def test_xlnet_backbone(on_keras_attn):
    keras.utils.set_random_seed(4)
    backbone = xlnet()
    ours = twin(backbone)
    rng = np.random.default_rng(BATCH)
    inputs = {
        "token_ids": rng.integers(1, 40, size=(BATCH, T)).astype("int32"),
        "padding_mask": padding(BATCH, T, seed=BATCH).astype("int32"),
        "segment_ids": (np.arange(T)[None, :] >= T // 2).repeat(BATCH, 0).astype("int32"),
    }
    assert_same_outputs(ours, backbone, inputs)
