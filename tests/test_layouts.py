"""`keras_attn.layout_map`: attention heads sharded over a mesh axis (Megatron-style).

The layouts (keys, axes, the heads check) are pure Python and are tested on every
backend. What they do under `keras.distribution.ModelParallel` is tested on JAX with
8 virtual CPU devices, in one subprocess (the device count is read when JAX starts):
kernels really sharded, a forward pass and a training step equal to one device's,
and a compiled program with no all-gather and one all-reduce, after the output
projection.
"""

import json
import math
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_attn

T, F = 6, 16
M = "model"
# What each attention weight of a Keras-layout layer gets, by its last two path parts.
MEGATRON = {
    **{f"{p}/kernel": (None, M, None) for p in ("query", "key", "value", "gate")},
    **{f"{p}/bias": (M, None) for p in ("query", "key", "value", "gate")},
    "attention_output/kernel": (M, None, None),
    "attention_output/bias": (None,),
}
GPT2 = dict(
    vocabulary_size=50, num_layers=2, num_heads=4, hidden_dim=F, intermediate_dim=32,
    max_sequence_length=8, dropout=0.0,
)  # fmt: skip


def mesh(shape=(2, 4), names=("data", M)):
    devices = [f"cpu:{i}" for i in range(math.prod(shape))]  # no backend needed
    return keras.distribution.DeviceMesh(shape, names, devices)


def backbone(kind):
    keras_hub = pytest.importorskip("keras_hub")
    if kind == "gpt2":
        return keras_hub.models.GPT2Backbone(**GPT2)
    config = {**GPT2, "num_layers": 1}
    return keras_hub.models.BertBackbone(**config)


def last_two(path):
    return "/".join(path.split("/")[-2:])


def axes_of(layout_map, path):
    layout = layout_map[path]
    return None if layout is None else tuple(layout.axes)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_keys_match_every_attention_weight_of_a_converted_backbone_and_nothing_else(kind):
    original = backbone(kind)
    converted = keras_attn.convert(original)
    layout_map = keras_attn.layout_map(mesh(), converted)
    attention = 0
    for variable in converted.weights:
        expected = MEGATRON.get(last_two(variable.path))
        attention += expected is not None
        assert axes_of(layout_map, variable.path) == expected, variable.path
    assert attention == 8 * (GPT2["num_layers"] if kind == "gpt2" else 1)
    # Converting keeps the paths, so the original's map is the converted model's.
    assert list(keras_attn.layout_map(mesh(), original)) == list(layout_map)
    # Without the model, the keys match the projections by name (the output bias is
    # left to Keras's default, replicated).
    by_name = keras_attn.layout_map(mesh())
    for variable in converted.weights:
        expected = MEGATRON.get(last_two(variable.path))
        expected = None if expected == (None,) else expected
        assert axes_of(by_name, variable.path) == expected, variable.path


def test_gates_lora_grouped_heads_and_per_head_component_weights():
    sinks = keras_attn.normalizers.SinkSoftmax(num_heads=1)  # one sink shared by all heads
    inputs = keras.Input((T, F))
    x = keras_attn.MultiHeadAttention(
        num_heads=4, key_dim=4, use_gate=True, normalizer="sink_softmax",
        score_mods=["relative_position"], qk_norm="rms", name="mha",
    )(inputs, inputs)  # fmt: skip
    x = keras_attn.GroupedQueryAttention(
        head_dim=4, num_query_heads=8, num_key_value_heads=4, normalizer=sinks, name="gqa"
    )(x, x)
    x = keras_attn.Attention(num_heads=4, score="general", name="general")(x)
    x = keras.layers.Dense(F, name="query")(x)  # a name alone makes no attention weight
    model = keras.Model(inputs, x)
    model.get_layer("mha").query_dense.enable_lora(2)
    model.get_layer("mha").output_dense.enable_lora(2)
    layout_map = keras_attn.layout_map(mesh(), model)
    got = {v.path: axes_of(layout_map, v.path) for v in model.weights}
    expected = {
        **{f"{layer}/{w}": a for layer in ("mha", "gqa", "general") for w, a in MEGATRON.items()},
        "mha/query/lora_kernel_a": (None, M, None),  # (E, H, r)
        "mha/query/lora_kernel_b": (None, None),  # (r, D)
        "mha/attention_output/lora_kernel_a": (M, None, None),  # (H, D, r)
        "mha/attention_output/lora_kernel_b": (None, None),  # (r, E)
        "mha/relative_position/embeddings": (None, M),  # (buckets, H)
        "mha/sink_softmax/sinks": (M,),  # (H,)
        "mha/query_norm/scale": (None,),  # (D,), shared by the heads
        "mha/key_norm/scale": (None,),
        "gqa/sink_softmax/sinks": (None,),  # (1,)
        "general/general/kernel": (None, None),  # (D, D), shared by the heads
        "query/kernel": None,
        "query/bias": None,
    }
    del expected["general/gate/kernel"], expected["general/gate/bias"]
    del expected["gqa/gate/kernel"], expected["gqa/gate/bias"]
    # Keras numbers the components' names (`sink_softmax_1`); the keys allow it.
    assert {re.sub(r"_\d+/", "/", path): axes for path, axes in got.items()} == expected
    assert axes_of(layout_map, "mha/sink_softmax_12/sinks") == (M,)
    assert axes_of(layout_map, "mha/relative_position/embeddings") == (None, M)


class HeadScaled(keras_attn.Attention):
    """A plugin's layer with a weight of its own, one entry per head, that it declares."""

    heads_axes = {"head_scale": 0}

    def build(self, query_shape, value_shape=None, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        self.head_scale = self.add_weight(name="head_scale", shape=(self.num_heads,))
        self.shared_scale = self.add_weight(name="shared_scale", shape=(self.num_heads,))


def test_a_plugin_layer_declares_its_per_head_weights():
    inputs = keras.Input((T, F))
    model = keras.Model(inputs, HeadScaled(num_heads=4, name="scaled")(inputs))
    layout_map = keras_attn.layout_map(mesh(), model)
    assert axes_of(layout_map, "scaled/head_scale") == (M,)
    assert axes_of(layout_map, "scaled/shared_scale") == (None,)
    assert axes_of(layout_map, "scaled/query/kernel") == (None, M, None)


@pytest.mark.parametrize(
    "layer, mesh_shape, message",
    [
        (lambda: keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, name="two"), (2, 4),
         r"MultiHeadAttention 'two' .* axis 'model' of size 4: num_heads=2 is not a multiple of 4"),
        (lambda: keras.layers.GroupQueryAttention(4, 8, 2, name="gqa"), (1, 4),
         r"'gqa' .* size 4: num_key_value_heads=2 is not a multiple of 4"),
        (lambda: keras_attn.LocalAttention(window=3, num_heads=8, name="fine"), (1, 8), None),
    ],
)  # fmt: skip
def test_heads_must_be_a_multiple_of_the_model_axis(layer, mesh_shape, message):
    inputs = keras.Input((T, F))
    model = keras.Model(inputs, layer()(inputs, inputs))
    if message is None:
        keras_attn.layouts.check_layout(model, mesh(mesh_shape))
        return
    with pytest.raises(ValueError, match=message):
        keras_attn.layout_map(mesh(mesh_shape), model)
    with pytest.raises(ValueError, match=message):
        keras_attn.layouts.check_layout(model, mesh(mesh_shape))


def test_clear_errors():
    with pytest.raises(ValueError, match=r"no axis 'model'.*axis_names=\['data', 'seq'\]"):
        keras_attn.layout_map(mesh((2, 4), ("data", "seq")))
    with pytest.raises(TypeError, match="DeviceMesh. Received: mesh="):
        keras_attn.layout_map(("data", "model"))
    unbuilt = keras_attn.MultiHeadAttention(num_heads=4, key_dim=4, name="unbuilt")
    with pytest.raises(ValueError, match="'unbuilt' has no weights yet"):
        keras_attn.layout_map(mesh(), unbuilt)
    inputs = keras.Input((T, F))
    dense = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="dense_only")
    with pytest.raises(ValueError, match="'dense_only' has no attention layer"):
        keras_attn.layout_map(mesh(), dense)


def test_a_mesh_with_data_and_sequence_axes_is_left_alone():
    layout_map = keras_attn.layout_map(mesh((2, 2, 2), ("data", "seq", M)), backbone("gpt2"))
    used = {axis for key in layout_map for axis in layout_map[key].axes}
    assert used == {None, M}


# -- 8 virtual devices (JAX) ----------------------------------------------------------


def _collectives(text):
    """``[(op, result type)]`` of the collectives of a compiled program's HLO text."""
    op = r"all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter"
    return re.findall(rf"= (.*?) ({op})(?:-start)?\(", text)


def _distributed_report():
    """What ModelParallel makes of `layout_map` on 8 devices (run in a subprocess)."""
    import jax

    dist = keras.distribution
    devices = jax.devices()
    assert len(devices) == 8, devices
    rng = np.random.default_rng(0)
    report = {}

    def specs(model):
        return {
            v.path: [list(v.value.sharding.spec), list(v.value.addressable_shards[0].data.shape)]
            for v in model.weights
        }

    def train(model, x, y):
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        loss = model.train_on_batch(x, y)
        return float(loss), [np.asarray(w) for w in model.get_weights()]

    def difference(a, b):
        return max(
            float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a, b, strict=True)
        )

    # One gated layer on data 2 x model 4.
    def make():
        inputs = keras.Input((T, F))
        layer = keras_attn.MultiHeadAttention(num_heads=4, key_dim=4, use_gate=True, name="mha")
        return keras.Model(inputs, layer(inputs, inputs))

    single = make()
    mesh2 = dist.DeviceMesh((2, 4), ("data", M), devices)
    distribution = dist.ModelParallel(
        layout_map=keras_attn.layout_map(mesh2, single), batch_dim_name="data"
    )
    with distribution.scope():
        sharded = make()
    sharded.set_weights(single.get_weights())
    x = rng.normal(size=(4, T, F)).astype("float32")
    y = rng.normal(size=(4, T, F)).astype("float32")
    report["specs"] = specs(sharded)
    with distribution.scope():
        report["forward"] = difference([sharded(x)], [single(x)])

    batch = jax.sharding.NamedSharding(mesh2.backend_mesh, jax.sharding.PartitionSpec("data"))
    args = (
        [v.value for v in sharded.trainable_variables],
        [v.value for v in sharded.non_trainable_variables],
        jax.device_put(x, batch),
    )

    def forward(trainable, non_trainable, x):
        return sharded.stateless_call(trainable, non_trainable, x)[0]

    def loss(trainable, non_trainable, x):
        return jax.numpy.mean((forward(trainable, non_trainable, x) - y) ** 2)

    for name, function in (("forward", forward), ("gradient", jax.grad(loss))):
        text = jax.jit(function).lower(*args).compile().as_text()
        report[f"{name}_collectives"] = _collectives(text)
    with distribution.scope():
        sharded_step = train(sharded, x, y)
    single_step = train(single, x, y)
    report["loss"] = [sharded_step[0], single_step[0]]
    report["step"] = difference(sharded_step[1], single_step[1])

    # A KerasHub GPT-2, converted under the distribution, on data 2 x seq 2 x model 2.
    original = backbone("gpt2")
    mesh3 = dist.DeviceMesh((2, 2, 2), ("data", "seq", M), devices)
    distribution = dist.ModelParallel(
        layout_map=keras_attn.layout_map(mesh3, original), batch_dim_name="data"
    )
    with distribution.scope():
        converted = keras_attn.convert(original)
    report["gpt2_specs"] = specs(converted)
    tokens = {
        "token_ids": rng.integers(0, GPT2["vocabulary_size"], size=(4, 8)).astype("int32"),
        "padding_mask": np.ones((4, 8), "int32"),
    }
    target = rng.normal(size=(4, 8, F)).astype("float32")
    with distribution.scope():
        report["gpt2_forward"] = difference([converted(tokens)], [original(tokens)])
        converted_step = train(converted, tokens, target)
    original_step = train(original, tokens, target)
    report["gpt2_loss"] = [converted_step[0], original_step[0]]
    report["gpt2_step"] = difference(converted_step[1], original_step[1])
    return report


@pytest.fixture(scope="module")
def distributed():
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution's ModelParallel is tested on JAX")
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",  # read when JAX starts
        JAX_PLATFORMS="cpu",
    )
    result = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_kernels_are_sharded_by_heads(distributed):
    for path, (spec, _) in {**distributed["specs"], **distributed["gpt2_specs"]}.items():
        expected = MEGATRON.get(last_two(path)) or (None,)  # no entry: replicated
        assert tuple(spec) + (None,) * (len(expected) - len(spec)) == expected or (
            set(spec) <= {None} and set(expected) == {None}
        ), (path, spec)
    assert distributed["specs"]["mha/query/kernel"][1] == [F, 1, 4]  # 4 heads on 4 devices
    assert distributed["specs"]["mha/gate/bias"][1] == [1, 4]
    assert distributed["specs"]["mha/attention_output/kernel"][1] == [1, 4, F]
    assert distributed["gpt2_specs"]["transformer_layer_1/self_attention/value/kernel"][1] == [
        F, 2, 4,
    ]  # fmt: skip


def test_forward_and_a_training_step_equal_one_device(distributed):
    assert distributed["forward"] < 2e-5
    assert distributed["gpt2_forward"] < 2e-5
    for key in ("loss", "gpt2_loss"):
        np.testing.assert_allclose(*distributed[key], rtol=2e-5)
    assert distributed["step"] < 2e-5
    assert distributed["gpt2_step"] < 2e-5


def test_compiled_program_gathers_nothing_and_reduces_once_after_the_output_projection(
    distributed,
):
    forward = distributed["forward_collectives"]
    # The partial outputs (B / data, T, E) of the 4 devices of a model group are summed.
    assert forward == [[f"f32[2,{T},{F}]{{2,1,0}}", "all-reduce"]]
    assert not [c for c in distributed["gradient_collectives"] if c[1] == "all-gather"]


if __name__ == "__main__":
    print(json.dumps(_distributed_report()))
