"""Position encodings: rope against numpy and KerasHub, and applied by the layer on every path."""

import json
import os

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn import plugins
from keras_attn import testing
from keras_attn.position_encodings import Rope
from tests.decoding import assert_decodes_like_one_pass


def _np(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")))


def ref_rope(x, positions, max_wavelength=10000.0, scaling_factor=1.0):
    """Rotary embedding in numpy, float64: halves (x1, x2) rotated pair by pair."""
    x = np.asarray(x, "float64")
    depth = x.shape[-1]
    inverse = max_wavelength ** (-np.arange(0, depth, 2) / depth) / scaling_factor
    angles = np.asarray(positions, "float64")[..., None] * inverse  # (..., T, D / 2)
    x1, x2 = x[..., : depth // 2], x[..., depth // 2 :]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _heads(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# -- the rope component ----------------------------------------------------------------


@pytest.mark.parametrize("max_wavelength,scaling_factor", [(10000, 1.0), (500, 4.0)])
def test_rope_matches_numpy(max_wavelength, scaling_factor):
    q, k = _heads((2, 3, 7, 8)), _heads((2, 3, 7, 8), 1)
    positions = np.array([[[3, 4, 5, 9, 10, 517, 1000]]], "int32")  # (1, 1, T)
    rope = Rope(max_wavelength=max_wavelength, scaling_factor=scaling_factor)
    out_q, out_k = rope(q, k, positions)
    np.testing.assert_allclose(
        _np(out_q), ref_rope(q, positions, max_wavelength, scaling_factor), atol=2e-5
    )
    np.testing.assert_allclose(
        _np(out_k), ref_rope(k, positions, max_wavelength, scaling_factor), atol=2e-5
    )


@pytest.mark.parametrize("max_wavelength,scaling_factor", [(10000, 1.0), (500, 4.0)])
def test_rope_matches_keras_hub(max_wavelength, scaling_factor):
    keras_hub = pytest.importorskip("keras_hub")
    x = _heads((2, 9, 3, 8))  # (B, T, H, D), KerasHub's layout
    theirs = keras_hub.layers.RotaryEmbedding(
        max_wavelength=max_wavelength, scaling_factor=scaling_factor
    )
    rope = Rope(max_wavelength=max_wavelength, scaling_factor=scaling_factor)
    heads = np.transpose(x, (0, 2, 1, 3))  # (B, H, T, D)
    for start in (0, 517):
        expected = _np(theirs(x, start_index=start))
        positions = np.arange(start, start + 9, dtype="int32")[None, None, :]
        ours = _np(rope(heads, heads, positions)[0])
        np.testing.assert_allclose(np.transpose(ours, (0, 2, 1, 3)), expected, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    shift=st.integers(-300, 3000),
    positions=st.lists(st.integers(0, 2000), min_size=2, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_rope_is_relative(shift, positions, seed):
    # q_i · k_j after rotation depends on i - j only: shifting every position by the
    # same amount leaves the logits unchanged.
    positions = np.array(positions, "int32")
    q, k = _heads((2, len(positions), 8), seed), _heads((2, len(positions), 8), seed + 1)
    rope = Rope()

    def logits(p):
        rq, rk = rope(q, k, p[None, :])
        return np.einsum("hqd,hkd->hqk", _np(rq), _np(rk))

    np.testing.assert_allclose(
        logits(positions + max(shift, -int(positions.min()))), logits(positions), atol=2e-3
    )


def test_rope_keeps_dtype_and_computes_in_float32():
    q = _heads((1, 2, 4, 8))
    positions = np.array([[[1000, 2000, 3000, 4000]]], "int32")
    rope = Rope(dtype="mixed_bfloat16")  # as in a layer under that policy
    out_q, _ = rope(ops.cast(q, "bfloat16"), ops.cast(q, "bfloat16"), positions)
    assert keras.backend.standardize_dtype(out_q.dtype) == "bfloat16"
    expected = ref_rope(_np(ops.cast(q, "bfloat16")), positions)
    np.testing.assert_allclose(_np(out_q), expected, atol=3e-2)


def test_rope_odd_head_dim_is_a_clear_error():
    with pytest.raises(ValueError, match=r"even.*Received: head_dim=5"):
        Rope()(_heads((1, 3, 5)), _heads((1, 3, 5)), np.arange(3)[None])
    layer = keras_attn.Attention(num_heads=2, key_dim=5, position_encoding="rope")
    with pytest.raises(ValueError, match=r"even.*Received: head_dim=5"):
        layer(_heads((1, 4, 8)))


def test_rope_argument_errors():
    with pytest.raises(ValueError, match="max_wavelength"):
        Rope(max_wavelength=0)
    with pytest.raises(ValueError, match="scaling_factor"):
        Rope(scaling_factor=-1.0)


def test_rope_is_a_registered_plugin_component():
    assert plugins.get("position_encoding", "rope") is Rope
    entry = plugins.get_entry("position_encoding", "rope")
    assert entry.plugin == "keras_attn.position_encodings"
    assert isinstance(plugins.resolve("position_encoding", "rope"), keras_attn.PositionEncoding)
    spec = json.loads(json.dumps(plugins.serialize(Rope(max_wavelength=77))))
    assert plugins.resolve("position_encoding", spec).max_wavelength == 77


def test_cli_lists_rope(capsys):
    from keras_attn import cli

    assert cli.main(["plugins"]) in (0, None)
    out = capsys.readouterr().out
    assert "position_encodings (" in out and "rope" in out


def test_rope_passes_the_plugin_checks():
    testing.check_position_encoding(Rope)


# -- in the layer ----------------------------------------------------------------------


def _layer_reference(layer, x, causal=True, offset=0):
    """The layer's attention in numpy: projections, rope on the heads, softmax, output."""
    wq, bq, wk, bk, wv, bv, wo, bo = [np.asarray(w, "float64") for w in layer.get_weights()]
    q = np.einsum("btc,chd->bhtd", x, wq) + np.transpose(bq, (0, 1))[None, :, None, :]
    k = np.einsum("btc,chd->bhtd", x, wk) + bk[None, :, None, :]
    v = np.einsum("btc,chd->bhtd", x, wv) + bv[None, :, None, :]
    positions = np.arange(x.shape[1]) + offset
    q, k = ref_rope(q, positions), ref_rope(k, positions)
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones((x.shape[1],) * 2, bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bqhd", weights, v)
    return np.einsum("bqhd,hde->bqe", out, wo) + bo, weights


@pytest.mark.parametrize(
    "options,path",
    [
        ({}, "fused"),
        ({"block_sparse": True, "block_size": 4}, "block_sparse"),
        ({"normalizer": {"name": "topk", "config": {"k": 100}}}, "dense"),
    ],
)
def test_layer_applies_rope_before_the_score_on_every_path(options, path):
    x = _heads((2, 12, 8), 3)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, position_encoding="rope", **options)
    out = _np(layer(x, use_causal_mask=True))
    assert layer.last_path == path
    expected, _ = _layer_reference(layer, x.astype("float64"))
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_layer_weights_with_rope_match_numpy():
    x = _heads((2, 6, 8), 4)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, position_encoding="rope")
    _, weights = layer(x, use_causal_mask=True, return_attention_scores=True)
    _, expected = _layer_reference(layer, x.astype("float64"))
    np.testing.assert_allclose(_np(weights), expected, atol=1e-5)


def test_decode_step_at_517_rotates_by_517():
    x = _heads((1, 518, 8), 5)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, position_encoding="rope")
    # 517 tokens at once, then one step at 517.
    _, cache = assert_decodes_like_one_pass(layer, x, prefill=517, atol=1e-4)
    # The cache holds the keys rotated where they stand.
    wk, bk = (np.asarray(w, "float64") for w in layer.get_weights()[2:4])
    key = np.einsum("tc,chd->htd", x[0, 517:518], wk) + bk[:, None, :]  # (H, 1, D)
    expected = ref_rope(key, np.array([517]))
    np.testing.assert_allclose(np.transpose(cache[0, 0, 517:518], (1, 0, 2)), expected, atol=1e-4)


def test_cross_attention_encodes_queries_and_keys_at_their_own_positions():
    query, context = _heads((2, 3, 8), 6), _heads((2, 5, 8), 7)
    layer = keras_attn.Attention(num_heads=2, key_dim=4, position_encoding="rope")
    _, weights = layer(query, context, return_attention_scores=True)
    wq, bq, wk, bk = (np.asarray(w, "float64") for w in layer.get_weights()[:4])
    q = ref_rope(np.einsum("btc,chd->bhtd", query, wq) + bq[None, :, None], np.arange(3))
    k = ref_rope(np.einsum("btc,chd->bhtd", context, wk) + bk[None, :, None], np.arange(5))
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / 2.0
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(_np(weights), expected, atol=1e-5)


def test_a_layer_with_rope_in_a_keras_file(tmp_path):
    # (Config round trips of every built-in: tests/test_round_trips.py.)
    layer = keras_attn.Attention(
        num_heads=2,
        key_dim=4,
        position_encoding={"name": "rope", "config": {"max_wavelength": 100}},
    )
    assert keras_attn.Attention(num_heads=1).get_config()["position_encoding"] is None

    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, layer(inputs, use_causal_mask=True))
    x = _heads((2, 6, 8), 8)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), atol=1e-6)


def test_unknown_position_encoding_lists_the_registered_ones():
    with pytest.raises(plugins.UnknownComponentError, match="rope"):
        keras_attn.Attention(num_heads=1, position_encoding="alibi_rope")
