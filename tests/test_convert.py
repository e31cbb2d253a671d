"""`keras_attn.convert`: Keras attention layers of any model become keras_attn's."""

import importlib
from pathlib import Path

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
    # The same paths too (a LayoutMap matches them).
    assert [w.path for w in converted.weights] == [w.path for w in model.weights]
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


@keras.saving.register_keras_serializable(package="test_convert")
class Custom(keras.layers.MultiHeadAttention):
    """A subclass of Keras's attention with code of its own."""

    def _compute_attention(self, query, key, value, attention_mask=None, training=None):
        return super()._compute_attention(query, key, value, attention_mask, training)


def test_a_subclass_with_its_own_code_is_left_as_it_is_and_named():
    inputs = keras.Input((T, F))
    alone = keras.Model(inputs, Custom(2, 4, name="custom")(inputs, inputs))
    with pytest.raises(
        ValueError, match=r"found no attention layer that it converts.*'custom' \(.*Custom\)"
    ):
        keras_attn.convert(alone)
    # Beside a layer that converts: a warning naming it, or an error if asked for.
    x = Custom(2, 4, name="custom")(inputs, inputs)
    model = keras.Model(inputs, keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x))
    with pytest.warns(UserWarning, match=r"leaves 1 attention layer.*'custom' \(.*Custom\)"):
        converted = keras_attn.convert(model, pattern=patterns.Local(2))
    assert type(converted.get_layer("custom")) is Custom
    assert isinstance(converted.get_layer("mha").pattern, patterns.Local)
    with pytest.raises(ValueError, match=r"'custom' \(.*Custom\).*unconverted='raise'"):
        keras_attn.convert(model, unconverted="raise")


def test_a_model_without_attention_is_an_error():
    inputs = keras.Input((T, F))
    with pytest.raises(ValueError, match="found no attention layer that it converts"):
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


def lora_model():
    """Keras's attention with LoRA on every projection (non-zero factors), frozen elsewhere."""
    inputs = keras.Input((T, F))
    attention = keras.layers.MultiHeadAttention(2, 4, name="mha")
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(attention(inputs, inputs)))
    model.get_layer("head").trainable = False
    projections = {
        "query": (attention.query_dense, 2),
        "key": (attention.key_dense, 2),
        "value": (attention.value_dense, 3),
        "attention_output": (attention.output_dense, 1),
    }
    for seed, (projection, rank) in enumerate(projections.values()):
        projection.enable_lora(rank, lora_alpha=2 * rank)
        projection.lora_kernel_b.assign(randn(*projection.lora_kernel_b.shape, seed=seed))
    return model, projections


def test_lora_converts_with_its_factors():
    model, projections = lora_model()
    converted = keras_attn.convert(model)
    layer = converted.get_layer("mha")
    assert isinstance(layer, keras_attn.MultiHeadAttention)
    ours = {
        "query": layer.query_dense,
        "key": layer.key_dense,
        "value": layer.value_dense,
        "attention_output": layer.output_dense,
    }
    for name, (theirs, rank) in projections.items():
        assert ours[name].lora_enabled and ours[name].lora_rank == rank
        assert ours[name].lora_alpha == 2 * rank
        np.testing.assert_array_equal(numpy(ours[name].lora_kernel_b), numpy(theirs.lora_kernel_b))
    np.testing.assert_allclose(numpy(converted(X)), numpy(model(X)), atol=1e-5)
    # The same weights train: LoRA factors and biases, not the frozen kernels or head.
    trainable = [(w.path.split("/")[-1], tuple(w.shape)) for w in model.trainable_weights]
    assert trainable == [
        (w.path.split("/")[-1], tuple(w.shape)) for w in converted.trainable_weights
    ]
    assert {name for name, _ in trainable} == {"bias", "lora_kernel_a", "lora_kernel_b"}
    for ours_w, theirs_w in zip(converted.trainable_weights, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(numpy(ours_w), numpy(theirs_w))


def test_kerashub_backbone_lora_converts():
    keras_hub = pytest.importorskip("keras_hub")
    config = dict(
        vocabulary_size=30, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=16,
        max_sequence_length=T,
    )  # fmt: skip
    backbone = keras_hub.models.GPT2Backbone(**config)
    backbone.enable_lora(2)
    for seed, weight in enumerate(backbone.weights):
        if "lora_kernel_b" in weight.path:
            weight.assign(randn(*weight.shape, seed=seed))
    converted = keras_attn.convert(backbone)
    inputs = {
        "token_ids": np.arange(2 * T).reshape(2, T).astype("int32") % 30,
        "padding_mask": np.ones((2, T), bool),
    }
    np.testing.assert_allclose(numpy(converted(inputs)), numpy(backbone(inputs)), atol=1e-5)
    assert [w.path for w in converted.trainable_weights] == [
        w.path for w in backbone.trainable_weights
    ]
    # KerasHub's LoRA file written from the converted backbone loads into Keras's.
    path = str(Path(pytest.importorskip("tempfile").mkdtemp()) / "gpt2.lora.h5")
    converted.save_lora_weights(path)
    fresh = keras_hub.models.GPT2Backbone(**config)
    fresh.set_weights([numpy(w) for w in backbone.weights if "lora" not in w.path])
    fresh.load_lora_weights(path)
    np.testing.assert_allclose(numpy(fresh(inputs)), numpy(backbone(inputs)), atol=1e-5)


def test_weights_that_cannot_be_converted_say_why():
    model, _ = lora_model()
    with pytest.raises(
        ValueError,
        match=r"layer 'mha': its projection 'key_dense' holds .*lora_kernel_a .* keras_attn's "
        r"MultiHeadAttention made from its config holds .*must keep the projections' shapes",
    ):
        keras_attn.convert(model, num_key_value_heads=1)


def test_a_shared_layer_and_a_nested_model_convert_once():
    inputs = keras.Input((T, F))
    attention = keras.layers.MultiHeadAttention(2, 4, name="shared")
    x = attention(inputs, inputs)
    x = attention(x, x, use_causal_mask=True)
    inner_inputs = keras.Input((T, F))
    inner = keras.Model(inner_inputs, Block(name="block")(inner_inputs), name="inner")
    model = keras.Model(inputs, inner(inner(x)))
    converted = keras_attn.convert(model)
    np.testing.assert_allclose(numpy(converted(X)), numpy(model(X)), atol=1e-5)
    assert [w.shape for w in converted.weights] == [w.shape for w in model.weights]
    ours = [
        layer for layer in converted._flatten_layers() if isinstance(layer, keras_attn.Attention)
    ]
    assert len(ours) == 2  # the shared layer and the nested model's, once each
    shared = converted.get_layer("shared")
    assert len(shared._inbound_nodes) == 2
    # One layer: changing its weights changes both of its calls.
    inner_converted = converted.get_layer("inner")
    assert isinstance(inner_converted.get_layer("block").attention, keras_attn.MultiHeadAttention)
    before = numpy(converted(X))
    shared.output_dense.set_weights([2 * w for w in shared.output_dense.get_weights()])
    doubled = model.get_layer("shared").output_dense
    doubled.set_weights([2 * w for w in doubled.get_weights()])
    np.testing.assert_allclose(numpy(converted(X)), numpy(model(X)), atol=1e-5)
    assert not np.allclose(numpy(converted(X)), before)


def test_a_model_that_does_not_save_is_a_clear_error():
    class Unregistered(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.attention = keras.layers.MultiHeadAttention(2, 4)

        def call(self, x):
            return self.attention(x, x)

    inputs = keras.Input((T, F))
    model = keras.Model(inputs, Unregistered()(inputs), name="custom")
    with pytest.raises(
        ValueError,
        match="(?s)model 'custom' does not save and load: .*Could not locate class .*register",
    ):
        keras_attn.convert(model)
