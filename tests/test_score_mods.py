"""Score modifiers against numpy references: softcap and the T5 relative-position bias."""

import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn import plugins
from keras_attn import score_mods
from keras_attn.positions import make_positions


def _np(x):
    return ops.convert_to_numpy(x)


# numpy references.


def ref_softcap(x, cap):
    return cap * np.tanh(x.astype("float64") / cap)


def ref_bucket(relative, num_buckets, max_distance, bidirectional):
    """T5's relative_position_bucket (Raffel et al., 2020), written for numpy.

    `relative` is ``key - query``. Half of the buckets (of each direction when
    bidirectional) hold the exact distances 0 .. n/2 - 1, the rest log-spaced
    distances up to `max_distance`; farther keys share the last bucket.
    """
    relative = np.asarray(relative, dtype=np.int64)
    out = np.zeros_like(relative)
    n = num_buckets
    if bidirectional:
        n //= 2
        out += np.where(relative > 0, n, 0)  # later keys use the upper half
        distance = np.abs(relative)
    else:
        distance = np.where(relative < 0, -relative, 0)  # later keys count as distance 0
    max_exact = n // 2
    far = np.maximum(distance, 1).astype(np.float64)
    log_part = max_exact + np.floor(
        np.log(far / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).astype(np.int64)
    log_part = np.minimum(log_part, n - 1)
    return out + np.where(distance < max_exact, distance, log_part)


def test_ref_bucket_matches_hand_worked_values():
    # T5 defaults, causal: 16 buckets, 8 exact, then log-spaced up to 128.
    rel = -np.array([0, 1, 7, 8, 11, 12, 16, 32, 64, 127, 128, 1000])
    np.testing.assert_array_equal(
        ref_bucket(rel, 32, 128, False)[:3], [0, 1, 7]
    )  # exact part of the causal case uses 16 exact buckets
    np.testing.assert_array_equal(
        ref_bucket(rel, 32, 128, True), [0, 1, 7, 8, 8, 9, 10, 12, 14, 15, 15, 15]
    )
    # Later keys land in the upper half; they never share a bucket with earlier ones.
    np.testing.assert_array_equal(ref_bucket([1, 2, 7, 8], 32, 128, True), [17, 18, 23, 24])
    # Causal: every later key is bucket 0, like the query itself.
    np.testing.assert_array_equal(ref_bucket([0, 1, 50], 32, 128, False), [0, 0, 0])


# Softcap.


@pytest.mark.parametrize("cap", [1.0, 5.0, 50.0])
def test_softcap_matches_tanh(cap):
    x = np.random.default_rng(0).normal(scale=3 * cap, size=(2, 3, 4, 5)).astype("float32")
    out = _np(score_mods.Softcap(cap=cap)(x))
    assert out.shape == x.shape
    np.testing.assert_allclose(out, ref_softcap(x, cap), rtol=1e-5, atol=1e-5)


def test_softcap_bounds_and_near_identity():
    cap = 4.0
    x = np.array([-1e6, -100.0, -4.0, -1e-3, 0.0, 1e-3, 4.0, 100.0, 1e6], "float32")
    out = _np(score_mods.Softcap(cap=cap)(x))
    assert np.all(np.abs(out) <= cap)
    assert np.all(np.diff(out) >= 0)  # monotone
    np.testing.assert_allclose(out[[3, 4, 5]], x[[3, 4, 5]], atol=1e-6)  # ~identity near 0
    np.testing.assert_allclose(out[[0, -1]], [-cap, cap], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_softcap_mixed_precision(dtype):
    keras.config.set_dtype_policy(f"mixed_{dtype}")
    mod = score_mods.Softcap(cap=30.0)
    x = ops.cast(np.array([-6e4, -20.0, 0.0, 20.0, 6e4], "float32"), dtype)
    out = mod(x)
    assert keras.backend.standardize_dtype(out.dtype) == _logits_dtype(dtype)
    out = _np(ops.cast(out, "float32"))
    expected = 30.0 * np.tanh(np.array([-6e4, -20.0, 0.0, 20.0, 6e4]) / 30.0)
    np.testing.assert_allclose(out, expected, rtol=1e-2, atol=1e-2)


def _logits_dtype(compute_dtype):
    # float16 overflows at 65504: score_mods take and give float32 logits under it.
    return "float32" if compute_dtype == "float16" else compute_dtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_relative_position_mixed_precision(dtype):
    keras.config.set_dtype_policy(f"mixed_{dtype}")
    mod = score_mods.RelativePosition(num_heads=2, num_buckets=8, max_distance=20)
    mod.build()
    table = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
    mod.embeddings.assign(table)
    logits = ops.cast(np.zeros((1, 2, 3, 5), "float32"), dtype)
    out = mod(logits, positions=make_positions(3, 5, 2, query_offset=1))
    assert keras.backend.standardize_dtype(out.dtype) == _logits_dtype(dtype)
    bias = _ref_bias(table, np.arange(3) + 1, np.arange(5), 8, 20, True)
    np.testing.assert_allclose(_np(ops.cast(out, "float32"))[0], bias, rtol=1e-2, atol=1e-2)


@given(
    cap=st.floats(0.1, 100.0),
    values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=16, max_size=16),
)
def test_softcap_property(cap, values):
    x = np.array(values, "float32")
    out = _np(score_mods.Softcap(cap=cap)(x))
    assert np.all(np.abs(out) <= cap * (1 + 1e-6))
    np.testing.assert_allclose(out, ref_softcap(x, cap), rtol=1e-5, atol=1e-5 * cap)
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(out[order]) >= 0)  # monotone


# Relative position buckets.

BUCKET_CASES = [
    (32, 128, True),
    (32, 128, False),
    (8, 20, True),
    (8, 20, False),
    (4, 3, True),
    (6, 50, False),
    (64, 1000, True),
]


@pytest.mark.parametrize("num_buckets,max_distance,bidirectional", BUCKET_CASES)
def test_relative_position_bucket(num_buckets, max_distance, bidirectional):
    relative = np.arange(-1500, 1501, dtype="int32")
    out = _np(
        score_mods.relative_position_bucket(relative, num_buckets, max_distance, bidirectional)
    )
    expected = ref_bucket(relative, num_buckets, max_distance, bidirectional)
    np.testing.assert_array_equal(out, expected)
    assert out.min() == 0 and out.max() == num_buckets - 1  # every bucket in range, the last used


@given(
    num_buckets=st.integers(4, 64),
    extra=st.integers(1, 500),
    bidirectional=st.booleans(),
    offset=st.integers(0, 5000),
)
def test_relative_position_bucket_property(num_buckets, extra, bidirectional, offset):
    max_distance = num_buckets // (4 if bidirectional else 2) + extra
    query = offset + np.arange(0, 40)[:, None]
    key = offset - 600 + 7 * np.arange(92)[None, :]  # a fixed shape: JAX compiles once
    relative = key - query
    out = _np(
        score_mods.relative_position_bucket(relative, num_buckets, max_distance, bidirectional)
    )
    np.testing.assert_array_equal(
        out, ref_bucket(relative, num_buckets, max_distance, bidirectional)
    )
    assert np.all((out >= 0) & (out < num_buckets))


# The relative-position bias.


def _relative_position(num_heads=3, seed=0, **kwargs):
    mod = score_mods.RelativePosition(num_heads=num_heads, **kwargs)
    mod.build()
    table = np.random.default_rng(seed).normal(size=(mod.num_buckets, num_heads))
    mod.embeddings.assign(table.astype("float32"))
    return mod, table


def _ref_bias(table, query, key, num_buckets, max_distance, bidirectional):
    bucket = ref_bucket(key[None, :] - query[:, None], num_buckets, max_distance, bidirectional)
    return np.transpose(table[bucket], (2, 0, 1))  # (H, Tq, Tk): table[bucket, head]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(
    "tq,tk,query_offset,key_offset",
    [(5, 5, 0, 0), (4, 9, 0, 0), (9, 4, 3, 0), (1, 520, 517, 0), (3, 40, 517, 480)],
)
def test_relative_position_bias(bidirectional, tq, tk, query_offset, key_offset):
    heads = 3
    mod, table = _relative_position(
        heads, num_buckets=16, max_distance=64, bidirectional=bidirectional
    )
    logits = np.random.default_rng(1).normal(size=(2, heads, tq, tk)).astype("float32")
    positions = make_positions(tq, tk, heads, query_offset, key_offset)
    out = _np(mod(logits, positions=positions))
    query = np.arange(tq) + query_offset
    key = np.arange(tk) + key_offset
    bias = _ref_bias(table, query, key, 16, 64, bidirectional)
    np.testing.assert_allclose(out, logits + bias[None], rtol=1e-6, atol=1e-6)


def test_relative_position_decode_step_at_517():
    # A single decoding step at position 517 sees the same bias row as row 517 of
    # the full matrix: the bias depends on absolute positions, not on Tq.
    heads, length = 2, 520
    mod, _ = _relative_position(heads, num_buckets=32, max_distance=128, bidirectional=False)
    full = _np(
        mod(
            np.zeros((1, heads, length, length), "float32"),
            positions=make_positions(length, length, heads),
        )
    )
    step = _np(
        mod(
            np.zeros((1, heads, 1, length), "float32"),
            positions=make_positions(1, length, heads, query_offset=517),
        )
    )
    np.testing.assert_array_equal(step[:, :, 0], full[:, :, 517])
    # And it is not the bias of position 0 (which would be the bug of ignoring the offset).
    assert not np.array_equal(step[:, :, 0], full[:, :, 0])


def test_relative_position_is_translation_invariant():
    mod, _ = _relative_position(2, num_buckets=8, max_distance=20)
    logits = np.zeros((1, 2, 6, 6), "float32")
    a = _np(mod(logits, positions=make_positions(6, 6, 2)))
    b = _np(mod(logits, positions=make_positions(6, 6, 2, 1000, 1000)))
    np.testing.assert_array_equal(a, b)


def test_relative_position_default_table_is_zero_and_trainable():
    mod = score_mods.RelativePosition(num_heads=4)
    logits = np.random.default_rng(0).normal(size=(1, 4, 3, 3)).astype("float32")
    out = _np(mod(logits, positions=make_positions(3, 3, 4)))
    np.testing.assert_array_equal(out, logits)
    assert [tuple(w.shape) for w in mod.trainable_weights] == [(32, 4)]


def test_relative_position_needs_num_heads():
    mod = score_mods.RelativePosition()
    assert mod.num_heads is None
    with pytest.raises(ValueError, match="num_heads"):
        mod(np.zeros((1, 2, 3, 3), "float32"), positions=make_positions(3, 3, 2))


def test_relative_position_num_heads_set_by_attention_layer():
    mod = score_mods.RelativePosition(num_buckets=8, max_distance=16)
    layer = keras_attn.Attention(num_heads=3, key_dim=4, score_mods=[mod])
    x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype("float32")
    layer(x, x)
    assert layer.score_mods[0] is mod
    assert mod.num_heads == 3
    assert tuple(mod.embeddings.shape) == (8, 3)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"num_buckets": 3}, "num_buckets=3"),
        ({"num_buckets": 1, "bidirectional": False}, "num_buckets=1"),
        ({"num_buckets": 8.0}, "num_buckets=8.0"),
        ({"num_buckets": 32, "max_distance": 8}, "max_distance=8"),
        ({"num_buckets": 32, "max_distance": 16, "bidirectional": False}, "max_distance=16"),
        ({"max_distance": 100.5}, "max_distance=100.5"),
        ({"num_heads": 0}, "num_heads=0"),
        ({"num_heads": -2}, "num_heads=-2"),
        ({"num_heads": 2.0}, "num_heads=2.0"),
    ],
)
def test_relative_position_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"Received: {arg}"):
        score_mods.RelativePosition(**kwargs)


@pytest.mark.parametrize("cap", [0, -1.0, "10", None])
def test_softcap_bad_arguments(cap):
    with pytest.raises(ValueError, match="Received: cap="):
        score_mods.Softcap(cap=cap)


# The registry (config round trips: tests/test_round_trips.py).


@pytest.mark.parametrize(
    "name,cls",
    [("softcap", score_mods.Softcap), ("relative_position", score_mods.RelativePosition)],
)
def test_resolve_by_name(name, cls):
    assert plugins.get("score_mod", name) is cls
    mod = plugins.resolve("score_mod", name)
    assert type(mod) is cls and isinstance(mod, keras_attn.ScoreMod)
    assert plugins.resolve("score_mod", mod) is mod


def test_resolve_wrong_kind_raises():
    from keras_attn import normalizers
    from keras_attn import patterns
    from keras_attn import scores

    for other in (scores.Dot(), normalizers.Softmax(), patterns.Causal()):
        with pytest.raises(keras_attn.ComponentKindError, match="Expected a score_mod"):
            plugins.resolve("score_mod", other)
    with pytest.raises(keras_attn.ComponentKindError):
        plugins.resolve("score", score_mods.Softcap())
