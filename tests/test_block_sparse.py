"""The block-sparse path equals the dense one: outputs, weights and gradients."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_attn
from keras_attn import block_layout
from keras_attn import block_sparse
from keras_attn import dispatch
from keras_attn import kernels
from keras_attn import normalizers
from keras_attn import patterns as P
from keras_attn import scores
from keras_attn.components import Components
from keras_attn.positions import make_positions
from keras_attn.testing import value_and_grads
from tests.strategies import any_pattern

ATOL = 2e-5

# -- helpers --------------------------------------------------------------------------


def _pair(block_size=8, **kwargs):
    """The same attention twice, forced onto the block-sparse and the dense path."""
    sparse = keras_attn.Attention(block_sparse=True, block_size=block_size, **kwargs)
    dense = keras_attn.Attention(block_sparse=False, block_size=block_size, **kwargs)
    return sparse, dense


def _run(layer, query, value, cotangents, scores=True, compiled=None, **call_kwargs):
    """Output, weights and the gradients (inputs, then weights) of a fixed linear loss.

    With ``scores=False`` the layer is called without ``return_attention_scores``
    (softmax then takes its hand-written gradient) and the weights come back as None.
    Under JAX the program is compiled once per layer and `scores` and kept in the
    dict `compiled`: the cotangents are its arguments, so a second run reuses it.
    """
    c_out, c_w = cotangents
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        ntv = [v.value for v in layer.non_trainable_variables]

        def loss(tv, q, v, c_out, c_w):
            result, _ = layer.stateless_call(
                tv, ntv, q, v, return_attention_scores=scores, **call_kwargs
            )
            out, w = result if scores else (result, None)
            total = jnp.sum(out * c_out) + (jnp.sum(w * c_w) if scores else 0.0)
            return total, (out, w)

        compiled = {} if compiled is None else compiled
        if (id(layer), scores) not in compiled:
            # One compiled program: much faster than op-by-op dispatch.
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            compiled[id(layer), scores] = step
        tv = [v.value for v in layer.trainable_variables]
        (_, (out, w)), grads = compiled[id(layer), scores](tv, query, value, c_out, c_w)
        grads = [grads[1], grads[2], *grads[0]]
    else:

        def loss(q, v):
            result = layer(q, v, return_attention_scores=scores, **call_kwargs)
            out, w = result if scores else (result, None)
            total = ops.sum(ops.multiply(out, c_out))
            if scores:
                total = total + ops.sum(ops.multiply(w, c_w))
            return total, (out, w)

        _, grads, (out, w) = value_and_grads(
            loss, query, value, variables=layer.trainable_variables, has_aux=True
        )
    return [None if x is None else ops.convert_to_numpy(x) for x in (out, w, *grads)]


def _compare(sparse, dense, query, value, atol=ATOL, **call_kwargs):
    """Run both layers on the same weights and inputs; check every result agrees."""
    # Build without an eager call: under JAX, op-by-op dispatch is what makes tests slow.
    sparse.build(query.shape, value.shape)
    dense.build(query.shape, value.shape)
    dense.set_weights(sparse.get_weights())
    rng = np.random.default_rng(1)
    h = sparse.num_heads
    b, tq, tk = query.shape[0], query.shape[1], value.shape[1]
    cot = (
        rng.normal(size=(b, tq, query.shape[-1])).astype("float32"),
        rng.normal(size=(b, h, tq, tk)).astype("float32"),
    )
    compiled = {}  # the layers live as long as this dict: their ids stay theirs
    got = _run(sparse, query, value, cot, compiled=compiled, **call_kwargs)
    assert sparse.last_path == "block_sparse"
    want = _run(dense, query, value, cot, compiled=compiled, **call_kwargs)
    assert dense.last_path == "dense"
    names = ["output", "weights", "d_query", "d_value"] + [
        v.path for v in sparse.trainable_variables
    ]
    for name, g, w in zip(names, got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=atol, rtol=1e-4, err_msg=name)
    # Without the scores, softmax runs `kernels.softmax_weighted_sum` and its
    # hand-written gradient; the reference is the dense path's autodiff through the
    # normalizer (scores asked for, and left out of the loss).
    cot = (cot[0], np.zeros_like(cot[1]))
    want = _run(dense, query, value, cot, compiled=compiled, **call_kwargs)
    got_fast = _run(sparse, query, value, cot, scores=False, compiled=compiled, **call_kwargs)
    for name, g, w in zip(names, got_fast, want, strict=True):
        if name != "weights":
            np.testing.assert_allclose(g, w, atol=atol, rtol=1e-4, err_msg=f"{name} (no scores)")
    return got


def _compiled(fn):
    """`fn` compiled as a whole under JAX (op-by-op dispatch is slow); as is elsewhere."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def _inputs(rng, batch, length, dim=8):
    return rng.normal(size=(batch, length, dim)).astype("float32")


# -- exactness against the dense path -------------------------------------------------


@given(
    pattern=any_pattern(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    query_length=st.integers(1, 50),
    key_length=st.integers(1, 50),
    block_size=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 1000),
)
@settings(max_examples=10)
def test_equals_dense_for_random_shapes_and_patterns(
    pattern, batch, heads, query_length, key_length, block_size, seed
):
    rng = np.random.default_rng(seed)
    sparse, dense = _pair(block_size, num_heads=heads, key_dim=4, pattern=pattern)
    query, value = _inputs(rng, batch, query_length), _inputs(rng, batch, key_length, 6)
    _compare(sparse, dense, query, value)


@pytest.mark.parametrize("score", ["dot", "scaled_dot", "general", "additive", "cosine"])
def test_every_score(score):
    rng = np.random.default_rng(0)
    sparse, dense = _pair(num_heads=2, key_dim=4, score=score, pattern=P.Local(5))
    _compare(sparse, dense, _inputs(rng, 2, 37), _inputs(rng, 2, 37))


@pytest.mark.parametrize(
    "score_mods",
    [
        [{"name": "softcap", "config": {"cap": 2.0}}],
        [{"name": "relative_position", "config": {"embeddings_initializer": "random_normal"}}],
        [
            {"name": "relative_position", "config": {"embeddings_initializer": "random_normal"}},
            {"name": "softcap", "config": {"cap": 3.0}},
        ],
    ],
    ids=["softcap", "relative_position", "both"],
)
def test_score_mods_see_absolute_positions(score_mods):
    rng = np.random.default_rng(0)
    pattern = P.Local(6) | P.GlobalTokens(indices=[3, 20])
    sparse, dense = _pair(num_heads=3, key_dim=4, score_mods=score_mods, pattern=pattern)
    _compare(sparse, dense, _inputs(rng, 2, 41), _inputs(rng, 2, 41))


@pytest.mark.parametrize(
    "normalizer",
    ["softmax", "hard", {"name": "topk", "config": {"k": 3}}, "sparsemax"],
    ids=["softmax", "hard", "topk", "sparsemax"],
)
def test_every_normalizer_sees_the_whole_row(normalizer):
    # Rows span several blocks, so a normalizer applied per block would differ.
    rng = np.random.default_rng(0)
    pattern = P.Local(7) | P.Strided(9)
    sparse, dense = _pair(
        block_size=4, num_heads=2, key_dim=4, normalizer=normalizer, pattern=pattern
    )
    _compare(sparse, dense, _inputs(rng, 2, 45), _inputs(rng, 2, 45))


@pytest.mark.parametrize("kind", ["query_and_value", "attention_mask", "attention_mask_2d"])
def test_padding_and_explicit_masks(kind):
    rng = np.random.default_rng(0)
    b, tq, tk = 3, 29, 35
    sparse, dense = _pair(num_heads=2, key_dim=4, pattern=P.Local(6) | P.GlobalTokens(1))
    query, value = _inputs(rng, b, tq), _inputs(rng, b, tk)
    if kind == "query_and_value":
        kwargs = {
            "query_mask": np.arange(tq)[None] < np.array([[29], [10], [0]]),
            "value_mask": np.arange(tk)[None] < np.array([[35], [3], [20]]),
        }
    elif kind == "attention_mask":
        kwargs = {"attention_mask": rng.random((b, tq, tk)) > 0.3}
    else:
        kwargs = {"attention_mask": rng.random((tq, tk)) > 0.5}
    _compare(sparse, dense, query, value, **kwargs)


def test_causal_mask_and_cross_attention_with_presets():
    rng = np.random.default_rng(0)
    kwargs = dict(window=5, num_heads=2, key_dim=4, block_size=8)
    sparse = keras_attn.LocalAttention(block_sparse=True, **kwargs)
    dense = keras_attn.LocalAttention(block_sparse=False, **kwargs)
    _compare(sparse, dense, _inputs(rng, 2, 30), _inputs(rng, 2, 19), use_causal_mask=True)


def test_numpy_reference():
    # Independent of the dense path: local attention written out in numpy.
    rng = np.random.default_rng(0)
    b, h, t, d, window = 2, 2, 45, 4, 6
    q, k, v = (rng.normal(size=(b, h, t, d)).astype("float32") for _ in range(3))
    pattern = P.Local(window, causal=True)
    components = Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    layout = block_layout.block_layout(pattern, t, t, 8)
    out, weights = _compiled(
        lambda q, k, v: block_sparse.block_sparse_attention(
            q, k, v, layout, components, make_positions(t, t, h), return_weights=True
        )
    )(q, k, v)
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(d)
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    allowed = (i - j >= 0) & (i - j < window)
    logits = np.where(allowed, logits, -np.inf)
    want_w = np.exp(logits - logits.max(-1, keepdims=True))
    want_w /= want_w.sum(-1, keepdims=True)
    np.testing.assert_allclose(ops.convert_to_numpy(weights), want_w, atol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(out), want_w @ v, atol=1e-5)


def test_query_offset_for_cached_decoding():
    # Queries at absolute positions 30.. (a cache index) attend over 50 keys.
    rng = np.random.default_rng(0)
    b, h, tq, tk, d, offset = 1, 2, 13, 50, 4, 30
    q = rng.normal(size=(b, h, tq, d)).astype("float32")
    k, v = (rng.normal(size=(b, h, tk, d)).astype("float32") for _ in range(2))
    pattern = P.Local(5, causal=True) | P.GlobalTokens(2)
    components = Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    positions = make_positions(tq, tk, h, query_offset=offset)
    mask = np.arange(tk)[None, None, None] < offset + tq
    layout = block_layout.block_layout(pattern, tq, tk, 8, query_offset=offset)
    got, got_w = _compiled(
        lambda q, k, v: block_sparse.block_sparse_attention(
            q, k, v, layout, components, positions, mask, return_weights=True
        )
    )(q, k, v)
    want, want_w = _compiled(
        lambda q, k, v: kernels.dense_attention(q, k, v, components, positions, mask)
    )(q, k, v)
    np.testing.assert_allclose(ops.convert_to_numpy(got_w), ops.convert_to_numpy(want_w), atol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(got), ops.convert_to_numpy(want), atol=1e-5)


def test_compiled_function_matches():
    # Static shapes only: the path runs inside tf.function(jit_compile=True) / jax.jit.
    rng = np.random.default_rng(0)
    layer = keras_attn.LocalAttention(window=4, num_heads=2, key_dim=4, block_size=8)
    x = _inputs(rng, 2, 70)
    eager = ops.convert_to_numpy(layer(x, x))
    assert layer.last_path == "block_sparse"
    if keras.backend.backend() == "jax":
        import jax

        tv = [v.value for v in layer.trainable_variables]

        @jax.jit
        def f(tv, x):
            return layer.stateless_call(tv, [], x, x)[0]

        compiled = f(tv, x)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(lambda x: layer(x, x), jit_compile=True)(tf.constant(x))
    else:
        import torch

        # Dynamo traces the path with static shapes (the "eager" backend skips
        # Inductor's code generation, minutes on a CPU).
        compiled = torch.compile(lambda x: layer(x, x), backend="eager")(ops.convert_to_tensor(x))
    np.testing.assert_allclose(ops.convert_to_numpy(compiled), eager, atol=1e-5)


# -- a plugin's pattern ---------------------------------------------------------------


class EveryThirdNearby(keras_attn.Pattern):
    """A plugin pattern without a closed-form block mask."""

    name = "test_block_sparse_every_third_nearby"

    def __init__(self, reach=12):
        self.reach = reach

    def mask(self, positions):
        d = positions.query - positions.key
        return ops.logical_and(ops.abs(d) < self.reach, ops.equal(d % 3, 0))

    def get_config(self):
        return {"reach": self.reach}


class _Plugin:
    @keras_attn.hookimpl
    def register_patterns(self, register):
        register(EveryThirdNearby)


@pytest.fixture
def plugin():
    p = _Plugin()
    keras_attn.plugins.register(p, name="test_block_sparse_plugin")
    yield p
    keras_attn.plugins.unregister(p)


def test_plugin_pattern_runs_block_sparse(plugin):
    rng = np.random.default_rng(0)
    pattern = {"name": EveryThirdNearby.name, "config": {"reach": 9}}
    sparse, dense = _pair(num_heads=2, key_dim=4, pattern=pattern)
    got = _compare(sparse, dense, _inputs(rng, 2, 53), _inputs(rng, 2, 53))
    i, j = np.arange(53)[:, None], np.arange(53)[None]
    allowed = (np.abs(i - j) < 9) & ((i - j) % 3 == 0)
    assert (got[1][:, :, ~allowed] == 0).all()
    # Chosen automatically too, on a long enough input.
    auto = keras_attn.Attention(num_heads=1, key_dim=4, pattern=pattern, block_size=8)
    auto(_inputs(rng, 1, 160), _inputs(rng, 1, 160))
    assert auto.last_path == "block_sparse"


# -- choosing the path ----------------------------------------------------------------


def test_auto_takes_block_sparse_when_it_pays_off():
    rng = np.random.default_rng(0)
    layer = keras_attn.LocalAttention(window=8, num_heads=1, key_dim=4, block_size=8)
    layer(_inputs(rng, 1, 200), _inputs(rng, 1, 200))
    assert layer.last_path == "block_sparse"
    layer(_inputs(rng, 1, 20), _inputs(rng, 1, 20))  # too short to pay off
    assert layer.last_path == "dense"
    never = keras_attn.LocalAttention(window=8, key_dim=4, block_size=8, block_sparse=False)
    never(_inputs(rng, 1, 200), _inputs(rng, 1, 200))
    assert never.last_path == "dense"
    full = keras_attn.Attention(key_dim=4, block_size=8, pattern="full")
    full(_inputs(rng, 1, 200), _inputs(rng, 1, 200), return_attention_scores=True)
    assert full.last_path == "dense"


def test_pays_off():
    local = P.Local(256)
    assert dispatch.block_sparse_pays_off(local, 8192, 8192)
    assert not dispatch.block_sparse_pays_off(local, 512, 512)  # most blocks are kept
    assert not dispatch.block_sparse_pays_off(local, None, 8192)
    assert not dispatch.block_sparse_pays_off(local, 8192, 8192, mode=False)
    assert not dispatch.block_sparse_pays_off(P.Full(), 8192, 8192)
    assert dispatch.block_sparse_pays_off(P.Full(), 64, 64, mode=True)
    with pytest.raises(ValueError, match="query_offset"):
        dispatch.block_sparse_pays_off(
            local, 8192, 8192, mode=True, query_offset=ops.convert_to_tensor(3)
        )
    with pytest.raises(ValueError, match="key_length=None"):
        dispatch.block_sparse_pays_off(local, 8, None, mode=True)
