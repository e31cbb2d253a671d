"""Converted models are Keras objects: saved, they load in a fresh process.

Each model below is converted and saved here; one fresh Python process (the same
backend) runs ``import keras_attn`` and ``keras.saving.load_model`` on every file and
computes the outputs, which must equal the converted model's (a KerasHub task must
generate the same tokens). Plain Keras models (functional, sequential, subclassed),
KerasHub backbones and a task, with and without attention arguments, LoRA and a
shared layer.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import patterns

T, F = 6, 8
HERE = Path(__file__).parent


def randn(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@keras.saving.register_keras_serializable(package="test_convert_saving")
class Block(keras.layers.Layer):
    """A user's layer that makes its Keras attention layer itself."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(2, 4)

    def build(self, shape):
        self.attention.build(shape, shape)

    def call(self, x):
        return x + self.attention(x, x, use_causal_mask=True)


@keras.saving.register_keras_serializable(package="test_convert_saving")
class Subclassed(keras.Model):
    """A subclassed model holding Keras's grouped-query attention."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.attention = keras.layers.GroupQueryAttention(4, 4, 2)
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        return self.dense(self.attention(x, x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def functional():
    inputs = keras.Input((T, F))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    x = keras.layers.GroupQueryAttention(4, 4, 2, name="gqa")(x, x, use_causal_mask=True)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    return keras_attn.convert(model), randn(2, T, F)


def sequential():
    model = keras.Sequential([keras.Input((T, F)), Block(), keras.layers.Dense(3)])
    return keras_attn.convert(model, pattern=patterns.Local(2)), randn(2, T, F)


def subclassed():
    model = Subclassed()
    model(randn(1, T, F))
    return keras_attn.convert(model), randn(2, T, F)


def with_lora():
    inputs = keras.Input((T, F))
    attention = keras.layers.MultiHeadAttention(2, 4, name="mha")
    model = keras.Model(inputs, attention(inputs, inputs))
    for projection in (attention.query_dense, attention.value_dense):
        projection.enable_lora(2)
        projection.lora_kernel_b.assign(randn(*projection.lora_kernel_b.shape, seed=3))
    return keras_attn.convert(model), randn(2, T, F)


def shared():
    inputs = keras.Input((T, F))
    attention = keras.layers.MultiHeadAttention(2, 4, name="shared")
    x = attention(inputs, inputs)
    model = keras.Model(inputs, attention(x, x))
    return keras_attn.convert(model, normalizer="sparsemax"), randn(2, T, F)


# A byte-pair vocabulary small enough to write down: letters, the GPT-2 space mark Ġ
# and a few merges.
TOKENS = ["<|endoftext|>", "a", "b", "c", "d", "Ġ", "Ġa", "Ġb", "ab", "cd", "Ġab", "Ġc", "Ġd"]
MERGES = ["Ġ a", "Ġ b", "a b", "c d", "Ġa b", "Ġ c", "Ġ d"]
PROMPTS = ["a b", "cd ab c"]
# Tiny backbones of one size (JAX compiles an initializer per weight shape).
BACKBONE = dict(
    num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16
)
MAX_LENGTH = 12


def gpt2_causal_lm():
    """A GPT-2 task with its preprocessor and a tokenizer built here, greedy."""
    keras_hub = pytest.importorskip("keras_hub")
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary={token: i for i, token in enumerate(TOKENS)}, merges=MERGES
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=8)
    backbone = keras_hub.models.GPT2Backbone(**BACKBONE, vocabulary_size=len(TOKENS))
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    lm.compile(sampler="greedy")
    return lm


def generate(lm):
    return lm.generate(PROMPTS, max_length=MAX_LENGTH, stop_token_ids=None)


def bert_backbone():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(**BACKBONE, vocabulary_size=len(TOKENS))
    rng = np.random.default_rng(1)
    inputs = {
        "token_ids": rng.integers(1, len(TOKENS), size=(2, T)).astype("int32"),
        "padding_mask": np.arange(T)[None, :] < np.array([[T], [T - 2]]),
        "segment_ids": np.zeros((2, T), "int32"),
    }
    return keras_attn.convert(backbone, normalizer="sparsemax", pattern=patterns.Local(3)), inputs


def task():
    return keras_attn.convert(gpt2_causal_lm()), PROMPTS


CASES = {
    "functional": functional,
    "sequential": sequential,
    "subclassed": subclassed,
    "lora": with_lora,
    "shared": shared,
    "bert_backbone": bert_backbone,
    "gpt2_causal_lm": task,
}

LOAD = """
import json, sys
import numpy as np
import keras_attn
import keras
sys.path.insert(0, {tests!r})
import test_convert_saving as cases

results = {{}}
for name in {names!r}:
    try:
        model = keras.saving.load_model({directory!r} + f"/{{name}}.keras")
        if name == "gpt2_causal_lm":
            outputs = [np.asarray(cases.generate(model))]
        else:
            data = dict(np.load({directory!r} + f"/{{name}}.npz"))
            inputs = data["x"] if list(data) == ["x"] else data
            outputs = [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(model(inputs))]
        np.savez({directory!r} + f"/{{name}}.loaded.npz", *outputs)
        layers = model._flatten_layers()
        results[name] = {{
            "class": type(model).__name__,
            "converted": isinstance(model, keras_attn.Converted),
            "keras_attention": sum(
                isinstance(l, (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention))
                for l in layers
            ),
            "keras_attn_attention": sorted(
                type(l.normalizer).__name__ for l in layers if isinstance(l, keras_attn.Attention)
            ),
        }}
    except Exception as error:
        results[name] = {{"error": f"{{type(error).__name__}}: {{error}}"}}
print("RESULTS", json.dumps(results))
"""


def attention_normalizers(model):
    return sorted(
        type(layer.normalizer).__name__
        for layer in model._flatten_layers()
        if isinstance(layer, keras_attn.Attention)
    )


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Every case converted and saved here, then loaded in one fresh process."""
    directory = tmp_path_factory.mktemp("converted")
    expected = {}
    for name, make in CASES.items():
        try:
            converted, inputs = make()
        except pytest.skip.Exception:
            continue
        converted.save(directory / f"{name}.keras")
        if name == "gpt2_causal_lm":
            outputs = [np.asarray(generate(converted))]
        else:
            arrays = inputs if isinstance(inputs, dict) else {"x": inputs}
            np.savez(directory / f"{name}.npz", **arrays)
            outputs = [ops.convert_to_numpy(y) for y in keras.tree.flatten(converted(inputs))]
        expected[name] = (converted, outputs)
    code = LOAD.format(tests=str(HERE), names=list(expected), directory=str(directory))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULTS", 1)[1])
    return directory, expected, results


@pytest.mark.parametrize("name", list(CASES))
def test_a_saved_converted_model_loads_in_a_fresh_process(loaded, name):
    directory, expected, results = loaded
    if name not in expected:
        pytest.skip("keras_hub is not installed")
    result = results[name]
    assert "error" not in result, result.get("error")
    converted, outputs = expected[name]
    assert result["class"] == type(converted).__name__
    assert result["converted"]
    assert result["keras_attention"] == 0
    assert result["keras_attn_attention"] == attention_normalizers(converted)
    with np.load(directory / f"{name}.loaded.npz") as data:
        got = [data[f"arr_{i}"] for i in range(len(data.files))]
    assert len(got) == len(outputs)
    for ours, theirs in zip(got, outputs, strict=True):
        if ours.dtype.kind in "US":  # generated text
            np.testing.assert_array_equal(ours, theirs)
        else:
            np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_converted_task_keeps_its_preprocessor_sampler_and_compile_settings():
    keras_hub = pytest.importorskip("keras_hub")
    lm = gpt2_causal_lm()
    lm.compile(optimizer=keras.optimizers.SGD(0.125), sampler="greedy")
    converted = keras_attn.convert(lm)
    assert isinstance(converted, keras_hub.models.GPT2CausalLM)
    assert attention_normalizers(converted) == ["Softmax", "Softmax"]
    assert list(converted.preprocessor.tokenizer.get_vocabulary()) == TOKENS
    assert isinstance(converted.sampler, keras_hub.samplers.GreedySampler)
    assert isinstance(converted.optimizer, keras.optimizers.SGD)
    assert float(converted.optimizer.learning_rate) == 0.125
    expected = generate(lm)
    assert any(len(out) > len(prompt) for out, prompt in zip(expected, PROMPTS, strict=True))
    assert list(generate(converted)) == list(expected)
