"""`keras_attn.convert`: Keras attention layers of any model become keras_attn's."""

import importlib

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import patterns

T, F = 6, 8


def randn(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


X = randn(3, T, F)


def functional_model():
    inputs = keras.Input((T, F))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    x = keras.layers.GroupQueryAttention(4, 4, 2, name="gqa")(x, x, use_causal_mask=True)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@keras.saving.register_keras_serializable(package="test_convert")
class Block(keras.layers.Layer):
    """A user's layer holding a Keras attention layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(2, 4)
        self.dense = keras.layers.Dense(F)

    def build(self, shape):
        self.attention.build(shape, shape)
        self.dense.build(shape)

    def call(self, x):
        return self.dense(self.attention(x, x))


def nested_model():
    inputs = keras.Input((T, F))
    return keras.Model(inputs, Block()(inputs))


def numpy(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("make", [functional_model, nested_model])
def test_same_outputs_without_arguments(make):
    model = make()
    converted = keras_attn.convert(model)
    np.testing.assert_allclose(numpy(converted(X)), numpy(model(X)), atol=1e-5)
    kinds = [type(layer) for layer in converted._flatten_layers()]
    assert keras.layers.MultiHeadAttention not in kinds
    assert keras_attn.MultiHeadAttention in kinds
    # The original model is not touched.
    assert any(type(layer) is keras.layers.MultiHeadAttention for layer in model._flatten_layers())


def test_same_weights_in_the_same_order():
    model = functional_model()
    converted = keras_attn.convert(model)
    assert [w.shape for w in converted.weights] == [w.shape for w in model.weights]
    for ours, theirs in zip(converted.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_attention_arguments_reach_every_layer():
    model = functional_model()
    converted = keras_attn.convert(model, pattern=patterns.Local(2), normalizer="sparsemax")
    layers = [
        layer for layer in converted._flatten_layers() if isinstance(layer, keras_attn.Attention)
    ]
    assert len(layers) == 2
    assert all(isinstance(layer.pattern, patterns.Local) for layer in layers)
    assert all(type(layer.normalizer).__name__ == "Sparsemax" for layer in layers)
    # The same numbers as keras_attn layers made by hand with these weights.
    mha = keras_attn.MultiHeadAttention(2, 4, pattern=patterns.Local(2), normalizer="sparsemax")
    mha(X, X)
    mha.set_weights(model.get_layer("mha").get_weights())
    converted_mha = converted.get_layer("mha")
    np.testing.assert_allclose(numpy(converted_mha(X, X)), numpy(mha(X, X)), atol=1e-6)


def test_converted_model_trains_saves_and_loads(tmp_path):
    converted = keras_attn.convert(functional_model(), pattern=patterns.Local(3))
    before = [w.copy() for w in converted.get_weights()]
    converted.compile(optimizer="adam", loss="mse")
    converted.fit(X, randn(3, T, 3, seed=1), epochs=2, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(before, converted.get_weights(), strict=True))
    path = tmp_path / "converted.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(numpy(loaded(X)), numpy(converted(X)), atol=1e-6)
    patterns_loaded = [
        layer.pattern
        for layer in loaded._flatten_layers()
        if isinstance(layer, keras_attn.Attention)
    ]
    assert len(patterns_loaded) == 2
    assert all(isinstance(p, patterns.Local) for p in patterns_loaded)


def test_nested_conversion_survives_saving(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
        max_sequence_length=T,
    )  # fmt: skip
    converted = keras_attn.convert(backbone, normalizer="sparsemax")
    inputs = {
        "token_ids": np.arange(2 * T).reshape(2, T).astype("int32") % 30,
        "padding_mask": np.ones((2, T), bool),
        "segment_ids": np.zeros((2, T), "int32"),
    }
    path = tmp_path / "bert.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    expected = converted(inputs)["sequence_output"]
    np.testing.assert_allclose(numpy(loaded(inputs)["sequence_output"]), numpy(expected), atol=1e-5)
    normalizers = {
        type(layer.normalizer).__name__
        for layer in loaded._flatten_layers()
        if isinstance(layer, keras_attn.Attention)
    }
    assert normalizers == {"Sparsemax"}


def test_a_subclass_with_its_own_code_is_an_error():
    class Custom(keras.layers.MultiHeadAttention):
        def _compute_attention(self, query, key, value, attention_mask=None, training=None):
            return super()._compute_attention(query, key, value, attention_mask, training)

    inputs = keras.Input((T, F))
    model = keras.Model(inputs, Custom(2, 4, name="custom")(inputs, inputs))
    with pytest.raises(ValueError, match="layer 'custom' of class .*Custom"):
        keras_attn.convert(model)


def test_a_model_without_attention_is_an_error():
    inputs = keras.Input((T, F))
    with pytest.raises(ValueError, match="found no Keras attention layer"):
        keras_attn.convert(keras.Model(inputs, keras.layers.Dense(2)(inputs)))


def test_convert_is_a_function_of_a_plain_module():
    module = importlib.import_module("keras_attn.conversion")
    assert type(module) is type(importlib)
    assert keras_attn.convert is module.convert
    model = functional_model()
    converted = keras_attn.convert(model)
    assert isinstance(converted, keras_attn.Converted)
    assert isinstance(converted, type(model))


@pytest.mark.parametrize("layer", ["mha", "gqa"])
def test_a_model_whose_output_is_the_attention_saves_and_loads(tmp_path, layer):
    # The converted layer makes the model's output tensor: that tensor must name it.
    inputs = keras.Input((5, 8))
    if layer == "mha":
        attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    else:
        attention = keras.layers.GroupQueryAttention(
            head_dim=4, num_query_heads=2, num_key_value_heads=1
        )
    model = keras.Model(inputs, attention(inputs, inputs, use_causal_mask=True))
    converted = keras_attn.convert(model)
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    converted.save(tmp_path / "converted.keras")
    loaded = keras.saving.load_model(tmp_path / "converted.keras")
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)), atol=1e-6
    )


def test_something_else_than_a_model_is_a_clear_error():
    with pytest.raises(TypeError, match="takes a Keras model.*Received: model='model'"):
        keras_attn.convert("model")
