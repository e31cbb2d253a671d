"""The Pallas block-sparse kernel equals the dense path and a numpy reference.

JAX only. The kernels run in Pallas's interpret mode on a CPU (no GPU here), which is
slow: the sizes are small. Outputs and gradients (query, key, value) are compared.
"""

import logging

import keras
import numpy as np
import pytest

from keras_attn import block_layout
from keras_attn import devices
from keras_attn import kernels
from keras_attn import normalizers
from keras_attn import patterns as P
from keras_attn import scores
from keras_attn.components import Components
from keras_attn.components import Pattern
from keras_attn.positions import make_positions
from tests.references import np_softmax_attention

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="Pallas kernels are JAX only"
)

if keras.backend.backend() == "jax":
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    pytest.importorskip("jax.experimental.pallas")
    from keras_attn import pallas

ATOL = 2e-5


class EveryThirdKeyByHead(Pattern):
    """A plugin-style pattern without a closed-form block mask, different per head."""

    name = "test_every_third_key_by_head"

    def mask(self, positions):
        return ((positions.key + positions.head) % 3 == 0) & (positions.key <= positions.query)


def _np_allowed(pattern, tq, tk, heads, offset):
    """Independent numpy masks ``(1, H, Tq, Tk)`` of the patterns used here."""
    q = np.arange(tq)[:, None] + offset
    k = np.arange(tk)[None, :]
    h = np.arange(heads)[:, None, None]
    d = q - k
    if isinstance(pattern, P.Causal):
        m = d >= 0
    elif isinstance(pattern, P.Dilated):
        m = (np.abs(d) < pattern.window * pattern.dilation) & (d % pattern.dilation == 0)
        m = m & (d >= 0) if pattern.causal else m
    elif isinstance(pattern, P.Local):
        m = (np.abs(d) < pattern.window) & ((d >= 0) if pattern.causal else True)
    elif isinstance(pattern, P.Strided):
        m = (d % pattern.stride == 0) & ((d >= 0) if pattern.causal else True)
    elif isinstance(pattern, EveryThirdKeyByHead):
        m = ((k + h) % 3 == 0) & (d >= 0)
    else:  # Local(window) | GlobalTokens(n)
        local, global_ = pattern.patterns
        m = (np.abs(d) < local.window) | (q < global_.num_tokens) | (k < global_.num_tokens)
    return np.broadcast_to(m, (heads, tq, tk))[None]


def _np_gradients(q, k, v, allowed, scale, d_output):
    """Gradients of ``sum(attention * d_output)`` for query, key and value, in numpy."""
    _, w = np_softmax_attention(q, k, v, allowed, scale)
    d_v = np.swapaxes(w, -1, -2) @ d_output
    d_w = d_output @ np.swapaxes(v, -1, -2)
    d_s = w * (d_w - np.sum(d_w * w, axis=-1, keepdims=True))
    return d_s @ k * scale, np.swapaxes(d_s, -1, -2) @ q * scale, d_v


def _inputs(tq, tk, heads, depth, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(2, heads, tq, depth), (2, heads, tk, depth), (2, heads, tk, depth)]
    shapes.append((2, heads, tq, depth))  # the output's cotangent
    return [rng.normal(size=s).astype("float32") for s in shapes]


def _check(pattern, tq, tk, *, heads=2, depth=32, block_size=16, offset=0, mask=None):
    q, k, v, d_output = _inputs(tq, tk, heads, depth)
    components = Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    layout = block_layout.block_layout(pattern, tq, tk, block_size, offset)
    positions = make_positions(tq, tk, heads, query_offset=offset)
    jmask = None if mask is None else jnp.asarray(mask)

    @jax.jit  # interpret mode runs faster compiled
    def run_pallas(q, k, v):
        return pallas.block_sparse_attention(
            q, k, v, layout, components, mask=jmask, query_offset=offset, interpret=True
        )

    def run_dense(q, k, v):
        return kernels.dense_attention(q, k, v, components, positions, jmask, None, False)[0]

    results = []
    for run in (run_pallas, run_dense):
        output, vjp = jax.vjp(run, *(jnp.asarray(x) for x in (q, k, v)))
        results.append([np.asarray(x) for x in (output, *vjp(jnp.asarray(d_output)))])
    allowed = _np_allowed(pattern, tq, tk, heads, offset)
    if mask is not None:
        allowed = allowed & mask  # (B, H, Tq, Tk)
    scale = 1.0 / np.sqrt(depth)
    reference = [np_softmax_attention(q, k, v, allowed, scale)[0]]
    reference += _np_gradients(q, k, v, allowed, scale, d_output)
    names = ("output", "d_query", "d_key", "d_value")
    for name, ours, dense, ref in zip(names, *results, reference, strict=True):
        assert np.all(np.isfinite(ours)), name
        np.testing.assert_allclose(ours, dense, atol=ATOL, err_msg=f"{name} vs dense")
        np.testing.assert_allclose(ours, ref, atol=ATOL, err_msg=f"{name} vs numpy")
    return results[0]


def test_causal_whole_blocks():
    _check(P.Causal(), 64, 64, depth=64)


def test_local_causal_odd_length():
    _check(P.Local(20, causal=True), 77, 77)


def test_dilated_query_and_key_lengths_differ():
    _check(P.Dilated(6, dilation=3), 50, 90, heads=1)


def test_strided_causal_blocks_of_32():
    _check(P.Strided(7, causal=True), 96, 96, heads=1, block_size=32)


def test_local_or_global_tokens_with_padding():
    keys = np.arange(77) < np.array([[60], [77]])  # (B, Tk): the first row is padded
    _check(P.Local(9) | P.GlobalTokens(2), 77, 77, mask=keys[:, None, None, :])


def test_query_offset_of_a_cache():
    _check(P.Causal(), 20, 100, offset=80, heads=1)


def test_plugin_pattern_that_differs_by_head():
    _check(EveryThirdKeyByHead(), 45, 45)


def test_fully_masked_rows_give_zeros():
    rng = np.random.default_rng(1)
    mask = rng.random((2, 1, 40, 40)) < 0.5
    mask[:, :, 5:9] = False  # rows with no allowed key
    mask[1, :, :, :] &= np.arange(40) % 2 == 0
    output = _check(P.Local(8), 40, 40, heads=1, mask=mask)[0]
    np.testing.assert_array_equal(output[:, :, 5:9], 0.0)


def test_query_only_mask_zeroes_rows():
    rows = np.arange(33) < 20
    output = _check(P.Causal(), 33, 33, heads=1, mask=rows[None, None, :, None])[0]
    np.testing.assert_array_equal(output[:, :, 20:], 0.0)


def test_tables_deduplicate_tiles():
    layout = block_layout.block_layout(P.Causal(), 256, 256, 16)
    tables = pallas.kernel_tables(P.Causal(), layout, 1)
    # Every diagonal block has the same tile: the all-allowed tile and one more.
    assert tables.masks.shape == (2, 16, 16)
    np.testing.assert_array_equal(tables.counts, np.arange(1, 17))
    np.testing.assert_array_equal(tables.row_counts, np.arange(16, 0, -1))


# -- opting in, through dispatch ---------------------------------------------------------


def test_mode_reads_the_environment(monkeypatch):
    monkeypatch.delenv(pallas.ENV_VAR, raising=False)
    assert pallas.mode() is None
    monkeypatch.setenv(pallas.ENV_VAR, "1")
    assert pallas.mode() == "gpu"
    monkeypatch.setenv(pallas.ENV_VAR, "interpret")
    assert pallas.mode() == "interpret"
    monkeypatch.setenv(pallas.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="KERAS_ATTN_PALLAS"):
        pallas.mode()


def test_applies_only_where_asked_and_exact(monkeypatch):
    layout = block_layout.block_layout(P.Causal(), 64, 64, 16)
    softmax = Components(scores.ScaledDot(), (), P.Causal(), normalizers.Softmax())
    monkeypatch.delenv(pallas.ENV_VAR, raising=False)
    assert devices.current().pallas is None  # off by default
    assert not devices.Machine("jax", "gpu").pallas_block_sparse
    assert devices.Machine("jax", "gpu", pallas="gpu").pallas_block_sparse
    assert not devices.Machine("jax", "cpu", pallas="gpu").pallas_block_sparse
    assert devices.Machine("jax", "cpu", pallas="interpret").pallas_block_sparse
    assert not devices.Machine("torch", "gpu", pallas="gpu").pallas_block_sparse
    monkeypatch.setenv(pallas.ENV_VAR, "1")
    assert devices.current().pallas_block_sparse == (jax.default_backend() == "gpu")
    assert pallas.applies(softmax, layout, 32)
    assert not pallas.applies(softmax, layout, 32, return_weights=True)
    sparsemax = softmax.replace(normalizer=normalizers.Sparsemax())
    assert not pallas.applies(sparsemax, layout, 32)
    small = block_layout.block_layout(P.Causal(), 64, 64, 8)
    assert not pallas.applies(softmax, small, 32)


def test_layer_runs_the_kernel_when_opted_in(monkeypatch, caplog):
    import keras_attn

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 50, 16)).astype("float32")
    pad = np.arange(50)[None, :] < np.array([[50], [41]])
    layer = keras_attn.Attention(
        num_heads=2, key_dim=16, pattern=P.Local(12, causal=True), block_sparse=True,
        block_size=16,
    )  # fmt: skip
    monkeypatch.delenv(pallas.ENV_VAR, raising=False)
    expected = np.asarray(layer(x, x, key_mask=pad))
    monkeypatch.setenv(pallas.ENV_VAR, "interpret")
    with caplog.at_level(logging.DEBUG, logger="keras_attn"):
        got = np.asarray(layer(x, x, key_mask=pad))
    assert layer.last_path == "block_sparse"
    assert layer.last_plan.kernel == pallas.KERNEL  # the plan names the kernel that ran
    assert pallas.KERNEL in caplog.text
    np.testing.assert_allclose(got, expected, atol=ATOL)
