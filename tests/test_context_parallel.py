"""Context parallelism (`keras_attn.context_parallel`): the sequence sharded over devices.

The multi-device checks run once, in a subprocess with 8 virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, JAX), which prints its
measurements as JSON (this file is the subprocess's script too: see ``_worker``);
the tests read them. The configuration and the clear errors on other backends run
in-process on every backend.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_attn
from keras_attn.context_parallel import ContextParallel

T, DIM, HEADS, KEY_DIM, DEVICES = 64, 16, 2, 8, 8


# -- every backend ------------------------------------------------------------------


def test_config_round_trips_and_validates():
    cp = ContextParallel("sp", "all_gather")
    assert ContextParallel.from_config(cp.get_config()) == cp
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cp)) == cp
    layer = keras_attn.Attention(num_heads=2, key_dim=4, context_parallel=cp)
    config = layer.get_config()
    assert config["context_parallel"] == {"axis": "sp", "strategy": "all_gather"}
    assert keras_attn.Attention.from_config(config).context_parallel == cp
    inputs = keras.Input((8, 4))
    model = keras.Model(inputs, keras.layers.MultiHeadAttention(2, 2)(inputs, inputs))
    converted = keras_attn.convert(model, context_parallel=cp)
    assert [getattr(layer, "context_parallel", None) for layer in converted.layers] == [None, cp]
    with pytest.raises(ValueError, match="strategy"):
        ContextParallel("seq", "zigzag")
    with pytest.raises(TypeError, match="context_parallel"):
        keras_attn.Attention(num_heads=2, key_dim=4, context_parallel="seq")


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="the JAX backend runs it")
def test_other_backends_raise_a_clear_error():
    layer = keras_attn.Attention(num_heads=2, key_dim=4, context_parallel=ContextParallel())
    x = np.zeros((1, 8, 4), "float32")
    with pytest.raises(RuntimeError, match="needs the JAX backend"):
        layer(x)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX only")
def test_without_a_distribution_the_layer_runs_on_one_device():
    x = np.random.default_rng(0).normal(size=(2, 16, DIM)).astype("float32")
    plain = keras_attn.Attention(num_heads=2, key_dim=4, pattern="causal")
    cp = keras_attn.Attention(num_heads=2, key_dim=4, pattern="causal", context_parallel={})
    plain(x), cp(x)
    cp.set_weights(plain.get_weights())
    np.testing.assert_allclose(np.asarray(cp(x)), np.asarray(plain(x)), atol=1e-6)
    assert cp.last_path != "context_parallel"


# -- 8 virtual devices (JAX, subprocess) ------------------------------------------


@pytest.fixture(scope="module")
def measured():
    # One subprocess for every multi-device check: JAX fixes the device count at start.
    if keras.backend.backend() != "jax":
        pytest.skip("context parallelism runs on the JAX backend")
    env = dict(
        os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=8"
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


FORWARD_CASES = [
    "causal_ring_padding_rope",
    "local_ring",
    "causal_local_ring_padding",
    "full_ring_gqa",
    "sink_softmax_ring_segments",
    "sparsemax_all_gather_padding_segments",
    "local_auto_weights",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_equals_one_device(measured, case):
    got = measured["forward"][case]
    assert got["path"] == "context_parallel"
    assert got["strategy"] == got["expected_strategy"]
    assert got["max_error"] < 2e-5, got


@pytest.mark.slow
def test_forward_equals_numpy(measured):
    assert measured["numpy_error"] < 2e-5


@pytest.mark.slow
def test_ring_skips_the_steps_a_window_leaves_empty(measured):
    # A window of 5 within shards of 8 reaches only the neighbouring shards.
    assert measured["forward"]["local_ring"]["ring_steps"] == [0, 1, DEVICES - 1]
    assert measured["forward"]["causal_ring_padding_rope"]["ring_steps"] == list(range(DEVICES))


@pytest.mark.slow
def test_a_training_step_equals_one_device(measured):
    step = measured["training_step"]
    assert step["path"] == "context_parallel"
    assert abs(step["loss"] - step["reference_loss"]) < 2e-5
    assert step["max_weight_error"] < 2e-5


@pytest.mark.slow
def test_ring_compiles_to_permutes_without_all_gather(measured):
    hlo = measured["hlo"]
    # Causal over 8 devices: 4 hops one way and 3 the other, of keys and of values.
    assert hlo["ring_causal"]["collective-permute"] >= DEVICES - 1
    assert hlo["ring_causal"]["all-gather"] == 0
    # A window that reaches the neighbours: one hop each way (keys, values).
    assert 2 <= hlo["ring_local"]["collective-permute"] <= 4
    assert hlo["ring_local"]["all-gather"] == 0
    assert hlo["all_gather_sparsemax"]["all-gather"] >= 1


@pytest.mark.slow
def test_errors_under_context_parallelism(measured):
    errors = measured["errors"]
    assert "KV cache" in errors["cache"]
    assert "multiples of 8" in errors["length"]
    assert "softmax or sink_softmax" in errors["ring_sparsemax"]
    assert "normalizer='sparsemax'" in errors["ring_sparsemax"]
    assert "not implemented yet" in errors["halo"]


# -- the subprocess ---------------------------------------------------------------


def _np_layer(x, weights, allowed):
    """The layer in numpy: projections, masked softmax attention, output projection."""
    from references import np_softmax_attention

    wq, bq, wk, bk, wv, bv, wo, bo = weights
    q = np.einsum("btd,dhk->bhtk", x, wq) + bq[None, :, None]
    k = np.einsum("btd,dhk->bhtk", x, wk) + bk[None, :, None]
    v = np.einsum("btd,dhk->bhtk", x, wv) + bv[None, :, None]
    out, _ = np_softmax_attention(q, k, v, allowed, 1.0 / np.sqrt(q.shape[-1]))
    return np.einsum("bhtk,hkd->btd", out, wo) + bo


def _worker():
    from keras_attn import patterns

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, DEVICES), ("batch", "seq"), devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, T, DIM)).astype("float32")
    padding = np.ones((2, T), bool)
    padding[1, 50:] = False
    # Packed documents, their boundaries inside shards and across them.
    segment_ids = np.repeat([[1, 2, 3], [1, 1, 2]], [21, 30, 13], axis=1).astype("int32")
    out = {"forward": {}, "hlo": {}, "errors": {}}

    def pair(strategy="auto", **kwargs):
        kwargs = dict(num_heads=HEADS, key_dim=KEY_DIM, **kwargs)
        reference = keras_attn.Attention(**kwargs)
        reference(x)
        with distribution.scope():  # its variables laid out on the mesh (replicated)
            sharded = keras_attn.Attention(
                context_parallel=ContextParallel("seq", strategy), **kwargs
            )
            sharded.build(x.shape)
        weights = [
            w + rng.normal(size=w.shape).astype("float32") * 0.1 for w in reference.get_weights()
        ]
        reference.set_weights(weights)
        sharded.set_weights(weights)
        return reference, sharded

    cases = {
        "causal_ring_padding_rope": (
            "ring",
            True,
            {"pattern": "causal", "position_encoding": "rope"},
        ),
        "local_ring": ("ring", False, {"pattern": patterns.Local(5)}),
        "causal_local_ring_padding": ("auto", True, {"pattern": patterns.Local(5, causal=True)}),
        "full_ring_gqa": ("auto", False, {"num_key_value_heads": 1}),
        "sink_softmax_ring_segments": (
            "auto",
            False,
            {"pattern": "causal", "normalizer": "sink_softmax"},
        ),
        "sparsemax_all_gather_padding_segments": (
            "auto",
            True,
            {"pattern": "causal", "normalizer": "sparsemax"},
        ),
        "local_auto_weights": ("auto", False, {"pattern": patterns.Local(5)}),
    }
    for name, (strategy, padded, kwargs) in cases.items():
        reference, sharded = pair(strategy, **kwargs)
        call = {"query_mask": padding, "value_mask": padding} if padded else {}
        if name.endswith("segments"):
            call["segment_ids"] = segment_ids
        scores = name.endswith("weights")
        expected = reference(x, return_attention_scores=scores, **call)
        with distribution.scope():
            got = sharded(x, return_attention_scores=scores, **call)
        error = max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(keras.tree.flatten(expected), keras.tree.flatten(got), strict=True)
        )
        plan = sharded.last_plan
        out["forward"][name] = {
            "max_error": error,
            "path": sharded.last_path,
            "strategy": plan.strategy,
            "expected_strategy": "all_gather" if "sparsemax" in name or scores else "ring",
            "ring_steps": None if plan.ring_steps is None else list(plan.ring_steps),
        }
        print(name, out["forward"][name], file=sys.stderr)
        if name == "causal_local_ring_padding":
            allowed = np.tril(np.ones((T, T), bool)) & ~np.tril(np.ones((T, T), bool), -5)
            allowed = allowed[None, None] & padding[:, None, :, None] & padding[:, None, None, :]
            numpy = _np_layer(x, reference.get_weights(), allowed)
            out["numpy_error"] = float(np.abs(numpy - np.asarray(got)).max())

    # One training step, with rope and padding: loss and updated weights.
    def model_of(layer):
        inputs = keras.Input((T, DIM))
        model = keras.Model(inputs, layer(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        return model

    target = rng.normal(size=(2, T, DIM)).astype("float32")
    kwargs = {"pattern": "causal", "position_encoding": "rope"}
    reference, sharded = pair("ring", **kwargs)
    reference_model = model_of(reference)
    reference_loss = float(reference_model.train_on_batch(x, target))
    with distribution.scope():
        sharded_model = model_of(sharded)
        loss = float(sharded_model.train_on_batch(x, target))
    out["training_step"] = {
        "path": sharded.last_path,
        "loss": loss,
        "reference_loss": reference_loss,
        "max_weight_error": max(
            float(np.abs(a - b).max())
            for a, b in zip(reference.get_weights(), sharded.get_weights(), strict=True)
        ),
    }

    import jax

    def collectives(layer):
        with distribution.scope():
            text = jax.jit(lambda x: layer(x)).lower(x).compile().as_text()
        return {op: text.count(f" {op}(") + text.count(f" {op}-start(") for op in
                ("collective-permute", "all-gather")}  # fmt: skip

    out["hlo"]["ring_causal"] = collectives(pair("ring", pattern="causal")[1])
    out["hlo"]["ring_local"] = collectives(pair("ring", pattern=patterns.Local(5))[1])
    out["hlo"]["all_gather_sparsemax"] = collectives(
        pair("auto", pattern="causal", normalizer="sparsemax")[1]
    )

    def error_of(function):
        try:
            with distribution.scope():
                function()
        except Exception as error:  # noqa: BLE001 - the message is what is tested
            return f"{type(error).__name__}: {error}"
        return "no error"

    sharded = pair("ring", pattern="causal")[1]
    cache = np.zeros((2, 2, T, HEADS, KEY_DIM), "float32")
    out["errors"]["cache"] = error_of(lambda: sharded(x[:, :1], cache=cache, cache_update_index=0))
    out["errors"]["length"] = error_of(lambda: sharded(x[:, :60]))
    ring_sparsemax = pair("ring", normalizer="sparsemax")[1]
    out["errors"]["ring_sparsemax"] = error_of(lambda: ring_sparsemax(x))
    halo = pair("halo", pattern=patterns.Local(5))[1]
    out["errors"]["halo"] = error_of(lambda: halo(x))
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    _worker()
