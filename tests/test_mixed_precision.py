"""Mixed precision: no NaN or inf, zeros for fully masked rows, float32 normalization."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import normalizers
from keras_attn import plugins
from keras_attn.positions import make_positions

POLICIES = ["mixed_float16", "mixed_bfloat16"]
# Worst relative rounding of one cast from float32 (half an ulp), per compute dtype.
HALF_ULP = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
# Tolerance against the same layer in float32 (several roundings along the way).
TOLERANCE = {"float16": 1e-2, "bfloat16": 6e-2}

RNG = np.random.default_rng(3)
X = RNG.standard_normal((2, 6, 8)).astype("float32")
C = RNG.standard_normal((2, 7, 8)).astype("float32")
QMASK = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
VMASK = np.array([[1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], bool)  # batch 1: no key


def twin_in_float32(layer, make, inputs, **call_kwargs):
    """The same layer in float32, with the same weights."""
    twin = make(dtype="float32")
    twin(*inputs, **call_kwargs)
    twin.set_weights(layer.get_weights())
    return twin


def check_finite_and_empty_rows(output, weights, compute_dtype):
    assert keras.backend.standardize_dtype(output.dtype) == compute_dtype
    output = ops.convert_to_numpy(ops.cast(output, "float32"))
    assert np.isfinite(output).all()
    if weights is not None:
        assert keras.backend.standardize_dtype(weights.dtype) == compute_dtype
        weights = ops.convert_to_numpy(ops.cast(weights, "float32"))
        assert np.isfinite(weights).all()
        np.testing.assert_array_equal(weights[1], 0.0)  # batch 1 has no allowed key
        np.testing.assert_array_equal(weights[0, :, :, 4:], 0.0)  # masked keys
    return output, weights


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("normalizer", ["softmax", "hard", "topk", "sparsemax"])
def test_dense_path_for_each_normalizer(policy, normalizer):
    keras.config.set_dtype_policy(policy)
    compute_dtype = keras.config.dtype_policy().compute_dtype

    def make(**kwargs):
        return keras_attn.Attention(num_heads=2, normalizer=normalizer, pattern="causal", **kwargs)

    layer = make()
    call_kwargs = dict(query_mask=QMASK, value_mask=VMASK, return_attention_scores=True)
    output, weights = layer(X, C, **call_kwargs)
    assert layer.last_path == "dense"
    output, weights = check_finite_and_empty_rows(output, weights, compute_dtype)

    twin = twin_in_float32(layer, make, (X, C), **call_kwargs)
    expected, expected_weights = (ops.convert_to_numpy(t) for t in twin(X, C, **call_kwargs))
    rows = np.ones(weights.shape[:-1], bool)
    if normalizer == "hard":
        # Near-ties may pick another key in low precision: compare the clear rows only.
        soft = keras_attn.Attention(num_heads=2, pattern="causal", dtype="float32")
        soft(X, C)
        soft.set_weights(twin.get_weights())
        _, p = soft(X, C, **call_kwargs)
        top2 = np.sort(ops.convert_to_numpy(p), -1)[..., -2:]
        empty = top2[..., 1] == 0
        rows = (top2[..., 1] > 1.1 * top2[..., 0]) | empty
        assert rows[~empty].mean() > 0.5
    np.testing.assert_allclose(weights[rows], expected_weights[rows], atol=TOLERANCE[compute_dtype])
    clear_queries = rows.all(axis=1)  # (B, Tq): every head clear
    np.testing.assert_allclose(
        output[clear_queries], expected[clear_queries], atol=3 * TOLERANCE[compute_dtype]
    )


@pytest.mark.parametrize("policy", POLICIES)
def test_fused_path(policy):
    keras.config.set_dtype_policy(policy)
    compute_dtype = keras.config.dtype_policy().compute_dtype

    def make(**kwargs):
        return keras_attn.MultiHeadAttention(num_heads=2, key_dim=4, **kwargs)

    layer = make()
    call_kwargs = dict(query_mask=QMASK, value_mask=VMASK, use_causal_mask=True)
    output = layer(X, C, **call_kwargs)
    assert layer.last_path == "fused"
    output, _ = check_finite_and_empty_rows(output, None, compute_dtype)
    dense = ops.convert_to_numpy(
        ops.cast(layer(X, C, return_attention_scores=True, **call_kwargs)[0], "float32")
    )
    twin = twin_in_float32(layer, make, (X, C), **call_kwargs)
    expected = ops.convert_to_numpy(twin(X, C, **call_kwargs))
    # Fully masked rows give an output of just the bias, as in float32.
    bias = ops.convert_to_numpy(twin.weights[-1])
    np.testing.assert_allclose(output[1], np.broadcast_to(bias, output[1].shape), atol=1e-2)
    np.testing.assert_allclose(output, expected, atol=3 * TOLERANCE[compute_dtype])
    np.testing.assert_allclose(output, dense, atol=3 * TOLERANCE[compute_dtype])


@pytest.mark.parametrize("policy", POLICIES)
def test_large_logits_do_not_overflow(policy):
    # Logits far beyond float16's range of exp: masking constants and the softmax must
    # stay finite.
    keras.config.set_dtype_policy(policy)
    layer = keras_attn.Attention(num_heads=1, score="dot", normalizer="softmax")
    big = 30.0 * X
    output, weights = layer(big, value_mask=VMASK[:, :6], return_attention_scores=True)
    output = ops.convert_to_numpy(ops.cast(output, "float32"))
    weights = ops.convert_to_numpy(ops.cast(weights, "float32"))
    assert np.isfinite(output).all() and np.isfinite(weights).all()
    np.testing.assert_allclose(weights[0].sum(-1), 1.0, atol=1e-2)
    np.testing.assert_array_equal(weights[1], 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_softmax_is_computed_in_float32(dtype):
    # Long rows: a softmax computed in low precision accumulates errors far beyond one
    # rounding of the float32 result; computed in float32, each weight is off by at
    # most half an ulp of `dtype`.
    logits = ops.cast(RNG.standard_normal((4, 512)) * 3, dtype)
    exact = ops.convert_to_numpy(ops.cast(logits, "float32")).astype(np.float64)
    exact = np.exp(exact - exact.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    bound = (HALF_ULP[dtype] + 1e-6) * exact + 1e-7

    weights = normalizers.Softmax(dtype=f"mixed_{dtype}")(logits)
    assert keras.backend.standardize_dtype(weights.dtype) == dtype
    error = np.abs(ops.convert_to_numpy(ops.cast(weights, "float32")) - exact)
    assert (error <= bound).all()

    # The bound can fail: a softmax computed in `dtype` throughout breaks it.
    e = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True))
    low = ops.convert_to_numpy(ops.cast(e / ops.sum(e, axis=-1, keepdims=True), "float32"))
    assert not (np.abs(low - exact) <= bound).all()


# -- every component: low-precision outputs and gradients close to float32's -----------

# Worst error against float32, relative to the largest float32 value (several roundings
# along the way, never a gradient summed in low precision).
COMPONENT_TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}
COMPONENT_ARGS = {
    "relative_position": {"num_heads": 2, "embeddings_initializer": "random_normal"},
    "topk": {"k": 3},
    "cosine": {"trainable_scale": True},
}


def builtin_names(kind):
    return [e.name for e in plugins.entries(kind) if e.distribution == "keras_attn"]


def outputs_and_grads(layer, fn, inputs, upstream):
    """``fn(*inputs)`` as float32 numpy, and the gradients of ``sum(fn(*inputs) * upstream)``
    for every input and every trainable weight of `layer` (float32 numpy)."""
    variables = list(layer.trainable_variables)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            out = ops.cast(fn(*tensors), "float32")
            total = ops.sum(out * upstream)
        grads = tape.gradient(total, tensors + variables)
    elif backend == "jax":
        import jax

        def total(values, *tensors):
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                out = ops.cast(fn(*tensors), "float32")
            return ops.sum(out * upstream), out

        argnums = tuple(range(len(inputs) + 1))
        (_, out), grads = jax.value_and_grad(total, argnums=argnums, has_aux=True)(
            [v.value for v in variables], *inputs
        )
        grads = list(grads[1:]) + list(grads[0])
    elif backend == "torch":
        import torch

        tensors = [torch.tensor(x, requires_grad=True) for x in inputs]
        out = ops.cast(fn(*tensors), "float32")
        total = ops.sum(out * ops.convert_to_tensor(upstream))
        grads = torch.autograd.grad(total, tensors + [v.value for v in variables])
        out = out.detach()
    else:
        pytest.skip(f"no gradient helper for backend {backend}")
    return ops.convert_to_numpy(out), [ops.convert_to_numpy(ops.cast(g, "float32")) for g in grads]


def assert_close_to_float32(make, fn_of_layer, inputs, policy):
    """The component under `policy` against its float32 twin with the same weights."""
    compute_dtype = keras.DTypePolicy(policy).compute_dtype
    low, exact = make(dtype=policy), make(dtype="float32")
    fn_of_layer(exact)(*inputs)
    fn_of_layer(low)(*inputs)
    low.set_weights(exact.get_weights())
    upstream = RNG.standard_normal(ops.convert_to_numpy(fn_of_layer(exact)(*inputs)).shape).astype(
        "float32"
    )
    want, want_grads = outputs_and_grads(exact, fn_of_layer(exact), inputs, upstream)
    got, got_grads = outputs_and_grads(low, fn_of_layer(low), inputs, upstream)
    tol = COMPONENT_TOLERANCE[compute_dtype]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())
    assert len(got_grads) == len(want_grads) == len(inputs) + len(exact.trainable_variables)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, atol=tol * np.abs(w).max() + 1e-6)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", builtin_names("score"))
def test_every_score_in_low_precision_is_close_to_float32(name, policy):
    def make(**kwargs):
        return plugins.resolve("score", {"name": name, "config": COMPONENT_ARGS.get(name, {})},
                               **kwargs)  # fmt: skip

    q = RNG.standard_normal((2, 2, 5, 8)).astype("float32")
    k = RNG.standard_normal((2, 2, 6, 8)).astype("float32")
    assert_close_to_float32(make, lambda layer: layer, (q, k), policy)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", builtin_names("score_mod"))
@pytest.mark.parametrize("length", [6, 1025])
def test_every_score_mod_in_low_precision_is_close_to_float32(name, policy, length):
    # At T = 1025, a relative-position table read in bfloat16 summed its gradient over
    # a million pairs in bfloat16: off by 0.6-1.8 of its largest entry.
    def make(**kwargs):
        config = {"name": name, "config": COMPONENT_ARGS.get(name, {})}
        return plugins.resolve("score_mod", config, **kwargs)

    positions = make_positions(length, length, 2)
    logits = (RNG.standard_normal((1, 2, length, length)) * 4).astype("float32")
    assert_close_to_float32(
        make, lambda layer: lambda x: layer(x, positions=positions), (logits,), policy
    )


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", builtin_names("normalizer"))
def test_every_normalizer_in_low_precision_is_close_to_float32(name, policy):
    # Rows with clear gaps between logits, so that rounding changes no argmax or top-k.
    keys = 12
    order = np.argsort(RNG.random((2, 2, 5, keys)), -1)
    # (Spacing 0.7: sparsemax's support test `1 + r z_r > sum` is never near a tie.)
    logits = (order * 0.7 + RNG.random(order.shape) * 0.05).astype("float32")
    mask = RNG.random((2, 1, 5, keys)) > 0.3
    mask[0, 0, 0] = False  # a row with no allowed key

    def make(**kwargs):
        config = {"name": name, "config": COMPONENT_ARGS.get(name, {})}
        return plugins.resolve("normalizer", config, **kwargs)

    assert_close_to_float32(make, lambda layer: lambda x: layer(x, mask=mask), (logits,), policy)


def test_cosine_with_a_trainable_scale_trains_under_mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")

    def make(**kwargs):
        score = {"name": "cosine", "config": {"trainable_scale": True}}
        return keras_attn.Attention(num_heads=2, score=score, **kwargs)

    layer = make()
    output = layer(X, C)
    assert keras.backend.standardize_dtype(output.dtype) == "float16"
    assert keras.backend.standardize_dtype(layer.score.log_scale.dtype) == "float32"
    expected = ops.convert_to_numpy(twin_in_float32(layer, make, (X, C))(X, C))
    output = ops.convert_to_numpy(ops.cast(output, "float32"))
    np.testing.assert_allclose(output, expected, atol=3 * TOLERANCE["float16"])


@pytest.mark.parametrize("block_sparse, path", [(False, "fused"), (True, "block_sparse")])
@pytest.mark.parametrize("scores", [False, True])
def test_a_float16_layer_with_huge_logits_matches_float32(block_sparse, path, scores):
    # Activations large enough that q·k/√d passes 65504, and a padding key far larger:
    # under mixed_float16 every path gives the float32 layer's answer, not NaN.
    keras.config.set_dtype_policy("mixed_float16")

    def make(**kwargs):
        return keras_attn.Attention(
            num_heads=2, pattern="causal", block_sparse=block_sparse, block_size=4, **kwargs
        )

    x = (RNG.standard_normal((2, 8, 8)) * 60).astype("float32")
    x[0, -1] = 4000.0  # a padded position with a huge value
    mask = np.ones((2, 8), bool)
    mask[0, -1] = False
    layer = make()
    call_kwargs = dict(query_mask=mask, value_mask=mask, return_attention_scores=scores)
    result = layer(x, x, **call_kwargs)
    assert layer.last_path == ("dense" if scores and not block_sparse else path)
    twin = twin_in_float32(layer, make, (x, x), **call_kwargs)
    expected = twin(x, x, **call_kwargs)
    output, want = (result[0], expected[0]) if scores else (result, expected)
    output = ops.convert_to_numpy(ops.cast(output, "float32"))
    want = ops.convert_to_numpy(want)
    assert np.isfinite(output).all()
    logits = np.abs(np.einsum("btc,chd->bhtd", x, ops.convert_to_numpy(twin.weights[0])))
    assert logits.max() ** 2 / 2 > 65504  # the products do overflow float16
    np.testing.assert_allclose(output, want, atol=5e-2 * np.abs(want).max())
