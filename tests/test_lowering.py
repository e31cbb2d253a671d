"""Every accelerator kernel lowers for its real target, on this CPU (issue 20).

JAX lowers a function for a platform it does not run on with
``jax.export.export(jax.jit(f), platforms=[...])``: the Pallas block-sparse kernels
(forward, dq, dk/dv) go through Triton for ``cuda``, Splash attention through Mosaic
for ``tpu``. A kernel that lowers here can still fail where it is compiled further
(Triton to PTX, Mosaic to TPU code), but the errors of JAX's own lowering (block
shapes, dtypes, shared memory, leaked tracers) show up here, in CI, without the
hardware. The kernels are built in compiled mode (``interpret=False``) with the
shapes and dtypes of the benchmarks and examples: head dims 32-128, bfloat16 and
float16 (float32 for Splash, which takes no float16), odd lengths, grouped-query heads
repeated as the layer passes them, causal / local / local|global patterns, a data
mask. Each export also differentiates, so the backward kernels lower too.
"""

import re

import keras
import numpy as np
import pytest

from keras_attn import block_layout
from keras_attn import devices
from keras_attn import native
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import scores
from keras_attn.components import Components

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="jax.export lowers JAX functions only"
)

if keras.backend.backend() == "jax":
    jax = pytest.importorskip("jax")
    pytest.importorskip("jax.experimental.pallas")
    from jax import export

    from keras_attn import pallas

WINDOW = 256  # benchmarks/accelerators.py's window
PATTERNS = {
    "causal": patterns.Causal(),
    "local": patterns.Local(WINDOW, causal=True),
    "local_two_sided": patterns.Local(WINDOW),
    "local_global": patterns.Local(WINDOW, causal=True) | patterns.GlobalTokens(1),
}


def _components(pattern):
    return Components(scores.ScaledDot(), (), pattern, normalizers.Softmax())


def _with_gradient(attention):
    """``(output, (dq, dk, dv))`` of `attention`: the forward and backward kernels."""

    def loss(q, k, v):
        output = attention(q, k, v)
        return (output.astype("float32") ** 2).sum(), output

    def both(q, k, v):
        (_, output), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return output, grads

    return both


def _export(function, structs, platform, custom_call=None):
    checks = [] if custom_call is None else [export.DisabledSafetyCheck.custom_call(custom_call)]
    exported = export.export(jax.jit(function), platforms=[platform], disabled_checks=checks)(
        *structs
    )
    assert exported.platforms == (platform,)
    return exported, exported.mlir_module()


def _repeat_heads(k, groups):
    return k if groups == 1 else jax.numpy.repeat(k, groups, axis=1)


# -- Pallas block-sparse kernels for CUDA, through Triton ---------------------------------


@pytest.mark.parametrize(
    "depth, dtype, length, pattern, kv_heads, masked",
    [
        (32, "bfloat16", 1000, "local", 4, False),  # the examples' head dim
        (64, "bfloat16", 8192, "local", 4, False),  # the benchmark's case (H=4 here)
        (64, "float16", 1000, "local_global", 2, True),  # GQA, padding mask
        (128, "bfloat16", 777, "local_two_sided", 1, False),
        (128, "float16", 1000, "causal", 4, True),
    ],
)
def test_pallas_kernels_lower_for_cuda_through_triton(
    depth, dtype, length, pattern, kv_heads, masked
):
    heads, groups = 4, 4 // kv_heads
    pattern = PATTERNS[pattern]
    components = _components(pattern)
    layout = block_layout.block_layout(pattern, length, length, 128, 0)
    assert pallas.applies(components, layout, depth)

    def attention(q, k, v, key_mask=None):
        # The layer hands the kernel key/value heads repeated to H: (B, H, T, D).
        k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Tk)
        return pallas.block_sparse_attention(
            q, k, v, layout, components, mask=mask, interpret=False
        )

    structs = [
        jax.ShapeDtypeStruct((2, heads, length, depth), dtype),
        jax.ShapeDtypeStruct((2, kv_heads, length, depth), dtype),
        jax.ShapeDtypeStruct((2, kv_heads, length, depth), dtype),
    ]
    function = _with_gradient(attention)
    if masked:
        structs.append(jax.ShapeDtypeStruct((2, length), "bool"))
        function = _with_gradient_and_mask(attention)
    exported, module = _export(function, structs, "cuda", "__gpu$xla.gpu.triton")
    kernels = re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "(\w+)"', module)
    assert sorted(kernels) == sorted(
        [pallas.KERNEL, pallas.KERNEL + "_dq", pallas.KERNEL + "_dkdv"]
    )
    assert "tt.dot" in module or "\\00dot\\00" in module  # Triton IR with its matmuls
    output, grads = exported.out_avals[0], exported.out_avals[1:]
    assert (output.shape, str(output.dtype)) == ((2, heads, length, depth), dtype)
    assert [g.shape for g in grads] == [s.shape for s in structs[:3]]


def _with_gradient_and_mask(attention):
    def function(q, k, v, key_mask):
        return _with_gradient(lambda q, k, v: attention(q, k, v, key_mask))(q, k, v)

    return function


# -- Splash attention for TPU, through Mosaic ---------------------------------------------


@pytest.mark.parametrize(
    "depth, dtype, length, pattern, kv_heads",
    [
        (64, "bfloat16", 1000, "local", 8),  # heads repeated by the layer
        (128, "bfloat16", 1000, "local_global", 2),  # splash groups the heads itself
        (64, "float32", 8192, "local", 8),
        (32, "bfloat16", 777, "local_two_sided", 8),
    ],
)
def test_splash_attention_lowers_for_tpu(depth, dtype, length, pattern, kv_heads):
    heads = 8
    pattern = PATTERNS[pattern]

    def attention(q, k, v):
        return native.splash_attention(
            q, k, v, pattern, scale=depth**-0.5, interpret=False
        )  # (B, T, H, D) heads, as the layer passes them

    structs = [
        jax.ShapeDtypeStruct((2, length, heads, depth), dtype),
        jax.ShapeDtypeStruct((2, length, kv_heads, depth), dtype),
        jax.ShapeDtypeStruct((2, length, kv_heads, depth), dtype),
    ]
    # Forward alone first, then with the gradient: the second trace reuses the
    # cached kernel (it once held tracers of the first and failed there).
    _, module = _export(attention, structs, "tpu")
    assert re.findall(r'kernel_name = "(\w+)"', module) == ["splash_mha_fwd_segmented_no_residuals"]
    exported, module = _export(_with_gradient(attention), structs, "tpu")
    assert sorted(re.findall(r'kernel_name = "(\w+)"', module)) == [
        "splash_mha_dkv_segmented_no_residuals",
        "splash_mha_dq_segmented_no_residuals",
        "splash_mha_fwd_segmented_residuals",
    ]
    assert "tpu_custom_call" in module
    assert exported.out_avals[0].shape == (2, length, heads, depth)


def test_a_cached_splash_kernel_serves_a_second_trace():
    # Interpret mode on this CPU: two jitted functions share the cached kernel.
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 128, 1, 16)).astype("float32") for _ in range(3))
    pattern = patterns.Local(16, causal=True)

    def attention(q, k, v):
        return native.splash_attention(q, k, v, pattern, scale=0.25, interpret=True)

    first = np.asarray(jax.jit(attention)(q, k, v))
    second = np.asarray(jax.jit(lambda q, k, v: attention(q, k, v) * 2.0)(q, k, v))
    logits = 0.25 * np.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0])
    allowed = (np.arange(128)[:, None] - np.arange(128)[None, :] >= 0) & (
        np.arange(128)[:, None] - np.arange(128)[None, :] < 16
    )
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    want = (weights / weights.sum(axis=1, keepdims=True)) @ v[0, :, 0]
    np.testing.assert_allclose(first[0, :, 0], want, atol=2e-5)
    np.testing.assert_allclose(second[0, :, 0], 2 * want, atol=4e-5)


# -- cuDNN's sliding window, with the plan's arguments ------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cudnn_window_with_the_plans_arguments(dtype):
    # JAX does not export a cuDNN call on a host without cuDNN (JAX 0.10): it checks
    # the arguments, then raises "cuDNN is not detected". Any other error (a window
    # cuDNN refuses, a dtype) fails; should JAX ever lower it here, the custom call
    # must be cuDNN's.
    from keras_attn import dispatch

    length, heads, depth = 1000, 8, 64
    plan = dispatch.plan(
        _components(PATTERNS["local"]),
        query_length=length,
        key_length=length,
        head_dim=depth,
        dtype=dtype,
        machine=devices.Machine("jax", "gpu"),
    )
    assert plan.kernel == "jax_cudnn"
    left, right = plan.window

    def attention(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, scale=plan.scale, is_causal=right == 0, local_window_size=(left, right),
            implementation="cudnn",
        )  # fmt: skip

    struct = jax.ShapeDtypeStruct((2, length, heads, depth), dtype)
    try:
        _, module = _export(_with_gradient(attention), [struct] * 3, "cuda")
    except RuntimeError as error:
        assert "cuDNN is not detected" in str(error)
    else:
        assert "cudnn" in module
