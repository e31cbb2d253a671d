"""Normalizers against numpy references: softmax, hard (straight-through, Gumbel), topk, sparsemax."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import ops

import keras_attn
from keras_attn import normalizers
from keras_attn import plugins
from keras_attn.testing import value_and_grads

NAMES = ["softmax", "hard", "topk", "sparsemax"]


def _grad(fn, x):
    """The gradient of the scalar ``fn(x)`` at ``x``, by the backend's own autodiff."""
    return value_and_grads(fn, x)[1][0]


def _np(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


def _data(shape=(2, 3, 4, 6), seed=0, density=0.6):
    """Random logits and a random mask with one fully masked row and one full row."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=shape).astype("float32")
    mask = rng.random(shape) < density
    mask[..., 0, :] = False  # a fully masked row
    mask[..., 1, :] = True  # a row with every key allowed
    return logits, mask


# numpy references, row by row over the allowed keys only.


def _rowwise(fn, logits, mask):
    logits = logits.astype("float64")
    mask = np.broadcast_to(mask, logits.shape)
    out = np.zeros_like(logits)
    for index in np.ndindex(logits.shape[:-1]):
        allowed = mask[index]
        if allowed.any():
            out[index][allowed] = fn(logits[index][allowed])
    return out


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_softmax(logits, mask):
    return _rowwise(_softmax, logits, mask)


def ref_hard(logits, mask):
    def one_hot(z):
        out = np.zeros_like(z)
        out[np.argmax(z)] = 1.0
        return out

    return _rowwise(one_hot, logits, mask)


def ref_topk(logits, mask, k):
    def topk(z):
        kth = np.sort(z)[::-1][min(k, len(z)) - 1]
        keep = z >= kth  # ties at the k-th value are all kept
        out = np.zeros_like(z)
        out[keep] = _softmax(z[keep])
        return out

    return _rowwise(topk, logits, mask)


def _sparsemax(z):
    # Martins & Astudillo (2016), Algorithm 1: sort, find the support size k(z),
    # threshold tau, then clip.
    z_sorted = np.sort(z)[::-1]
    cumsum = np.cumsum(z_sorted)
    k = np.arange(1, len(z) + 1)
    support = k[1 + k * z_sorted > cumsum][-1]
    tau = (cumsum[support - 1] - 1) / support
    return np.maximum(z - tau, 0.0)


def ref_sparsemax(logits, mask):
    return _rowwise(_sparsemax, logits, mask)


def test_references_on_hand_worked_rows():
    z = np.array([[1.0, 2.0, 2.0, 0.0]])
    mask = np.array([[True, True, True, False]])
    np.testing.assert_allclose(ref_topk(z, mask, 2), [[0.0, 0.5, 0.5, 0.0]])
    np.testing.assert_allclose(ref_hard(z, mask), [[0.0, 1.0, 0.0, 0.0]])
    # sparsemax([0.5, 0.2, -1]) = [0.65, 0.35, 0]: tau = (0.7 - 1) / 2 = -0.15.
    np.testing.assert_allclose(_sparsemax(np.array([0.5, 0.2, -1.0])), [0.65, 0.35, 0.0])
    np.testing.assert_allclose(_sparsemax(np.array([5.0, 0.0, 0.0])), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(_sparsemax(np.zeros(4)), [0.25] * 4)


# Numbers.


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (5, 7), (3, 2, 5)])
def test_softmax(shape):
    logits, mask = _data(shape)
    out = _np(normalizers.Softmax()(logits, mask=mask))
    np.testing.assert_allclose(out, ref_softmax(logits, mask), rtol=1e-5, atol=1e-6)


def test_softmax_without_mask_is_plain_softmax():
    logits, _ = _data((3, 5))
    out = _np(normalizers.Softmax()(logits))
    np.testing.assert_allclose(out, ref_softmax(logits, np.ones_like(logits, bool)), rtol=1e-5)


def test_mask_broadcasts_to_the_logits():
    logits, _ = _data((2, 3, 4, 6))
    mask = np.tril(np.ones((4, 6), bool))  # (Tq, Tk) for (B, H, Tq, Tk) logits
    for name in NAMES:
        out = _np(plugins.resolve("normalizer", name)(logits, mask=mask))
        assert out.shape == logits.shape
        assert np.all(out[..., ~mask] == 0.0)
    np.testing.assert_allclose(
        _np(normalizers.Softmax()(logits, mask=mask)), ref_softmax(logits, mask), rtol=1e-5
    )


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (5, 7)])
def test_hard_forward_is_one_hot_on_best_allowed_key(shape):
    logits, mask = _data(shape)
    out = _np(normalizers.Hard()(logits, mask=mask))
    np.testing.assert_array_equal(out, ref_hard(logits, mask))
    rows = out.reshape(-1, shape[-1])
    allowed = np.broadcast_to(mask, shape).reshape(-1, shape[-1]).any(-1)
    assert set(np.unique(rows)) <= {0.0, 1.0}
    np.testing.assert_array_equal(rows.sum(-1), allowed.astype("float32"))


def test_hard_ignores_a_larger_masked_logit():
    logits = np.array([[9.0, 1.0, 3.0, 2.0]], "float32")
    mask = np.array([[False, True, True, True]])
    np.testing.assert_array_equal(
        _np(normalizers.Hard()(logits, mask=mask)), [[0.0, 0.0, 1.0, 0.0]]
    )


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_hard_gradient_is_the_softmax_gradient(temperature):
    logits, mask = _data((2, 4, 5), seed=1)
    weights = np.random.default_rng(2).normal(size=logits.shape).astype("float32")
    hard = normalizers.Hard(temperature=temperature)
    soft = normalizers.Softmax()

    def hard_loss(x):
        return ops.sum(ops.multiply(hard(x, mask=mask), weights))

    def soft_loss(x):
        return ops.sum(ops.multiply(soft(x / temperature, mask=mask), weights))

    g_hard = _grad(hard_loss, logits)
    g_soft = _grad(soft_loss, logits)
    np.testing.assert_allclose(g_hard, g_soft, rtol=1e-4, atol=1e-6)
    # It trains: every row with two or more allowed keys gets a gradient.
    rows = np.broadcast_to(mask, logits.shape).sum(-1) >= 2
    assert np.all(np.abs(g_hard).sum(-1)[rows] > 0)
    # And nothing flows to masked-out logits.
    assert np.all(g_hard[~np.broadcast_to(mask, logits.shape)] == 0.0)


def test_gumbel_hard_trains():
    logits, mask = _data((2, 4, 5), seed=8)
    weights = np.random.default_rng(3).normal(size=logits.shape).astype("float32")
    hard = normalizers.Hard(gumbel=True, seed=0)
    g = _grad(lambda x: ops.sum(ops.multiply(hard(x, mask=mask, training=True), weights)), logits)
    full_mask = np.broadcast_to(mask, logits.shape)
    assert np.all(np.isfinite(g))
    assert np.all(g[~full_mask] == 0.0)
    rows = full_mask.sum(-1) >= 2
    assert np.all(np.abs(g).sum(-1)[rows] > 0)
    # A softmax gradient (here of the noisy logits) is blind to a shift of the row.
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-5)


def _picks(weights):
    return np.argmax(weights.reshape(-1, weights.shape[-1]), axis=-1)


def test_gumbel_noise_samples_allowed_keys_while_training():
    rows, keys = 300, 6
    logits = np.zeros((rows, keys), "float32")
    mask = np.array([True, False, True, True, False, True])
    hard = normalizers.Hard(gumbel=True, seed=1)

    out = _np(hard(logits, mask=mask, training=True))
    np.testing.assert_array_equal(out.sum(-1), 1.0)  # one-hot ...
    assert set(np.unique(out)) == {0.0, 1.0}
    assert np.all(out[:, ~mask] == 0.0)  # ... on allowed keys only
    picks = _picks(out)
    assert set(picks) == {0, 2, 3, 5}  # equal logits: every allowed key gets picked

    # The noise moves on from call to call, and differs between seeds.
    assert not np.array_equal(_picks(_np(hard(logits, mask=mask, training=True))), picks)
    other = normalizers.Hard(gumbel=True, seed=2)
    assert not np.array_equal(_picks(_np(other(logits, mask=mask, training=True))), picks)

    # Inference is the plain argmax, as without noise.
    for training in (False, None):
        np.testing.assert_array_equal(
            _np(hard(logits, mask=mask, training=training)), ref_hard(logits, mask)
        )


def test_gumbel_max_samples_from_the_softmax():
    # The Gumbel-max trick: argmax(z + g) is distributed as softmax(z).
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.tile(np.log(probs).astype("float32"), (4000, 1))
    out = _np(normalizers.Hard(gumbel=True, seed=0)(logits, training=True))
    freq = np.bincount(_picks(out), minlength=4) / len(logits)
    np.testing.assert_allclose(freq, probs, atol=0.04)  # 5 standard errors


def test_hard_without_gumbel_ignores_training():
    logits, mask = _data((3, 5))
    hard = normalizers.Hard()
    np.testing.assert_array_equal(
        _np(hard(logits, mask=mask, training=True)), _np(hard(logits, mask=mask, training=False))
    )


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_topk(k):
    logits, mask = _data((2, 3, 5, 7), seed=3)
    out = _np(normalizers.TopK(k=k)(logits, mask=mask))
    np.testing.assert_allclose(out, ref_topk(logits, mask, k), rtol=1e-5, atol=1e-6)
    nonzero = (out > 0).sum(-1)
    allowed = np.broadcast_to(mask, logits.shape).sum(-1)
    np.testing.assert_array_equal(nonzero, np.minimum(allowed, k))  # no ties in random data


def test_topk_keeps_ties():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 1.0, 1.0, 1.0, 0.0]], "float32")
    out = _np(normalizers.TopK(k=2)(logits))
    np.testing.assert_allclose(out[0], [0, 1 / 3, 1 / 3, 0, 1 / 3], rtol=1e-6)
    e = np.exp([1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(out[1], [*(e / e.sum()), 0.0], rtol=1e-5)
    np.testing.assert_allclose(out, ref_topk(logits, np.ones_like(logits, bool), 2), rtol=1e-5)


def test_topk_with_k_above_the_length_is_softmax():
    logits, mask = _data((3, 4, 5))
    np.testing.assert_allclose(
        _np(normalizers.TopK(k=50)(logits, mask=mask)), ref_softmax(logits, mask), rtol=1e-5
    )


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_sparsemax(scale):
    logits, mask = _data((2, 3, 5, 7), seed=4)
    logits = logits * scale
    out = _np(normalizers.Sparsemax()(logits, mask=mask))
    np.testing.assert_allclose(out, ref_sparsemax(logits, mask), rtol=1e-5, atol=1e-6)
    allowed = np.broadcast_to(mask, logits.shape).any(-1)
    np.testing.assert_allclose(out.sum(-1), allowed.astype("float32"), atol=1e-5)
    if scale == 5.0:
        assert np.any((out == 0) & np.broadcast_to(mask, logits.shape))  # sparse


# What every normalizer guarantees.


@pytest.mark.parametrize("name", NAMES)
def test_masked_pairs_get_exactly_zero(name):
    logits, mask = _data((2, 3, 4, 6), seed=5)
    logits[~mask] = 1e4  # masked logits that would otherwise win
    out = _np(plugins.resolve("normalizer", name)(logits, mask=mask, training=False))
    assert np.all(out[~mask] == 0.0)
    assert np.all(out >= 0)
    allowed = mask.any(-1)
    np.testing.assert_allclose(out.sum(-1), allowed.astype("float32"), atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "normalizer",
    [
        normalizers.Softmax(),
        normalizers.Hard(),
        normalizers.Hard(gumbel=True, seed=0),
        normalizers.TopK(k=2),
        normalizers.Sparsemax(),
    ],
    ids=["softmax", "hard", "hard_gumbel", "topk", "sparsemax"],
)
def test_fully_masked_row_gives_zeros_not_nan(normalizer, training):
    logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype("float32")
    mask = np.ones((2, 3, 5), bool)
    mask[0, 1] = False
    mask[1] = False
    out = _np(normalizer(logits, mask=mask, training=training))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 1], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[0, [0, 2]].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", NAMES + ["hard_gumbel"])
def test_mixed_precision(name, dtype):
    keras.config.set_dtype_policy(f"mixed_{dtype}")
    if name == "hard_gumbel":
        normalizer = normalizers.Hard(gumbel=True, seed=0)
    else:
        normalizer = plugins.resolve("normalizer", name)
    rng = np.random.default_rng(0)
    # Large logits near the float16 limit: a softmax in float16 would overflow.
    logits = rng.normal(scale=2e4, size=(2, 4, 6)).clip(-6e4, 6e4)
    mask = rng.random((2, 4, 6)) < 0.6
    mask[:, 0] = False
    mask[:, 1] = True
    out = normalizer(ops.cast(logits, dtype), mask=mask, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    out = _np(out)
    assert np.all(np.isfinite(out))
    assert np.all(out[~mask] == 0.0)
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_allclose(out.sum(-1), mask.any(-1).astype("float32"), atol=2e-2)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite_on_fully_masked_rows(name):
    logits, mask = _data((2, 4, 5), seed=6)
    normalizer = plugins.resolve("normalizer", name)
    weights = np.random.default_rng(0).normal(size=logits.shape).astype("float32")
    g = _grad(lambda x: ops.sum(ops.multiply(normalizer(x, mask=mask), weights)), logits)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[..., 0, :], 0.0)  # the fully masked row


# Hypothesis properties, on a fixed shape (JAX compiles once per shape).

SHAPE = (3, 4, 6)
logits_strategy = hnp.arrays(
    "float32", SHAPE, elements=st.floats(-30, 30, width=32, allow_subnormal=False)
)
mask_strategy = hnp.arrays(bool, SHAPE)


def _allowed_rows(mask):
    return mask.any(-1)


@given(logits=logits_strategy, mask=mask_strategy)
def test_softmax_property(logits, mask):
    out = _np(normalizers.Softmax()(logits, mask=mask))
    assert np.all(out[~mask] == 0.0) and np.all(out >= 0)
    sums = out.sum(-1)
    np.testing.assert_allclose(sums[_allowed_rows(mask)], 1.0, atol=1e-5)
    np.testing.assert_array_equal(sums[~_allowed_rows(mask)], 0.0)
    np.testing.assert_allclose(out, ref_softmax(logits, mask), rtol=1e-4, atol=1e-6)


@given(logits=logits_strategy, mask=mask_strategy, training=st.booleans())
def test_hard_property(logits, mask, training):
    out = _np(normalizers.Hard(gumbel=training, seed=0)(logits, mask=mask, training=training))
    assert set(np.unique(out)) <= {0.0, 1.0}
    assert np.all(out[~mask] == 0.0)
    np.testing.assert_array_equal(out.sum(-1), _allowed_rows(mask).astype("float32"))
    if not training:
        best = np.where(mask, logits, -np.inf).max(-1, keepdims=True)
        assert np.all(logits[out == 1.0] == np.broadcast_to(best, SHAPE)[out == 1.0])


@given(logits=logits_strategy, mask=mask_strategy, k=st.integers(1, 7))
def test_topk_property(logits, mask, k):
    out = _np(normalizers.TopK(k=k)(logits, mask=mask))
    assert np.all(out[~mask] == 0.0)
    np.testing.assert_allclose(out.sum(-1)[_allowed_rows(mask)], 1.0, atol=1e-5)
    np.testing.assert_allclose(out, ref_topk(logits, mask, k), rtol=1e-4, atol=1e-6)


@given(logits=logits_strategy, mask=mask_strategy)
def test_sparsemax_property(logits, mask):
    out = _np(normalizers.Sparsemax()(logits, mask=mask))
    assert np.all(out[~mask] == 0.0) and np.all(out >= 0)
    sums = out.sum(-1)
    np.testing.assert_allclose(sums[_allowed_rows(mask)], 1.0, atol=1e-5)
    np.testing.assert_array_equal(sums[~_allowed_rows(mask)], 0.0)
    np.testing.assert_allclose(out, ref_sparsemax(logits, mask), rtol=1e-4, atol=1e-5)


# The registry (config round trips: tests/test_round_trips.py).


@pytest.mark.parametrize(
    "name,cls",
    [
        ("softmax", normalizers.Softmax),
        ("hard", normalizers.Hard),
        ("topk", normalizers.TopK),
        ("sparsemax", normalizers.Sparsemax),
    ],
)
def test_resolve_by_name(name, cls):
    assert plugins.get("normalizer", name) is cls
    normalizer = plugins.resolve("normalizer", name)
    assert type(normalizer) is cls and isinstance(normalizer, keras_attn.Normalizer)
    assert plugins.resolve("normalizer", normalizer) is normalizer


def test_resolve_wrong_kind_raises():
    from keras_attn import patterns
    from keras_attn import score_mods
    from keras_attn import scores

    for other in (scores.Dot(), score_mods.Softcap(), patterns.Causal()):
        with pytest.raises(keras_attn.ComponentKindError, match="Expected a normalizer"):
            plugins.resolve("normalizer", other)
    with pytest.raises(keras_attn.ComponentKindError):
        plugins.resolve("score", normalizers.Softmax())


# Bad arguments.


@pytest.mark.parametrize(
    "cls,kwargs,arg",
    [
        (normalizers.Hard, {"temperature": 0.0}, "temperature=0.0"),
        (normalizers.Hard, {"temperature": -1.0}, "temperature=-1.0"),
        (normalizers.TopK, {"k": 0}, "k=0"),
        (normalizers.TopK, {"k": -2}, "k=-2"),
        (normalizers.TopK, {"k": 2.0}, "k=2.0"),
        (normalizers.TopK, {"k": True}, "k=True"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, arg):
    with pytest.raises(ValueError, match=f"Received: {arg}"):
        cls(**kwargs)


# sink_softmax: softmax with a learned sink logit per head in the denominator.


def ref_sink_softmax(logits, mask, sinks):
    """Row by row over the allowed keys: exp(x) / (exp(sink of the head) + sum exp(x))."""
    logits = logits.astype("float64")
    mask = np.broadcast_to(mask, logits.shape)
    out = np.zeros_like(logits)
    for index in np.ndindex(logits.shape[:-1]):
        allowed = mask[index]
        if allowed.any():
            z = logits[index][allowed]
            sink = float(sinks[index[1]])
            top = max(z.max(), sink)
            e = np.exp(z - top)
            out[index][allowed] = e / (e.sum() + np.exp(sink - top))
    return out


def _sink_softmax(sinks, **kwargs):
    normalizer = normalizers.SinkSoftmax(**kwargs)
    normalizer.build((None, len(sinks), None, None))
    normalizer.sinks.assign(np.asarray(sinks, "float32"))
    return normalizer


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (2, 3, 2, 4, 6)])  # dense and slab layouts
def test_sink_softmax_matches_numpy(shape):
    logits, mask = _data(shape, seed=11)
    sinks = np.array([-1.0, 0.5, 3.0])
    out = _np(_sink_softmax(sinks)(logits, mask=mask))
    np.testing.assert_allclose(out, ref_sink_softmax(logits, mask, sinks), atol=1e-6)
    assert np.all(out[~mask] == 0.0)
    assert np.all(out.sum(-1) < 1.0)  # the sink keeps part of every row
    np.testing.assert_array_equal(out[..., 0, :], 0.0)  # the fully masked row, no NaN


def test_sink_softmax_gradients_reach_the_sinks_and_stay_finite():
    logits, mask = _data((2, 3, 4, 6), seed=12)
    sinks = np.array([0.0, 1.0, -1.0])
    normalizer = _sink_softmax(sinks)
    weights = np.random.default_rng(1).normal(size=logits.shape).astype("float32")
    _, (g, g_sinks) = value_and_grads(
        lambda x: ops.sum(ops.multiply(normalizer(x, mask=mask), weights)),
        logits,
        variables=normalizer.trainable_variables,
    )
    # By hand: with p the weights and p_s the sink's share of a row, the loss
    # sum(w * p) has d/dz_j = p_j (w_j - sum(w * p)) and d/ds = -p_s sum(w * p).
    p = ref_sink_softmax(logits, mask, sinks)  # (2, 3, 4, 6)
    weighted = (weights * p).sum(-1, keepdims=True)
    np.testing.assert_allclose(g, p * (weights - weighted), atol=1e-5)
    p_sink = np.where(mask.any(-1), 1.0 - p.sum(-1), 0.0)  # (2, 3, 4)
    expected_sinks = -(p_sink * weighted[..., 0]).sum(axis=(0, 2))  # (3,): one per head
    np.testing.assert_allclose(g_sinks, expected_sinks, atol=1e-5)
    np.testing.assert_array_equal(g[..., 0, :], 0.0)  # the fully masked row, no NaN


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sink_softmax_mixed_precision(dtype):
    normalizer = normalizers.SinkSoftmax(dtype=f"mixed_{dtype}")
    logits = np.random.default_rng(0).normal(scale=2e4, size=(2, 3, 4, 6)).clip(-6e4, 6e4)
    mask = np.ones(logits.shape, bool)
    mask[:, :, 0] = False
    out = normalizer(ops.cast(logits, dtype), mask=mask)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    assert keras.backend.standardize_dtype(normalizer.sinks.dtype) == "float32"
    out = _np(out)
    assert np.all(out[:, :, 0] == 0.0)
    sinks = _np(normalizer.sinks)  # zeros
    expected = ref_sink_softmax(_np(ops.cast(logits, dtype)), mask, sinks)
    np.testing.assert_allclose(out, expected, atol=1e-2)


def test_sink_softmax_with_local_windows_on_the_block_sparse_path():
    x = np.random.default_rng(2).normal(size=(2, 24, 8)).astype("float32")
    kwargs = dict(num_heads=2, key_dim=4, normalizer="sink_softmax", seed=0)
    pattern = {"name": "local", "config": {"window": 5, "causal": True}}
    sparse = keras_attn.Attention(pattern=pattern, block_sparse=True, block_size=4, **kwargs)
    dense = keras_attn.Attention(pattern=pattern, block_sparse=False, **kwargs)
    out_sparse, w_sparse = sparse(x, return_attention_scores=True)
    dense(x)
    dense.set_weights(sparse.get_weights())
    dense.normalizer.sinks.assign([2.0, -1.0])
    sparse.normalizer.sinks.assign([2.0, -1.0])
    out_sparse, w_sparse = sparse(x, return_attention_scores=True)
    out_dense, w_dense = dense(x, return_attention_scores=True)
    assert (sparse.last_path, dense.last_path) == ("block_sparse", "dense")
    np.testing.assert_allclose(_np(out_sparse), _np(out_dense), atol=1e-5)
    np.testing.assert_allclose(_np(w_sparse), _np(w_dense), atol=1e-6)
    assert sparse.normalizer.num_heads == 2


def test_sink_softmax_shared_sink_and_plugin_checks():
    from keras_attn import testing

    testing.check_normalizer(normalizers.SinkSoftmax(num_heads=1))


def test_sink_softmax_clear_errors():
    with pytest.raises(ValueError, match=r"Received: num_heads=0"):
        normalizers.SinkSoftmax(num_heads=0)
    normalizer = normalizers.SinkSoftmax(num_heads=3)
    with pytest.raises(ValueError, match=r"heads on axis 1.*Received: logits_shape=\(2, 4, 4, 6\)"):
        normalizer(np.zeros((2, 4, 4, 6), "float32"))
    normalizer.build((None, 3, None, None))
    with pytest.raises(ValueError, match=r"heads on axis 1.*Received: logits.shape=\(4, 6\)"):
        normalizer(np.zeros((4, 6), "float32"))
    with pytest.raises(ValueError, match="num_heads"):
        normalizers.SinkSoftmax()(np.zeros((4, 6), "float32"))
    layer = keras_attn.Attention(num_heads=2, normalizer=normalizers.SinkSoftmax(num_heads=3))
    with pytest.raises(ValueError, match=r"heads on axis 1"):
        layer(np.zeros((1, 4, 8), "float32"))


def test_sink_softmax_layer_outputs_and_weights_match_numpy():
    x = np.random.default_rng(3).normal(size=(2, 5, 8)).astype("float32")
    layer = keras_attn.Attention(num_heads=2, key_dim=4, normalizer="sink_softmax")
    layer(x)
    sinks = np.array([1.5, -0.5], "float32")
    layer.normalizer.sinks.assign(sinks)
    out, w = layer(x, use_causal_mask=True, return_attention_scores=True)
    wq, bq, wk, bk, wv, bv, wo, bo = [np.asarray(v, "float64") for v in layer.get_weights()[:8]]
    q = np.einsum("btc,chd->bhtd", x, wq) + bq[None, :, None]
    k = np.einsum("btc,chd->bhtd", x, wk) + bk[None, :, None]
    v = np.einsum("btc,chd->bhtd", x, wv) + bv[None, :, None]
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / 2.0
    causal = np.broadcast_to(np.tril(np.ones((5, 5), bool)), logits.shape)
    expected = ref_sink_softmax(logits, causal, sinks)
    np.testing.assert_allclose(_np(w), expected, atol=1e-5)
    reference = np.einsum("bhqk,bhkd,hde->bqe", expected, v, wo) + bo
    np.testing.assert_allclose(_np(out), reference, atol=1e-4)
