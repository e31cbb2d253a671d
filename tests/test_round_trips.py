"""Config round trips of every registered built-in, from one test over the registry.

Every built-in component and layer (each kind of `keras_attn.plugins.KINDS`) goes
through ``get_config`` -> JSON -> ``from_config``, through `plugins.serialize` ->
`plugins.resolve`, and (Keras objects) through Keras's own serialization, and comes
back with the same config and, given the same weights, the same numbers bit for bit.
`EXAMPLES` holds the configs; a built-in registered without an example fails
`test_every_builtin_has_an_example`, so a new one cannot be left out.
"""

import json

import keras
import numpy as np
import pytest
from keras import ops

from keras_attn import plugins
from keras_attn.positions import make_positions

# (kind, registered name) -> constructor configs, defaults first. Small shapes: the
# inputs below are shared by all, so JAX compiles each operation for few shapes.
EXAMPLES = {
    ("score", "dot"): [{}],
    ("score", "scaled_dot"): [{}, {"scale": 0.5}],
    ("score", "general"): [{}],
    ("score", "additive"): [{}, {"units": 5}],
    ("score", "cosine"): [{}, {"scale": 4.0, "trainable_scale": True, "epsilon": 1e-4}],
    ("score", "luong"): [{}, {"use_scale": True, "score_mode": "concat"}],
    ("score", "bahdanau"): [{}, {"use_scale": False}],
    ("score_mod", "softcap"): [{}, {"cap": 7.5}],
    ("score_mod", "relative_position"): [
        {"num_buckets": 8, "max_distance": 20, "num_heads": 2},
        {"num_buckets": 6, "max_distance": 10, "bidirectional": False, "num_heads": 2},
    ],
    ("pattern", "full"): [{}],
    ("pattern", "causal"): [{}],
    ("pattern", "local"): [{"window": 2}, {"window": 3, "causal": True}],
    ("pattern", "dilated"): [{"window": 2, "dilation": 3, "causal": True}],
    ("pattern", "strided"): [{"stride": 3}],
    ("pattern", "block_local"): [{"block_size": 4, "causal": True}],
    ("pattern", "global_tokens"): [{}, {"indices": [0, 4]}],
    ("pattern", "sink_tokens"): [{"num_tokens": 2, "causal": True}],
    ("pattern", "union"): [
        {"patterns": [{"name": "local", "config": {"window": 3}}, "global_tokens"]}
    ],
    ("pattern", "intersection"): [
        {"patterns": [{"name": "dilated", "config": {"window": 2, "dilation": 2}}, "causal"]}
    ],
    ("normalizer", "softmax"): [{}],
    ("normalizer", "hard"): [{}, {"gumbel": True, "temperature": 0.5, "seed": 3}],
    ("normalizer", "topk"): [{"k": 3}],
    ("normalizer", "sparsemax"): [{}],
    ("normalizer", "sink_softmax"): [{}, {"num_heads": 2, "sink_initializer": "ones"}],
    ("position_encoding", "rope"): [{}, {"max_wavelength": 100, "scaling_factor": 2.0}],
    ("layer", "attention"): [
        {
            "num_heads": 2,
            "score": "additive",
            "score_mods": ["softcap"],
            "pattern": {"name": "union", "config": {"patterns": ["causal", "global_tokens"]}},
            "normalizer": {"name": "topk", "config": {"k": 2}},
            "dropout": 0.1,
            "kernel_regularizer": "l2",
        },
        {
            "num_heads": 2,
            "key_dim": 4,
            "position_encoding": {"name": "rope", "config": {"max_wavelength": 100}},
            "max_segment_length": 64,
            "reset_positions": False,
        },
    ],
    ("layer", "soft"): [{"num_heads": 2, "score": "general", "key_dim": 3}],
    ("layer", "hard"): [{"num_heads": 2, "gumbel": True, "temperature": 0.5, "seed": 1}],
    ("layer", "global"): [{"num_heads": 2, "score": "cosine", "value_dim": 3}],
    ("layer", "local"): [{"window": 2, "causal": True, "num_heads": 2}],
    ("layer", "self"): [
        {
            "num_heads": 2,
            "score_mods": [
                {"name": "relative_position", "config": {"embeddings_initializer": "ones"}}
            ],
        }
    ],
    ("layer", "cross"): [{"num_heads": 2, "normalizer": "sparsemax", "output_shape": (5,)}],
    ("layer", "multi_head"): [
        {"num_heads": 2, "key_dim": 3, "use_gate": True, "sliding_window": 2}
    ],
    ("layer", "luong"): [{"use_scale": True, "score_mode": "concat"}],
    ("layer", "bahdanau"): [{"use_scale": True, "dropout": 0.1}],
    ("layer", "grouped_query"): [
        {"head_dim": 4, "num_query_heads": 4, "num_key_value_heads": 2, "use_gate": True}
    ],
}

# Layers called with a second input (the context), and Keras's classic layers, called
# with the list [query, value] of one feature size.
CROSS = {"cross", "multi_head", "grouped_query"}
CLASSIC = {"luong", "bahdanau"}

B, H, TQ, TK, D = 2, 2, 4, 5, 6


def _data(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _np(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


def _builtin_entries():
    return [e for e in plugins.entries() if e.plugin in plugins.BUILTIN_PLUGINS]


def _cases():
    return [
        pytest.param(kind, name, config, id=f"{kind}-{name}-{i}")
        for (kind, name), configs in EXAMPLES.items()
        for i, config in enumerate(configs)
    ]


def _run(kind, name, component):
    """The numbers of one component on fixed inputs, in numpy (training=False and True)."""
    if kind == "score":
        return [component(_data(B, H, TQ, D), _data(B, H, TK, D, seed=1))]
    if kind == "score_mod":
        positions = make_positions(TQ, TK, H, query_offset=3)
        return [component(_data(B, H, TQ, TK, seed=2) * 10, positions=positions)]
    if kind == "pattern":
        positions = make_positions(TQ + 4, TK + 6, 1, query_offset=5)
        return [component.mask(positions), component.block_mask(TQ + 4, TK + 6, 4, 5)]
    if kind == "normalizer":
        logits = _data(B, H, TQ, TK, seed=3)
        mask = np.random.default_rng(4).random((B, H, TQ, TK)) > 0.3
        return [component(logits, mask=mask, training=t) for t in (False, True)]
    if kind == "position_encoding":
        query, key = _data(B, H, TQ, D, seed=5), _data(B, H, TQ, D, seed=6)
        return list(component(query, key, positions=np.arange(TQ)[None, None] + 7))
    if name in CLASSIC:
        return [component([_data(B, TQ, D, seed=7), _data(B, TK, D, seed=8)])]
    inputs = [_data(B, TQ, 8, seed=7)]
    if name in CROSS:
        inputs.append(_data(B, TK, 6, seed=8))
    return [component(*inputs)]


def _numbers(kind, name, component):
    return [np.asarray(_np(x)) for x in _run(kind, name, component)]


def _randomize(component):
    """Random values in every float weight, so that equal numbers say something."""
    rng = np.random.default_rng(9)
    for weight in getattr(component, "weights", []):
        if "float" in keras.backend.standardize_dtype(weight.dtype):
            weight.assign(rng.normal(size=weight.shape).astype(weight.dtype))


def _copies(kind, component):
    """`component` brought back from its config in every way it can travel."""
    config = json.loads(json.dumps(component.get_config()))  # plain Python values
    copies = {"from_config": type(component).from_config(config)}
    spec = json.loads(json.dumps(plugins.serialize(component)))
    assert spec["name"] == plugins.registry_name(component)
    copies["plugins.resolve"] = plugins.resolve(kind, spec)
    if isinstance(component, keras.layers.Layer):
        serialized = keras.saving.serialize_keras_object(component)
        copies["keras"] = keras.saving.deserialize_keras_object(serialized)
    return copies


@pytest.mark.parametrize("kind,name,config", _cases())
def test_builtin_round_trips_with_the_same_config_and_numbers(kind, name, config):
    cls = plugins.get(kind, name)
    original = cls(**config)
    for key, value in config.items():
        # Numbers and flags come back as given (names become specs and serialized objects).
        if isinstance(value, (int, float, bool)):
            assert original.get_config()[key] == value, key
    _numbers(kind, name, original)  # builds the weights
    # Built: what the build settles (e.g. sink_softmax's num_heads) is in the config.
    expected_config = original.get_config()
    _randomize(original)
    expected = _numbers(kind, name, original)
    for how, copy in _copies(kind, original).items():
        assert type(copy) is cls, how
        assert copy.get_config() == expected_config, how
        if kind == "pattern":
            assert copy == original, how
        # Called once as the original was (builds the weights, draws Gumbel noise once).
        _numbers(kind, name, copy)
        if getattr(original, "weights", None):
            copy.set_weights(original.get_weights())
        for got, want in zip(_numbers(kind, name, copy), expected, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=how)


def test_every_builtin_has_an_example():
    registered = {(e.kind, e.name) for e in _builtin_entries()}
    assert registered == set(EXAMPLES), (
        f"Built-ins without an example: {sorted(registered - set(EXAMPLES))}; "
        f"examples of no built-in: {sorted(set(EXAMPLES) - registered)}"
    )
    assert {kind for kind, _ in EXAMPLES} == set(plugins.KINDS)
