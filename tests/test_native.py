"""Tests of keras_attn.native: the backend's own kernels agree with the dense path.

JAX: cuDNN's sliding-window kernel runs only on an NVIDIA GPU; here the plan is made
for a GPU (`keras_attn.devices.assume` of a constructed `Machine`), so the same call
runs through XLA's
implementation of ``jax.nn.dot_product_attention``: the code path, the window
arithmetic and the layer's wiring are those of the GPU.

PyTorch: FlexAttention (torch 2.13) runs forward only on a CPU, so the plan takes it
there only when a test plans for a CUDA machine, with autograd off;
outputs are checked against the dense path, gradients only where CUDA is visible.
`benchmarks/accelerators.py` runs the real kernels on a GPU.
"""

import logging
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import block_layout
from keras_attn import devices
from keras_attn import dispatch
from keras_attn import native
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import scores
from keras_attn.components import Components
from keras_attn.testing import value_and_grads

jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="jax.nn.dot_product_attention is JAX's kernel"
)
torch_only = pytest.mark.skipif(
    not native.has_flex_attention(), reason="FlexAttention is a PyTorch kernel (torch >= 2.5)"
)


GPU = devices.Machine("jax", "gpu")


class _Float32Gpu(devices.Machine):
    """A GPU whose cuDNN would take the layers' float32 heads.

    The kernel then runs here in float32 (XLA), compared to float32 rounding; the
    plan is the one a GPU makes for 16-bit heads.
    """

    def cudnn_window(self, dtype):
        return self.backend == "jax" and self.platform == "gpu"


FLOAT32_GPU = _Float32Gpu("jax", "gpu")


@pytest.fixture
def cudnn_here():
    with devices.assume(FLOAT32_GPU):
        yield


def _plan(pattern, **options):
    components = Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())
    options = {"query_length": 64, "key_length": 64, "head_dim": 8, "dtype": "bfloat16",
               **options}  # fmt: skip
    return dispatch.plan(components, machine=GPU, **options)


@jax_only
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


@jax_only
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
                         dtype="bfloat16", machine=GPU).path != "native"  # fmt: skip


@jax_only
def test_not_native_where_cudnn_is_not_available():
    # This machine has no GPU: cuDNN is not available, whatever the dtype.
    assert not native.jax_cudnn_available("bfloat16")
    components = Components(scores.ScaledDot(), (), patterns.Local(16, causal=True),
                            normalizers.Softmax())  # fmt: skip
    plan = dispatch.plan(components, query_length=64, key_length=64, head_dim=8,
                         dtype="bfloat16")  # fmt: skip
    assert plan.path != "native"
    assert not GPU.cudnn_window("float32")  # cuDNN's sliding window takes 16-bit heads


@jax_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length, window", [(37, 5), (64, 1), (50, 64)])
def test_native_equals_dense_outputs_and_gradients(causal, length, window):
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

    with devices.assume(FLOAT32_GPU):
        got_value, got_grads, got = run(ours)
    # cuDNN takes a sliding window with its causal mask only; two-sided windows run
    # another exact path (a window of 1 is one-sided either way).
    assert ours.last_path == ("native" if causal or window == 1 else "dense")
    want_value, want_grads, want = run(dense)
    assert dense.last_path == "dense"
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-4)


@jax_only
def test_padding_takes_another_path_and_agrees(cudnn_here):
    x = np.random.default_rng(0).normal(size=(2, 20, 16)).astype("float32")
    mask = np.arange(20)[None] < np.array([[20], [13]])
    layer = keras_attn.LocalAttention(window=4, causal=True, num_heads=2)
    full = ops.convert_to_numpy(layer(x, x))
    assert layer.last_path == "native"
    padded = ops.convert_to_numpy(layer(x, x, query_mask=mask, value_mask=mask))
    assert layer.last_path != "native"
    np.testing.assert_allclose(padded[0], full[0], atol=2e-5)  # no padding in row 0


@jax_only
def test_the_debug_log_names_the_kernel(cudnn_here, caplog):
    layer = keras_attn.LocalAttention(window=4, causal=True, num_heads=2, name="windowed")
    with caplog.at_level(logging.DEBUG, logger="keras_attn"):
        layer(np.ones((1, 8, 8), "float32"))
    assert "windowed (LocalAttention): native path (jax_cudnn)" in caplog.messages


# -- PyTorch: FlexAttention ------------------------------------------------------------

# Full and causal patterns take the fused path (SDPA's flash kernels) instead.
PATTERNS = {
    "local": patterns.Local(5),
    "local_causal_global": patterns.Local(9, causal=True) | patterns.GlobalTokens(2),
    "dilated": patterns.Dilated(3, 2, causal=True),
    "strided": patterns.Strided(7),
    "block_local": patterns.BlockLocal(16) & patterns.Causal(),
}


@pytest.fixture
def flex_here(monkeypatch):
    """Plan as on CUDA, so the native path runs on this CPU (forward only: no autograd).

    FlexAttention runs eagerly here (the same BlockMask and mask_mod): compiling it
    for each shape takes minutes on a CPU; `test_cpu_inference_*` run it compiled.
    """
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(native, "_compiled_flex_attention", lambda: flex_attention)
    with torch.no_grad(), devices.assume(devices.Machine("torch", "gpu")):
        yield


def _pair(**kwargs):
    """The same layer twice: one free to take the native path, one kept off it."""
    fast = keras_attn.Attention(**kwargs)
    slow = keras_attn.Attention(flash_attention=False, **kwargs)
    return fast, slow


def _compare(fast, slow, query, value, **call_kwargs):
    if not fast.built:
        fast.build(query.shape, value.shape)
        slow.build(query.shape, value.shape)
        slow.set_weights(fast.get_weights())
    got = ops.convert_to_numpy(fast(query, value, **call_kwargs))
    assert fast.last_path == "native"
    want = ops.convert_to_numpy(slow(query, value, **call_kwargs))
    assert slow.last_path != "native"
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@torch_only
@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("lengths", [(37, 37), (200, 131), (1, 300)])
def test_native_equals_dense(flex_here, name, lengths):
    # Odd lengths (blocks of 128 cut short), Tq != Tk, a single query.
    rng = np.random.default_rng(0)
    tq, tk = lengths
    fast, slow = _pair(num_heads=2, key_dim=8, pattern=PATTERNS[name])
    query = rng.normal(size=(2, tq, 16)).astype("float32")
    value = rng.normal(size=(2, tk, 16)).astype("float32")
    _compare(fast, slow, query, value)


@torch_only
def test_padding_and_explicit_masks_fold_into_the_mask_mod(flex_here):
    rng = np.random.default_rng(1)
    fast, slow = _pair(num_heads=2, key_dim=8, pattern=patterns.Local(6) | patterns.GlobalTokens(1))
    query = rng.normal(size=(2, 150, 16)).astype("float32")
    value = rng.normal(size=(2, 140, 16)).astype("float32")
    query_mask = np.arange(150)[None, :] < np.array([[150], [97]])
    value_mask = np.arange(140)[None, :] < np.array([[61], [140]])
    _compare(fast, slow, query, value, query_mask=query_mask, value_mask=value_mask)
    attention_mask = rng.random((2, 150, 140)) < 0.5
    _compare(fast, slow, query, value, attention_mask=attention_mask)


@torch_only
def test_fully_masked_rows_give_zeros(flex_here):
    rng = np.random.default_rng(2)
    fast, slow = _pair(
        num_heads=1, key_dim=8, pattern=patterns.Local(30, causal=True), use_bias=False
    )
    query = rng.normal(size=(1, 20, 8)).astype("float32")
    attention_mask = np.ones((1, 20, 20), bool)
    attention_mask[:, 5] = False  # query 5 sees no key
    _compare(fast, slow, query, query, attention_mask=attention_mask)


@torch_only
def test_cache_offsets(flex_here):
    # Decoding steps at absolute positions: the pattern sees query position `index`.
    rng = np.random.default_rng(3)
    pattern = patterns.Local(4, causal=True) | patterns.GlobalTokens(1)
    fast, slow = _pair(num_heads=2, key_dim=8, pattern=pattern)
    length, steps = 140, 3
    x = rng.normal(size=(1, length, 16)).astype("float32")
    fast.build(x.shape, x.shape)
    slow.build(x.shape, x.shape)
    slow.set_weights(fast.get_weights())
    for index in (0, 129, length - steps):
        cache = np.zeros((1, 2, length, 2, 8), "float32")
        step = x[:, index : index + steps]
        got, _ = fast(step, step, cache=cache, cache_update_index=index)
        assert fast.last_path == "native"
        want, _ = slow(step, step, cache=cache, cache_update_index=index)
        assert slow.last_path != "native"
        np.testing.assert_allclose(
            ops.convert_to_numpy(got), ops.convert_to_numpy(want), atol=2e-5, rtol=1e-4
        )


@torch_only
def test_block_mask_is_the_patterns_own(flex_here):
    # The BlockMask's blocks are exactly the pattern's closed-form block_mask.
    pattern = patterns.Dilated(4, 3) | patterns.GlobalTokens(1)
    tq, tk, offset = 300, 520, 200
    bm = native.flex_block_mask(pattern, tq, tk, offset)
    blocks = ops.convert_to_numpy(bm.to_dense())[0, 0].astype(bool)
    want = pattern.block_mask(tq, tk, native.FLEX_BLOCK_SIZE, offset)
    np.testing.assert_array_equal(blocks, want)
    layout = block_layout.block_layout(pattern, tq, tk, native.FLEX_BLOCK_SIZE, offset)
    np.testing.assert_array_equal(blocks, layout.block_mask)


@torch_only
def test_the_path_and_the_kernel_are_logged(flex_here, caplog):
    layer = keras_attn.LocalAttention(window=3, num_heads=1, key_dim=4)
    x = np.zeros((1, 10, 4), "float32")
    with caplog.at_level(logging.DEBUG, logger="keras_attn"):
        layer(x, x)
    assert layer.last_path == "native"
    assert "native path (torch_flex_attention)" in caplog.text


@torch_only
@pytest.mark.parametrize(
    "kwargs, call_kwargs",
    [
        ({"score": "dot"}, {}),
        ({"normalizer": "sparsemax"}, {}),
        ({"score_mods": ["softcap"]}, {}),
        ({}, {"return_attention_scores": True}),
        ({"dropout": 0.5}, {"training": True}),
    ],
)
def test_not_taken_where_flex_attention_would_not_compute_exactly_this(
    flex_here, kwargs, call_kwargs
):
    layer = keras_attn.Attention(num_heads=1, key_dim=4, pattern=patterns.Local(3), **kwargs)
    x = np.zeros((1, 10, 4), "float32")
    layer(x, x, **call_kwargs)
    assert layer.last_path in ("block_sparse", "dense")


@torch_only
def test_not_taken_where_flex_attention_is_slow():
    # On a CPU FlexAttention has no backward pass and forms the whole score matrix.
    if native.flex_attention_is_fast():
        pytest.skip("a CUDA device is visible")
    layer = keras_attn.LocalAttention(window=3, num_heads=1, key_dim=4)
    x = np.zeros((1, 10, 4), "float32")
    layer(x, x)
    assert layer.last_path != "native"
    assert "native" in dispatch.PATHS


@torch_only
@pytest.mark.skipif(
    not native.flex_attention_is_fast(),
    reason="FlexAttention has no backward pass on a CPU (torch 2.13); checked where CUDA is",
)
def test_gradients_equal_the_dense_path():
    from keras_attn.testing import value_and_grads

    rng = np.random.default_rng(4)
    fast, slow = _pair(
        num_heads=2, key_dim=8, pattern=patterns.Local(5, causal=True) | patterns.GlobalTokens(1)
    )
    query = rng.normal(size=(2, 200, 16)).astype("float32")
    fast.build(query.shape, query.shape)
    slow.build(query.shape, query.shape)
    slow.set_weights(fast.get_weights())
    cot = rng.normal(size=(2, 200, 16)).astype("float32")

    def loss(layer):
        return lambda x: ops.sum(ops.multiply(layer(x, x), cot))

    _, got = value_and_grads(loss(fast), query, variables=fast.trainable_variables)
    assert fast.last_path == "native"
    _, want = value_and_grads(loss(slow), query, variables=slow.trainable_variables)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-3)
    assert keras.backend.backend() == "torch"


@jax_only
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize(
    "pattern",
    [
        patterns.Local(16, causal=True),
        patterns.Local(1, causal=True),
        patterns.Local(16),  # two-sided: cuDNN refuses it without its causal mask
        patterns.Local(5) | patterns.GlobalTokens(1),
        patterns.Causal(),
        patterns.Dilated(3, 2, causal=True),
    ],
    ids=repr,
)
def test_what_the_plan_routes_to_cudnn_cudnn_accepts(pattern, dtype):
    # JAX checks cuDNN's arguments before it looks for a GPU: on this CPU, a call with
    # exactly the plan's arguments and dtype may fail only for want of cuDNN.
    import jax
    import jax.numpy as jnp

    plan = _plan(pattern, dtype=dtype, query_length=48, key_length=48)
    if plan.kernel != "jax_cudnn":
        assert dtype == "float32" or native.jax_window(pattern) is None or not pattern.causal
        return
    left, right = plan.window
    q = jnp.ones((2, 48, 4, 8), dtype)
    k = jnp.ones((2, 48, 4, 8), dtype)  # key/value heads repeated to H, as the layer passes them
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
        jax.nn.dot_product_attention(
            q, k, k, scale=plan.scale, is_causal=right == 0, local_window_size=(left, right),
            implementation="cudnn",
        )  # fmt: skip


@jax_only
def test_a_two_sided_window_is_not_planned_onto_cudnn():
    # The GPU crash of issue 20: cuDNN raises "doesn't support right window ... when
    # causal mask is not used", so the plan never routes a two-sided window there.
    for dtype in ("bfloat16", "float16"):
        assert _plan(patterns.Local(16), dtype=dtype).path != "native"
        assert _plan(patterns.Local(16, causal=True), dtype=dtype).kernel == "jax_cudnn"


@jax_only
def test_a_failing_kernel_warns_once_and_runs_the_portable_path(monkeypatch):
    # Issue 20: a native kernel that cannot run on the user's machine is not a crash.
    def broken(*args, **kwargs):
        raise RuntimeError("cuDNN said no")

    monkeypatch.setattr(native, "jax_local_attention", broken)
    x = np.random.default_rng(3).normal(size=(2, 16, 8)).astype("float32")
    layer = keras_attn.LocalAttention(window=4, causal=True, num_heads=2, name="falls_back")
    reference = keras_attn.LocalAttention(window=4, causal=True, num_heads=2, block_sparse=False)
    layer.build(x.shape, x.shape)
    reference.build(x.shape, x.shape)
    reference.set_weights(layer.get_weights())
    with devices.assume(FLOAT32_GPU), pytest.warns(RuntimeWarning, match="jax_cudnn kernel failed"):
        got = ops.convert_to_numpy(layer(x, x))
    assert layer.last_plan.fallback_from == "jax_cudnn"
    assert layer.last_plan.kernel is None and layer.last_path != "native"
    np.testing.assert_allclose(got, ops.convert_to_numpy(reference(x, x)), atol=1e-5)
    with devices.assume(FLOAT32_GPU), warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer and kernel
        layer(x, x)
    monkeypatch.setenv(dispatch.FALLBACK_ENV_VAR, "0")
    with devices.assume(FLOAT32_GPU), pytest.raises(RuntimeError, match="cuDNN said no"):
        layer(x, x)


# -- PyTorch on a CPU: inference on compiled FlexAttention (issue 20) -------------------


def test_the_plan_takes_flex_attention_on_a_cpu_only_where_no_gradient_is_needed():
    # Compiled FlexAttention has a forward pass only on a CPU (torch 2.13).
    components = Components(scores.ScaledDot(), (), PATTERNS["local_causal_global"],
                            normalizers.Softmax())  # fmt: skip
    facts = dict(query_length=1000, key_length=1000, head_dim=8)
    cpu = devices.Machine("torch", "cpu")
    assert cpu.flex_attention_forward and not cpu.flex_attention_is_fast
    inference = dispatch.plan(components, machine=cpu, needs_grad=False, **facts)
    assert (inference.path, inference.kernel) == ("native", "torch_flex_attention")
    assert dispatch.plan(components, machine=cpu, **facts).path != "native"  # needs_grad
    small = dict(facts, query_length=300, key_length=300)  # 3 x 3 blocks: not worth compiling
    assert dispatch.plan(components, machine=cpu, needs_grad=False, **small).path != "native"
    no_flex = devices.Machine("torch", "cpu", flex_attention=False)
    assert dispatch.plan(components, machine=no_flex, needs_grad=False, **facts).path != "native"
    jax_cpu = devices.Machine("jax", "cpu")
    assert not jax_cpu.flex_attention_forward
    assert dispatch.plan(components, machine=jax_cpu, needs_grad=False, **facts).path != "native"


@torch_only
def test_cpu_inference_runs_compiled_flex_attention_and_equals_the_dense_path(monkeypatch):
    import torch

    if native.flex_attention_is_fast():
        pytest.skip("a CUDA device is visible")
    compiled = []
    original = native._compiled_flex_attention

    def spy():
        compiled.append(True)
        return original()

    monkeypatch.setattr(native, "_compiled_flex_attention", spy)
    rng = np.random.default_rng(5)
    fast, slow = _pair(num_heads=2, key_dim=8, pattern=PATTERNS["local_causal_global"])
    x = rng.normal(size=(1, 1000, 16)).astype("float32")  # 1000: blocks of 128 cut short
    fast.build(x.shape, x.shape)
    slow.build(x.shape, x.shape)
    slow.set_weights(fast.get_weights())
    assert dispatch.Call.of(dispatch.Heads(*[ops.zeros((1, 2, 1, 4))] * 3)).needs_grad
    with torch.no_grad():
        got = ops.convert_to_numpy(fast(x, x))
        assert not dispatch.Call.of(dispatch.Heads(*[ops.zeros((1, 2, 1, 4))] * 3)).needs_grad
    assert (fast.last_path, fast.last_plan.kernel) == ("native", "torch_flex_attention")
    assert fast.last_plan.fallback_from is None and compiled  # torch.compile'd, not eager
    want = ops.convert_to_numpy(slow(x, x))
    assert slow.last_path != "native"
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    # With autograd on (training), the same layer takes a path with a backward pass.
    out = fast(x, x)
    assert fast.last_path != "native"
    np.testing.assert_allclose(ops.convert_to_numpy(out.detach()), want, atol=2e-5, rtol=1e-4)


@torch_only
def test_an_export_traces_a_portable_path(flex_here):
    # torch.export (what Keras's ONNX export uses on PyTorch) has no op for
    # FlexAttention: while exporting, the plan takes the block-sparse path.
    import torch

    layer = keras_attn.Attention(num_heads=2, key_dim=8, pattern=patterns.Local(8, causal=True))
    x = np.random.default_rng(0).normal(size=(1, 512, 16)).astype("float32")
    eager = ops.convert_to_numpy(layer(x))
    assert layer.last_plan.kernel == "torch_flex_attention"

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    exported = torch.export.export(Model(), (torch.tensor(x),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "flex" in t], targets
    assert "aten.index_select.default" in targets  # the block-sparse gathers
    got = exported.module()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, eager, atol=2e-5, rtol=1e-4)
