"""Tests of Splash attention on the native path (`keras_attn.native.splash_attention`).

Splash attention is a Pallas kernel for TPUs; the plan takes it only where JAX's
default backend is a TPU. Here the tests tell the plan it is there
(a `keras_attn.devices.Machine` on a TPU) and the kernel runs in Pallas's interpret mode on the
CPU: the same mask processing, block skipping, padding and segment ids as on a TPU,
compared with the dense path and with a numpy reference, outputs and gradients.
Sizes stay small (interpret mode is slow).
"""

import logging

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import devices
from keras_attn import dispatch
from keras_attn import native
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import scores
from keras_attn.components import Components
from keras_attn.positions import Positions
from keras_attn.testing import value_and_grads

pytestmark = pytest.mark.skipif(
    not native.has_splash_attention(),
    reason="Splash attention is a JAX kernel (jax.experimental.pallas); "
    f"the backend is {keras.backend.backend()}",
)

PATTERNS = {
    "full": patterns.Full(),
    "causal": patterns.Causal(),
    "local": patterns.Local(5),
    "local_causal": patterns.Local(7, causal=True),
    "local_or_global": patterns.Local(9, causal=True) | patterns.GlobalTokens(2),
    "dilated": patterns.Dilated(3, 2, causal=True),
}


@pytest.fixture
def splash_here():
    """Plan as on a TPU, so Splash attention runs on this CPU (in interpret mode)."""
    with devices.assume(devices.Machine("jax", "tpu")):
        yield


def _pattern_mask(pattern, tq, tk, offset=0):
    positions = Positions(
        query=(np.arange(tq) + offset).reshape(1, 1, tq, 1),
        key=np.arange(tk).reshape(1, 1, 1, tk),
        head=np.zeros((1, 1, 1, 1), "int32"),
    )
    m = ops.convert_to_numpy(pattern.mask(positions)).astype(bool)
    return np.broadcast_to(m, (1, 1, tq, tk))[0, 0]


def _numpy_attention(q, k, v, allowed, scale):
    """Masked softmax attention in numpy; q ``(B, Tq, H, D)``, allowed ``(Tq, Tk)``."""
    logits = np.einsum("bqhd,bkhd->bhqk", q, k).astype("float64") * scale
    logits = np.where(allowed, logits, -np.inf)
    peak = logits.max(-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(peak), peak, 0))
    total = weights.sum(-1, keepdims=True)
    weights = np.where(total > 0, weights / np.where(total > 0, total, 1), 0)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _dense(q, k, v, pattern, offset=0):
    """The dense path itself, on the same heads (scaled_dot: ``1 / sqrt(D)``)."""
    components = Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    plan = dispatch.Plan("dense", components, offset)
    return dispatch.attend(plan, q, k, v)[0]


def _heads(rng, b, t, h, d):
    return rng.normal(size=(b, t, h, d)).astype("float32")


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_kernel_equals_numpy_and_dense_outputs_and_gradients(name):
    pattern = PATTERNS[name]
    rng = np.random.default_rng(0)
    b, tq, tk, h, d = 2, 150, 150, 2, 8  # an odd length: blocks of 128 cut short
    q, k, v = _heads(rng, b, tq, h, d), _heads(rng, b, tk, h, d), _heads(rng, b, tk, h, d)
    scale = d**-0.5
    got = ops.convert_to_numpy(native.splash_attention(q, k, v, pattern, scale=scale))
    want = _numpy_attention(q, k, v, _pattern_mask(pattern, tq, tk), scale)
    np.testing.assert_allclose(got, want, atol=2e-5)

    cot = rng.normal(size=(b, tq, h, d)).astype("float32")

    def loss(kernel):
        return lambda q, k, v: ops.sum(kernel(q, k, v) * cot)

    _, got_grads = value_and_grads(
        loss(lambda *a: native.splash_attention(*a, pattern, scale=scale)), q, k, v
    )
    _, want_grads = value_and_grads(loss(lambda *a: _dense(*a, pattern)), q, k, v)
    for g, w, which in zip(got_grads, want_grads, "qkv", strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4, err_msg=which)


@pytest.mark.parametrize(
    "name, tq, tk, offset",
    [
        ("local_or_global", 37, 200, 0),  # Tq != Tk, both padded
        ("local", 200, 131, 0),  # queries beyond the last key see none: zeros
        ("causal", 3, 140, 137),  # a cache: three queries at 137..139
        ("local_or_global", 5, 300, 200),  # a cache offset inside the keys
        ("dilated", 1, 260, 259),  # one decoding step
    ],
)
def test_lengths_and_cache_offsets(name, tq, tk, offset):
    pattern = PATTERNS[name]
    rng = np.random.default_rng(tq + tk)
    q, k, v = _heads(rng, 1, tq, 2, 8), _heads(rng, 1, tk, 2, 8), _heads(rng, 1, tk, 2, 8)
    got = native.splash_attention(q, k, v, pattern, scale=0.3, query_offset=offset)
    got = ops.convert_to_numpy(got)
    want = _numpy_attention(q, k, v, _pattern_mask(pattern, tq, tk, offset), 0.3)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.isfinite(got).all()


def test_whole_key_and_query_masks_become_segment_ids():
    pattern = PATTERNS["local_or_global"]
    rng = np.random.default_rng(5)
    b, tq, tk = 2, 130, 140
    q, k, v = _heads(rng, b, tq, 2, 8), _heads(rng, b, tk, 2, 8), _heads(rng, b, tk, 2, 8)
    allowed = _pattern_mask(pattern, tq, tk)
    key_mask = np.arange(tk)[None] < np.array([[tk], [61]])  # (B, Tk) padding
    got = native.splash_attention(q, k, v, pattern, scale=0.3, mask=key_mask[:, None, None])
    want = _numpy_attention(q, k, v, allowed & key_mask[:, None, None], 0.3)
    np.testing.assert_allclose(ops.convert_to_numpy(got), want, atol=2e-5)
    query_mask = np.arange(tq)[None] < np.array([[97], [tq]])  # (B, Tq) padding
    got = native.splash_attention(q, k, v, pattern, scale=0.3, mask=query_mask[:, None, :, None])
    want = _numpy_attention(q, k, v, allowed & query_mask[:, None, :, None], 0.3)
    np.testing.assert_allclose(ops.convert_to_numpy(got), want, atol=2e-5)
    with pytest.raises(ValueError, match="whole keys"):
        native.splash_attention(q, k, v, pattern, scale=0.3, mask=np.ones((b, 1, tq, tk), bool))


def test_grouped_heads_and_bfloat16():
    pattern = PATTERNS["dilated"]
    rng = np.random.default_rng(6)
    q, k, v = _heads(rng, 1, 140, 4, 8), _heads(rng, 1, 140, 2, 8), _heads(rng, 1, 140, 2, 8)
    got = native.splash_attention(q, k, v, pattern, scale=0.3)
    want = _numpy_attention(
        q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2), _pattern_mask(pattern, 140, 140), 0.3
    )
    np.testing.assert_allclose(ops.convert_to_numpy(got), want, atol=2e-5)
    half = native.splash_attention(
        *(ops.cast(x, "bfloat16") for x in (q, k, v)), pattern, scale=0.3
    )
    assert keras.backend.standardize_dtype(half.dtype) == "bfloat16"
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(half, "float32")), want, atol=0.05)


def test_the_mask_uses_splash_closed_forms_and_evaluates_others_lazily():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    def head_mask(pattern, offset=0):
        return native.splash_mask(pattern, 200, 300, offset, num_heads=2).masks[0]

    assert isinstance(head_mask(patterns.Full()), sm.FullMask)
    assert head_mask(patterns.Causal(), 7).offset == 7
    local = head_mask(patterns.Local(5, causal=True), 3)
    assert (local.window_size, local.offset) == ((4, 0), 3)
    pattern = patterns.Dilated(4, 3) | patterns.GlobalTokens(1)
    lazy = native.splash_mask(pattern, 200, 300, 150, num_heads=2)
    assert lazy.shape == (2, 256, 384)
    assert lazy.masks[0] is lazy.masks[1]  # the pattern does not read the head
    want = np.zeros((256, 384), bool)
    want[:200, :300] = _pattern_mask(pattern, 200, 300, 150)
    got = np.concatenate([lazy.masks[0][i : i + 128, :] for i in range(0, 256, 128)], axis=0)
    np.testing.assert_array_equal(got, want)


def test_a_pattern_that_reads_the_head_gets_a_mask_per_head():
    class EvenHeadsSeeAll(keras_attn.Pattern):
        """Even heads see every key, odd heads are causal (block_mask: from the mask)."""

        def mask(self, positions):
            causal = positions.query >= positions.key
            return ops.logical_or(causal, ops.equal(positions.head % 2, 0))

    pattern = EvenHeadsSeeAll()
    mask = native.splash_mask(pattern, 130, 130, num_heads=2)
    assert mask.masks[0] is not mask.masks[1]
    assert mask.masks[0][0:128, 0:128].all()  # head 0: every pair
    assert not mask.masks[1][0:128, 0:128][0, 1]  # head 1: causal
    rng = np.random.default_rng(7)
    q, k, v = _heads(rng, 1, 130, 2, 8), _heads(rng, 1, 130, 2, 8), _heads(rng, 1, 130, 2, 8)
    got = ops.convert_to_numpy(native.splash_attention(q, k, v, pattern, scale=8**-0.5))
    want = ops.convert_to_numpy(_dense(q, k, v, pattern))
    np.testing.assert_allclose(got, want, atol=2e-5)


# -- through the layer and the plan -----------------------------------------------------


def _pair(**kwargs):
    """The same layer twice: one free to take the native path, one kept off it."""
    fast = keras_attn.Attention(**kwargs)
    slow = keras_attn.Attention(flash_attention=False, **kwargs)
    return fast, slow


@pytest.mark.parametrize("name", ["causal", "local_or_global"])
def test_layer_takes_splash_and_agrees_with_the_dense_path(splash_here, name, caplog):
    rng = np.random.default_rng(8)
    fast, slow = _pair(num_heads=2, key_dim=8, pattern=PATTERNS[name], name=f"splash_{name}")
    x = rng.normal(size=(2, 131, 16)).astype("float32")
    fast.build(x.shape, x.shape)
    slow.build(x.shape, x.shape)
    slow.set_weights(fast.get_weights())
    cot = rng.normal(size=(2, 131, 16)).astype("float32")

    def loss(layer):
        return lambda x: ops.sum(layer(x, x) * cot)

    with caplog.at_level(logging.DEBUG, logger="keras_attn"):
        got_value, got = value_and_grads(loss(fast), x, variables=fast.trainable_variables)
    assert fast.last_path == "native"
    assert f"splash_{name} (Attention): native path (jax_splash)" in caplog.messages
    want_value, want = value_and_grads(loss(slow), x, variables=slow.trainable_variables)
    assert slow.last_path != "native"
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-3)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-3)


def _plan(pattern=PATTERNS["local_or_global"], components=None, **options):
    components = components or Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    options = {"query_length": 150, "key_length": 150, "head_dim": 8, "dtype": "float32",
               **options}  # fmt: skip
    return dispatch.plan(components, **options)


def test_plan_takes_splash_for_every_pattern_and_offset(splash_here):
    for pattern in PATTERNS.values():
        plan = _plan(pattern)
        assert (plan.path, plan.kernel) == ("native", "jax_splash"), pattern
        assert plan.scale == pytest.approx(8**-0.5)
    plan = _plan(query_length=3, key_length=140, query_offset=137)
    assert (plan.path, plan.kernel, plan.query_offset) == ("native", "jax_splash", 137)
    assert _plan(dtype="bfloat16").kernel == "jax_splash"


@pytest.mark.parametrize(
    "options, why",
    [
        (dict(has_mask=True), "a data mask (padding, explicit, cache)"),
        (dict(return_weights=True), "weights asked for"),
        (dict(block_sparse=True), "block-sparse insisted on"),
        (dict(flash_attention=False), "native kernels turned off"),
        (dict(value_dim=4), "value_dim != key_dim"),
        (dict(query_length=None, key_length=None), "lengths unknown when traced"),
        (dict(dtype="float16"), "float16"),
    ],
)
def test_plan_does_not_take_splash(splash_here, options, why):
    assert _plan(**options).kernel != "jax_splash", why


@pytest.mark.parametrize(
    "kwargs, call_kwargs",
    [
        ({"score": "dot"}, {}),
        ({"normalizer": "sparsemax"}, {}),
        ({"normalizer": "hard"}, {}),
        ({"score_mods": ["softcap"]}, {}),
        ({}, {"return_attention_scores": True}),
        ({"dropout": 0.5}, {"training": True}),
    ],
)
def test_not_taken_where_splash_would_not_compute_exactly_this(splash_here, kwargs, call_kwargs):
    layer = keras_attn.Attention(num_heads=1, key_dim=4, pattern=patterns.Local(3), **kwargs)
    x = np.zeros((1, 10, 4), "float32")
    layer(x, x, **call_kwargs)
    assert layer.last_path in ("block_sparse", "dense")


def test_padding_takes_another_path_and_agrees(splash_here):
    rng = np.random.default_rng(9)
    fast, slow = _pair(num_heads=2, key_dim=8, pattern=PATTERNS["local_or_global"])
    x = rng.normal(size=(2, 20, 16)).astype("float32")
    mask = np.arange(20)[None] < np.array([[20], [13]])
    full = ops.convert_to_numpy(fast(x, x))
    assert fast.last_path == "native"
    padded = ops.convert_to_numpy(fast(x, x, query_mask=mask, value_mask=mask))
    assert fast.last_path != "native"
    np.testing.assert_allclose(padded[0], full[0], atol=2e-5)  # no padding in row 0


def test_not_taken_without_a_tpu():
    import jax

    if jax.default_backend() == "tpu":
        pytest.skip("a TPU is here")
    assert not native.splash_attention_is_fast()
    assert _plan().kernel != "jax_splash"
