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
import time

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
    assert config["context_parallel"] == {
        "axis": "sp",
        "strategy": "all_gather",
        "heads_axis": "model",
    }
    assert keras_attn.Attention.from_config(config).context_parallel == cp
    # A config saved before `heads_axis` existed loads with its default.
    assert ContextParallel.get({"axis": "sp", "strategy": "all_gather"}) == cp
    replicated = ContextParallel("sp", heads_axis=None)
    assert ContextParallel.from_config(replicated.get_config()) == replicated
    inputs = keras.Input((8, 4))
    model = keras.Model(inputs, keras.layers.MultiHeadAttention(2, 2)(inputs, inputs))
    converted = keras_attn.convert(model, context_parallel=cp)
    assert [getattr(layer, "context_parallel", None) for layer in converted.layers] == [None, cp]
    with pytest.raises(ValueError, match="strategy"):
        ContextParallel("seq", "zigzag")
    with pytest.raises(ValueError, match="heads_axis='seq'"):
        ContextParallel("seq", heads_axis="seq")
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
    # XLA's CPU backend at optimization level 0, as `make test-jax` runs: compiling
    # dominates and the programs are small (it does not change which collectives run).
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS=flags)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


FORWARD_CASES = [
    "causal_ring_padding_rope",
    "local_ring",
    "causal_local_auto_padding",
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
    assert "softmax or sink_softmax" in errors["ring_sparsemax"]
    assert "normalizer='sparsemax'" in errors["ring_sparsemax"]
    assert "strategy='halo'" in errors["halo_causal"]
    assert "is not banded" in errors["halo_causal"]
    assert "more than one shard of 8 keys" in errors["halo_wide"]
    assert "attention scores" in errors["halo_weights"]


EXACT_CASES = {
    # name: the strategy it must take
    "ring_causal_rope_padding_t61_p8": "ring",
    "ring_causal_t6_p8": "ring",
    "ring_causal_gqa_segments_key_padding_p4": "ring",
    "all_gather_sparsemax_segments_t61_p8": "all_gather",
    "halo_causal_local_rope_p2": "halo",
    "halo_local_padding_t61_p4": "halo",
    "halo_local_segments_key_padding_p8": "halo",
    "halo_causal_local_segments_padding_t59_p8": "halo",
    "halo_dilated_gqa_p8": "halo",
    "halo_sparsemax_local_p4": "halo",
    "ring_causal_sink_softmax_segments_p8": "ring",
    "ring_full_softcap_padding_p4": "ring",
    "ring_causal_relative_position_p4": "ring",
    # Query tiles of 3 rows (chunks of 8 padded to 9): each step runs tile by tile.
    "ring_tiled_causal_sink_softmax_segments_padding_p4": "ring",
    "ring_tiled_full_keys_attention_mask_gqa_p2": "ring",
    # Not banded (global tokens reach everywhere): the ring, with its skipped steps.
    "ring_local_global_tokens_padding_p4": "ring",
    # A third-party pattern (the bigbird plugin's window, global and random blocks).
    "ring_plugin_bigbird_p4": "ring",
}
# How each ring's backward pass ran: recomputing each step's weights, or JAX's autodiff
# of the ring where a score_mod (or the score) has weights.
RING_BACKWARD = {
    "ring_causal_rope_padding_t61_p8": "recompute",
    "ring_causal_t6_p8": "recompute",
    "ring_causal_gqa_segments_key_padding_p4": "recompute",
    "ring_causal_sink_softmax_segments_p8": "recompute",
    "ring_full_softcap_padding_p4": "recompute",
    "ring_causal_relative_position_p4": "autodiff",
    "ring_tiled_causal_sink_softmax_segments_padding_p4": "recompute",
    "ring_tiled_full_keys_attention_mask_gqa_p2": "recompute",
    "ring_local_global_tokens_padding_p4": "recompute",
    "ring_plugin_bigbird_p4": "recompute",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_outputs_and_gradients_equal_one_device(measured, case):
    # T not a multiple of P (61, 59, 6 < 8) is padded inside the run; P = 2, 4, 8.
    got = measured["exact"][case]
    assert got["strategy"] == EXACT_CASES[case]
    assert got["output_error"] < 2e-5, got
    assert got["gradient_error"] < 2e-5, got
    assert got["gradient_scale"] > 1e-3, got  # every gradient is really compared
    assert got["ring_backward"] == RING_BACKWARD.get(case), got
    if "tiled" in case:  # the queries of each step really ran in tiles
        assert got["ring_tile"] == 3 and got["query_chunk"] > 3, got
    elif got["ring_tile"] is not None:  # short chunks are one tile; autodiff: no tiles
        assert got["ring_tile"] == got["query_chunk"], got


@pytest.mark.slow
def test_ring_backward_recomputes_in_a_fraction_of_the_memory(measured):
    # A causal training step at T = 4096 over 8 devices: the recomputing backward keeps
    # no step's (n x n) weights, so a device's temporary memory is a few blocks' worth,
    # against every step's under JAX's autodiff of the ring and the whole (n x T) rows
    # of GSPMD's default (the sequence sharded, keras_attn without context parallelism).
    memory = measured["ring_memory"]
    assert memory["ring_backward"] == ["recompute", "autodiff"]
    assert memory["recompute"] <= memory["autodiff"] / 4, memory
    assert memory["recompute"] <= memory["gspmd"] / 4, memory
    # Query tiles of 64 rows instead of whole chunks of 256: a step's logits and their
    # gradients are (64, key chunk), and the step takes well under half the memory.
    assert memory["tiled"] <= memory["recompute"] / 2, memory


@pytest.mark.slow
def test_ring_at_32768_takes_a_fraction_of_the_gspmd_default(measured):
    # The bound: a causal training step at T = 32768 over 8 devices takes at
    # most 1/4 of the temporary memory of GSPMD's default (the sequence sharded,
    # keras_attn without context parallelism), per device.
    memory = measured["ring_memory"]
    assert memory["ring_32768"] <= memory["gspmd_32768"] / 4, memory


HEADS_AND_SEQUENCE = {
    # name: the strategy, and the mesh axis the heads are sharded over inside the run
    "ring_causal_sink_softmax_segments_gqa": ("ring", "model"),
    "halo_local_padding": ("halo", "model"),
    "ring_causal_heads_replicated": ("ring", None),
    "ring_causal_relative_position": ("ring", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(HEADS_AND_SEQUENCE))
def test_heads_and_sequence_sharded_together(measured, case):
    # A (batch 2, seq 2, model 2) mesh, the layer laid out by keras_attn.layout_map (its
    # heads over "model"): a training step equals one device's, and where the core keeps
    # the heads sharded (a built-in softmax, sink_softmax on the ring) the compiled step
    # gathers no heads; replicated (heads_axis=None, or a per-head score_mod), the heads
    # are gathered around the core.
    got = measured["heads_and_sequence"][case]
    assert (got["strategy"], got["heads_axis"]) == HEADS_AND_SEQUENCE[case], got
    assert got["output_error"] < 2e-5, got
    assert got["gradient_error"] < 2e-5, got
    assert got["kernel_spec"] == [None, "model", None], got  # the layout_map is in force
    if got["heads_axis"] is None:
        assert got["head_gathers"] >= 1, got
    else:
        assert got["all-gather"] == 0, got


@pytest.mark.slow
def test_causal_ring_balances_the_work_across_devices(measured):
    # Zig-zag: device d holds chunks d and 2P - 1 - d of 2P (T = 64, P = 8: chunks of
    # 4), so each computes 2P + 1 = 17 blocks of 4 x 4 (query, key) pairs; laid out
    # contiguously the last device would compute all 8 blocks of 8 x 8 = 512 pairs
    # and the first one block.
    causal = measured["forward"]["causal_ring_padding_rope"]
    assert causal["balance"] is True
    assert causal["work"] == [17 * 16] * DEVICES
    # A window or a full pattern is balanced as it is: it stays contiguous.
    assert measured["forward"]["local_ring"]["balance"] is False
    assert measured["forward"]["full_ring_gqa"]["balance"] is False
    assert measured["forward"]["full_ring_gqa"]["work"] == [T * T // DEVICES] * DEVICES
    # The exact cases of causal rings (outputs and gradients) ran zig-zag.
    for case in (
        "ring_causal_rope_padding_t61_p8",
        "ring_causal_gqa_segments_key_padding_p4",
        "ring_causal_t6_p8",
    ):
        assert measured["exact"][case]["balance"] is True, case


@pytest.mark.slow
def test_halo_reaches_only_the_window(measured):
    exact = measured["exact"]
    assert exact["halo_causal_local_rope_p2"]["halo"] == [6, 0]
    assert exact["halo_local_segments_key_padding_p8"]["halo"] == [4, 4]
    assert exact["halo_dilated_gqa_p8"]["halo"] == [5, 0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, sides", [("causal_padding_segments", 1), ("local", 2), ("local_padding_segments", 2)]
)
def test_halo_compiles_to_window_sized_permutes(measured, case, sides):
    # Local(5): each side sends window - 1 = 4 positions, keys and values in one
    # permute, padding and segment ids in a second; nothing is gathered.
    hlo = measured["hlo_halo"][case]
    assert hlo["strategy"] == "halo"
    assert hlo["all-gather"] == 0
    shapes = hlo["permute_shapes"]
    assert sides <= len(shapes) <= 2 * sides, shapes
    assert all(shape[1] == 4 for shape in shapes), shapes
    if "segments" in case:
        assert len(shapes) == 2 * sides, shapes


@pytest.mark.slow
def test_halo_attends_on_the_block_sparse_path(measured):
    # Local(16, causal) over 2 shards of 1024: per device, the blocks of the band only.
    engine = measured["halo_engine"]
    assert engine["local_path"] == "block_sparse"
    assert engine["temp_bytes"] < engine["dense_logits_bytes"] / 4, engine


@pytest.mark.parametrize(
    "pattern, expected",
    [
        (keras_attn.patterns.Local(5), (4, 4)),
        (keras_attn.patterns.Local(5, causal=True), (4, 0)),
        (keras_attn.patterns.Dilated(3, 2), (5, 5)),
        (keras_attn.patterns.BlockLocal(4, causal=True), (3, 0)),
        (keras_attn.patterns.Causal() & keras_attn.patterns.Local(4), (3, 0)),
        (keras_attn.patterns.Local(3) | keras_attn.patterns.Local(6, causal=True), (5, 2)),
        (keras_attn.patterns.Local(3) | keras_attn.patterns.GlobalTokens(1), None),
        (keras_attn.patterns.Causal(), None),
        (keras_attn.patterns.Full(), None),
    ],
)
def test_pattern_reach(pattern, expected):
    assert keras_attn.patterns.reach(pattern) == expected


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
        "causal_local_auto_padding": ("auto", True, {"pattern": patterns.Local(5, causal=True)}),
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
            "expected_strategy": (
                "all_gather"
                if "sparsemax" in name or scores
                else "halo"
                if "auto" in name
                else "ring"
            ),  # fmt: skip
            "ring_steps": None if plan.ring_steps is None else list(plan.ring_steps),
            "balance": plan.balance,
            "work": None if plan.work is None else list(plan.work),
        }
        print(name, out["forward"][name], file=sys.stderr)
        if name == "causal_local_auto_padding":
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
    ring_sparsemax = pair("ring", normalizer="sparsemax")[1]
    out["errors"]["ring_sparsemax"] = error_of(lambda: ring_sparsemax(x))
    halo_causal = pair("halo", pattern="causal")[1]
    out["errors"]["halo_causal"] = error_of(lambda: halo_causal(x))
    halo_wide = pair("halo", pattern=patterns.Local(T // DEVICES + 2))[1]
    out["errors"]["halo_wide"] = error_of(lambda: halo_wide(x))
    out["errors"]["halo_weights"] = error_of(
        lambda: pair("halo", pattern=patterns.Local(5))[1](x, return_attention_scores=True)
    )
    _exact_with_gradients(out, devices, rng)
    print(json.dumps(out))


def _exact_with_gradients(out, devices, rng):
    """Outputs and gradients (inputs and weights) against one device; halo collectives."""
    import jax
    import jax.numpy as jnp
    from keras_attn_bigbird.patterns import BigBird  # a plugin's pattern (make test installs it)

    from keras_attn import patterns

    def distribution_of(num_shards):
        mesh = keras.distribution.DeviceMesh(
            (1, num_shards), ("batch", "seq"), devices[:num_shards]
        )
        return keras.distribution.ModelParallel(
            layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
        )

    def build(strategy, length, **kwargs):
        kwargs = dict(num_heads=HEADS, key_dim=KEY_DIM, **kwargs)
        reference = keras_attn.Attention(**kwargs)
        reference.build((2, length, DIM))
        sharded = keras_attn.Attention(context_parallel=ContextParallel("seq", strategy), **kwargs)
        sharded.build((2, length, DIM))
        weights = [
            w + rng.normal(size=w.shape).astype("float32") * 0.1 for w in reference.get_weights()
        ]
        reference.set_weights(weights)
        sharded.set_weights(weights)
        return reference, sharded

    def value_and_grads(layer, x, target, call):
        trainable = [v.value for v in layer.trainable_variables]
        other = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, x):
            y, _ = layer.stateless_call(trainable, other, x, **call)
            return jnp.sum(y * target) / (x.shape[0] * x.shape[1]), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(trainable, x)
        return [np.asarray(a) for a in [y, *keras.tree.flatten(grads)]]

    # name: (devices, length, strategy, call extras, layer kwargs)
    cases = {
        "ring_causal_rope_padding_t61_p8": (8, 61, "ring", "padding", {"pattern": "causal", "position_encoding": "rope"}),
        "ring_causal_t6_p8": (8, 6, "ring", "", {"pattern": "causal"}),
        "ring_causal_gqa_segments_key_padding_p4": (4, 40, "ring", "segments keys", {"pattern": "causal", "num_key_value_heads": 1}),
        "all_gather_sparsemax_segments_t61_p8": (8, 61, "all_gather", "segments", {"pattern": "causal", "normalizer": "sparsemax"}),
        "halo_causal_local_rope_p2": (2, 64, "auto", "", {"pattern": patterns.Local(7, causal=True), "position_encoding": "rope"}),
        "halo_local_padding_t61_p4": (4, 61, "auto", "padding", {"pattern": patterns.Local(5)}),
        "halo_local_segments_key_padding_p8": (8, 64, "halo", "segments keys", {"pattern": patterns.Local(5)}),
        "halo_causal_local_segments_padding_t59_p8": (8, 59, "halo", "segments padding", {"pattern": patterns.Local(8, causal=True), "position_encoding": "rope"}),
        "halo_dilated_gqa_p8": (8, 64, "auto", "", {"pattern": patterns.Dilated(3, 2, causal=True), "num_key_value_heads": 1}),
        "halo_sparsemax_local_p4": (4, 64, "halo", "", {"pattern": patterns.Local(4), "normalizer": "sparsemax"}),
        "ring_causal_sink_softmax_segments_p8": (8, 64, "ring", "segments", {"pattern": "causal", "normalizer": "sink_softmax"}),
        "ring_full_softcap_padding_p4": (4, 40, "ring", "padding", {"score_mods": ["softcap"]}),
        "ring_causal_relative_position_p4": (4, 40, "ring", "", {"pattern": "causal", "score_mods": ["relative_position"]}),
        "ring_tiled_causal_sink_softmax_segments_padding_p4": (4, 64, "ring", "tile segments padding", {"pattern": "causal", "normalizer": "sink_softmax"}),
        "ring_tiled_full_keys_attention_mask_gqa_p2": (2, 50, "ring", "tile keys mask", {"num_key_value_heads": 1}),
        "ring_local_global_tokens_padding_p4": (4, 40, "auto", "padding", {"pattern": patterns.Local(5) | patterns.GlobalTokens(2)}),
        "ring_plugin_bigbird_p4": (4, 64, "auto", "", {"pattern": BigBird(block_size=8, num_window_blocks=1, num_global_blocks=1, num_random_blocks=1, seed=3)}),
    }  # fmt: skip
    from keras_attn import context_parallel as context_parallel_module

    out["exact"] = {}
    start = time.perf_counter()
    for name, (num_shards, length, strategy, extras, kwargs) in cases.items():
        distribution = distribution_of(num_shards)
        x = rng.normal(size=(2, length, DIM)).astype("float32")
        target = rng.normal(size=(2, length, DIM)).astype("float32")
        call = {}
        if "padding" in extras:
            padding = np.ones((2, length), bool)
            padding[1, length - 13 :] = False
            call.update(query_mask=padding, value_mask=padding)
        if "keys" in extras:  # a key padding mask: it travels with the keys
            call["value_mask"] = np.arange(length) < np.array([[length], [length - 9]])
        if "segments" in extras:
            cut = [length // 3, length // 3 + 11]
            call["segment_ids"] = np.stack(
                [np.searchsorted(cut, np.arange(length), side="right"), np.arange(length) // 20]
            ).astype("int32")
        if "mask" in extras:  # a mask with both axes: each device slices its keys' part
            call["attention_mask"] = rng.random((2, length, length)) > 0.3
        reference, sharded = build(strategy, length, **kwargs)
        expected = value_and_grads(reference, x, target, call)
        context_parallel_module._RING_TILE = 3 if "tile" in extras else 512
        try:
            with distribution.scope():
                got = value_and_grads(sharded, x, target, call)
        finally:
            context_parallel_module._RING_TILE = 512
        plan = sharded.last_plan
        chunk = -(-length // (num_shards * (2 if plan.balance else 1)))
        out["exact"][name] = {
            "output_error": float(np.abs(expected[0] - got[0]).max()),
            "gradient_error": max(float(np.abs(a - b).max()) for a, b in zip(expected[1:], got[1:], strict=True)),
            "gradient_scale": float(np.abs(expected[-1]).max()),  # of the inputs
            "strategy": sharded.last_plan.strategy,
            "halo": sharded.last_plan.halo,
            "balance": sharded.last_plan.balance,
            "ring_backward": sharded.last_plan.ring_backward,
            "ring_tile": plan.ring_tile,
            "query_chunk": chunk,  # before the padding to whole tiles
        }  # fmt: skip
        print(name, out["exact"][name], f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

    def collectives(num_shards, extras, **kwargs):
        """The compiled forward's collective-permutes (their shapes) and all-gathers."""
        distribution = distribution_of(num_shards)
        length = 64
        _, sharded = build("auto", length, **kwargs)
        x = rng.normal(size=(2, length, DIM)).astype("float32")
        call = {}
        if "padding" in extras:
            call["value_mask"] = np.arange(length) < np.array([[length], [50]])
        if "segments" in extras:
            call["segment_ids"] = (np.arange(length)[None] // 24 + np.zeros((2, 1), int)).astype(
                "int32"
            )
        with distribution.scope():
            text = jax.jit(lambda x: sharded(x, **call)).lower(x).compile().as_text()
        permutes = [
            [int(d) for d in line.split("[", 1)[1].split("]", 1)[0].split(",") if d]
            for line in text.splitlines()
            if " collective-permute(" in line or " collective-permute-start(" in line
        ]
        gathers = text.count(" all-gather(") + text.count(" all-gather-start(")
        return {
            "permute_shapes": permutes,
            "all-gather": gathers,
            "strategy": sharded.last_plan.strategy,
        }

    out["hlo_halo"] = {
        "causal_padding_segments": collectives(8, "padding segments", pattern=patterns.Local(5, causal=True)),
        "local": collectives(4, "", pattern=patterns.Local(5)),
        "local_padding_segments": collectives(8, "padding segments", pattern=patterns.Local(5)),
    }  # fmt: skip

    # A window of 16 over shards of 1024 tokens: each device's attention runs on the
    # engine's block-sparse path over its band, so its temporary memory stays far
    # below the dense logits of its shard against its keys, (B, H, n, n + halo).
    length, window, num_shards = 2048, 16, 2
    _, sharded = build("halo", length, pattern=patterns.Local(window, causal=True), block_size=32)
    x = rng.normal(size=(2, length, DIM)).astype("float32")
    with distribution_of(num_shards).scope():
        compiled = jax.jit(lambda x: sharded(x)).lower(x).compile()
    n = length // num_shards
    out["halo_engine"] = {
        "local_path": getattr(sharded.last_plan.local, "path", None),
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "dense_logits_bytes": 2 * HEADS * n * (n + window - 1) * 4,
    }
    out["ring_memory"] = _ring_memory(devices)
    out["heads_and_sequence"] = _heads_and_sequence(devices, rng)


def _heads_and_sequence(devices, rng):
    """Training steps on a (batch, seq, model) mesh under keras_attn.layout_map."""
    import jax
    import jax.numpy as jnp

    from keras_attn import patterns

    length, heads = 40, 4
    mesh = keras.distribution.DeviceMesh((2, 2, 2), ("batch", "seq", "model"), devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_attn.layout_map(mesh), batch_dim_name="batch"
    )

    def step(layer, x, target, call):
        """The output and the gradients of a loss, and the compiled program's text."""
        trainable = [v.value for v in layer.trainable_variables]
        other = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, x):
            y, _ = layer.stateless_call(trainable, other, x, **call)
            return jnp.sum(y * target) / (x.shape[0] * x.shape[1]), y

        compiled = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
        compiled = compiled.lower(trainable, x).compile()
        (_, y), grads = compiled(trainable, x)
        return [np.asarray(a) for a in [y, *keras.tree.flatten(grads)]], compiled.as_text()

    cases = {
        "ring_causal_sink_softmax_segments_gqa": ("ring", "model", "segments", {"pattern": "causal", "normalizer": "sink_softmax", "num_key_value_heads": 2}),
        "halo_local_padding": ("auto", "model", "padding", {"pattern": patterns.Local(5, causal=True)}),
        "ring_causal_heads_replicated": ("ring", None, "", {"pattern": "causal"}),
        "ring_causal_relative_position": ("ring", "model", "", {"pattern": "causal", "score_mods": ["relative_position"]}),
    }  # fmt: skip
    result = {}
    for name, (strategy, heads_axis, extras, kwargs) in cases.items():
        kwargs = dict(num_heads=heads, key_dim=KEY_DIM, **kwargs)
        reference = keras_attn.Attention(**kwargs)
        reference.build((2, length, DIM))
        with distribution.scope():  # its variables laid out by the layout_map
            sharded = keras_attn.Attention(
                context_parallel=ContextParallel("seq", strategy, heads_axis), **kwargs
            )
            sharded.build((2, length, DIM))
        weights = [
            w + rng.normal(size=w.shape).astype("float32") * 0.1 for w in reference.get_weights()
        ]
        reference.set_weights(weights)
        sharded.set_weights(weights)
        x = rng.normal(size=(2, length, DIM)).astype("float32")
        target = rng.normal(size=(2, length, DIM)).astype("float32")
        call = {}
        if "padding" in extras:
            padding = np.ones((2, length), bool)
            padding[1, length - 13 :] = False
            call.update(query_mask=padding, value_mask=padding)
        if "segments" in extras:
            call["segment_ids"] = (np.arange(length)[None] // 15 + np.zeros((2, 1), int)).astype(
                "int32"
            )
        expected, _ = step(reference, x, target, call)
        with distribution.scope():
            got, text = step(sharded, x, target, call)
        gathers = [
            line
            for line in text.splitlines()
            if " all-gather(" in line or " all-gather-start(" in line
        ]
        # An all-gather of (B, T, H, D) heads: a rank-4 result.
        head_gathers = [g for g in gathers if g.split("[", 1)[1].split("]", 1)[0].count(",") == 3]
        result[name] = {
            "strategy": sharded.last_plan.strategy,
            "heads_axis": sharded.last_plan.heads_axis,
            "output_error": float(np.abs(expected[0] - got[0]).max()),
            "gradient_error": max(
                float(np.abs(a - b).max()) for a, b in zip(expected[1:], got[1:], strict=True)
            ),
            "all-gather": len(gathers),
            "head_gathers": len(head_gathers),
            "kernel_spec": list(sharded.query_dense.kernel.value.sharding.spec),
        }
        print(name, result[name], file=sys.stderr)
    return result


def _ring_memory(devices):
    """Temporary memory of a causal training step over 8 devices, per device: at T = 4096
    (the ring's variants) and at T = 32768 (the ring and GSPMD's default)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    from keras_attn import context_parallel as context_parallel_module

    heads, key_dim = 2, 16
    mesh = keras.distribution.DeviceMesh((1, DEVICES), ("batch", "seq"), devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
    )

    def temp_bytes(context, autodiff=False, tile=512, length=4096):
        layer = keras_attn.Attention(
            num_heads=heads, key_dim=key_dim, pattern="causal", context_parallel=context
        )
        layer.build((1, length, heads * key_dim))
        trainable = [v.value for v in layer.trainable_variables]

        def loss(trainable, x):
            y, _ = layer.stateless_call(trainable, [], x)
            return (y**2).mean()

        def spec(shape, *axes):
            return jax.ShapeDtypeStruct(
                shape, "float32", sharding=NamedSharding(mesh.backend_mesh, PartitionSpec(*axes))
            )

        x = spec((1, length, heads * key_dim), None, "seq", None)
        context_parallel_module._AUTODIFF_RING = autodiff  # the ring as JAX differentiates it
        context_parallel_module._RING_TILE = tile
        try:
            with distribution.scope():
                step = jax.jit(jax.value_and_grad(loss, (0, 1)))
                compiled = step.lower([spec(w.shape) for w in trainable], x).compile()
        finally:
            context_parallel_module._AUTODIFF_RING = False
            context_parallel_module._RING_TILE = 512
        return compiled.memory_analysis().temp_size_in_bytes, layer.last_plan

    ring = ContextParallel("seq", "ring")
    recompute, recompute_plan = temp_bytes(ring)
    autodiff, autodiff_plan = temp_bytes(ring, autodiff=True)
    gspmd, _ = temp_bytes(None)
    tiled, tiled_plan = temp_bytes(ring, tile=64)
    assert (recompute_plan.ring_tile, tiled_plan.ring_tile) == (256, 64)
    long_ring, _ = temp_bytes(ring, length=32768)
    long_gspmd, _ = temp_bytes(None, length=32768)
    return {
        "ring_32768": long_ring,
        "gspmd_32768": long_gspmd,
        "recompute": recompute,
        "tiled": tiled,
        "autodiff": autodiff,
        "gspmd": gspmd,
        "ring_backward": [recompute_plan.ring_backward, autodiff_plan.ring_backward],
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    _worker()
