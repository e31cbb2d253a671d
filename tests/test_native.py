"""Tests of keras_attn.native: the backend's own kernels agree with the dense path.

cuDNN's sliding-window kernel runs only on an NVIDIA GPU; here the plan is told that
it is available (``jax_cudnn_available``), so the same call runs through XLA's
implementation of ``jax.nn.dot_product_attention``: the code path, the window
arithmetic and the layer's wiring are those of the GPU. `benchmarks/accelerators.py`
runs the real kernel on a GPU.
"""

import logging

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import dispatch
from keras_attn import native
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import scores
from keras_attn.components import Components
from keras_attn.testing import value_and_grads

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="jax.nn.dot_product_attention is JAX's kernel"
)


@pytest.fixture
def cudnn_here(monkeypatch):
    monkeypatch.setattr(native, "jax_cudnn_available", lambda dtype: True)


def _as_on_a_gpu(monkeypatch):
    """cuDNN available, and the layer's float32 heads planned as the 16-bit heads of a GPU.

    The kernel then runs in float32 (XLA), so it is compared to float32 rounding.
    """
    monkeypatch.setattr(native, "jax_cudnn_available", lambda dtype: True)
    original = dispatch.plan
    monkeypatch.setattr(
        dispatch, "plan", lambda *a, **k: original(*a, **{**k, "dtype": "bfloat16"})
    )


def _plan(pattern, **options):
    components = Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    options = {"query_length": 64, "key_length": 64, "head_dim": 8, "dtype": "bfloat16",
               **options}  # fmt: skip
    return dispatch.plan(components, **options)


def test_window_of_each_pattern():
    assert native.jax_window(patterns.Local(4)) == (3, 3)
    assert native.jax_window(patterns.Local(4, causal=True)) == (3, 0)
    assert native.jax_window(patterns.Local(1, causal=True)) == (0, 0)
    assert native.jax_window(patterns.Causal()) is None
    assert native.jax_window(patterns.Local(4) | patterns.GlobalTokens(1)) is None

    class Shifted(patterns.Local):
        def mask(self, positions):
            return super().mask(positions._replace(key=positions.key + 1))

    assert native.jax_window(Shifted(4)) is None  # overrides the mask: not a plain window


def test_plan_takes_the_native_path_only_where_the_kernel_is_exact(cudnn_here):
    local = patterns.Local(16, causal=True)
    plan = _plan(local)
    assert (plan.path, plan.kernel, plan.window) == ("native", "jax_cudnn", (15, 0))
    assert plan.scale == pytest.approx(8**-0.5)
    for options, why in [
        (dict(has_mask=True), "a data mask"),
        (dict(query_offset=5), "a cache offset"),
        (dict(key_length=80), "Tq != Tk"),
        (dict(return_weights=True), "weights asked for"),
        (dict(block_sparse=True), "block-sparse insisted on"),
        (dict(value_dim=4), "value_dim != key_dim"),
        (dict(query_length=None, key_length=None), "unknown lengths"),
    ]:
        assert _plan(local, **options).path != "native", why
    assert _plan(patterns.Dilated(4, causal=True)).path != "native"
    hard = Components(scores.ScaledDot(), (), local, normalizers.Hard())
    assert dispatch.plan(hard, query_length=64, key_length=64, head_dim=8,
                         dtype="bfloat16").path != "native"  # fmt: skip


def test_not_native_where_cudnn_is_not_available():
    # This machine has no GPU: cuDNN is not available, whatever the dtype.
    assert not native.jax_cudnn_available("bfloat16")
    assert _plan(patterns.Local(16, causal=True)).path != "native"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length, window", [(37, 5), (64, 1), (50, 64)])
def test_native_equals_dense_outputs_and_gradients(monkeypatch, causal, length, window):
    rng = np.random.default_rng(length + window)
    x = rng.normal(size=(2, length, 16)).astype("float32")
    make = dict(window=window, causal=causal, num_heads=4, key_dim=8)
    ours = keras_attn.LocalAttention(**make)
    dense = keras_attn.LocalAttention(block_sparse=False, **make)
    ours.build(x.shape, x.shape)
    dense.build(x.shape, x.shape)
    dense.set_weights(ours.get_weights())

    def run(layer):
        def loss(x):
            out = layer(x, x)
            return ops.sum(out * ops.cos(ops.arange(out.shape[-1], dtype=out.dtype))), out

        value, grads, out = value_and_grads(
            loss, x, variables=layer.trainable_variables, has_aux=True
        )
        return value, grads, ops.convert_to_numpy(out)

    _as_on_a_gpu(monkeypatch)
    got_value, got_grads, got = run(ours)
    assert ours.last_path == "native"
    monkeypatch.undo()
    want_value, want_grads, want = run(dense)
    assert dense.last_path == "dense"
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-4)


def test_padding_takes_another_path_and_agrees(cudnn_here, monkeypatch):
    monkeypatch.setattr(
        dispatch,
        "plan",
        lambda *a, _plan=dispatch.plan, **k: _plan(*a, **{**k, "dtype": "bfloat16"}),
    )
    x = np.random.default_rng(0).normal(size=(2, 20, 16)).astype("float32")
    mask = np.arange(20)[None] < np.array([[20], [13]])
    layer = keras_attn.LocalAttention(window=4, causal=True, num_heads=2)
    full = ops.convert_to_numpy(layer(x, x))
    assert layer.last_path == "native"
    padded = ops.convert_to_numpy(layer(x, x, query_mask=mask, value_mask=mask))
    assert layer.last_path != "native"
    np.testing.assert_allclose(padded[0], full[0], atol=2e-5)  # no padding in row 0


def test_the_debug_log_names_the_kernel(cudnn_here, monkeypatch, caplog):
    monkeypatch.setattr(
        dispatch,
        "plan",
        lambda *a, _plan=dispatch.plan, **k: _plan(*a, **{**k, "dtype": "bfloat16"}),
    )
    layer = keras_attn.LocalAttention(window=4, num_heads=2, name="windowed")
    with caplog.at_level(logging.DEBUG, logger="keras_attn"):
        layer(np.ones((1, 8, 8), "float32"))
    assert "windowed (LocalAttention): native path (jax_cudnn)" in caplog.messages
