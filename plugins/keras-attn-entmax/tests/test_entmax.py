"""keras-attn-entmax against a numpy reference that finds the threshold by bisection."""

import keras
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops
from keras_attn_entmax import Entmax15
from keras_attn_entmax import entmax15

import keras_attn
from keras_attn import testing


def entmax15_reference(logits, mask=None):
    """Row by row: find tau with sum(max(z / 2 - tau, 0) ** 2) = 1 by bisection."""
    logits = np.asarray(logits, dtype=np.float64)
    mask = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(mask, logits.shape)
    out = np.zeros_like(logits)
    for index in np.ndindex(logits.shape[:-1]):
        allowed = mask[index]
        if not allowed.any():
            continue
        x = logits[index][allowed] / 2
        lo, hi = x.max() - 1, x.max()
        for _ in range(200):
            tau = (lo + hi) / 2
            if (np.maximum(x - tau, 0) ** 2).sum() > 1:
                lo = tau
            else:
                hi = tau
        out[index + (allowed,)] = np.maximum(x - tau, 0) ** 2
    return out


def gradient(f, z, v):
    """d sum(v * f(z)) / dz, by the backend's own autodiff."""
    _, (grad,) = testing.value_and_grads(lambda z: ops.sum(ops.multiply(f(z), v)), z)
    return grad


def test_registered_by_its_entry_point():
    entry = keras_attn.plugins.get_entry("normalizer", "entmax15")
    assert entry.cls is Entmax15
    assert (entry.distribution, entry.version) == ("keras-attn-entmax", "0.1.0")


def test_known_values():
    out = ops.convert_to_numpy(entmax15(np.array([[0.0, 0.0], [10.0, 0.0], [1.0, 0.9]], "float32")))
    np.testing.assert_allclose(out[0], [0.5, 0.5], atol=1e-6)
    np.testing.assert_array_equal(out[1], [1.0, 0.0])  # exactly sparse
    # x = z / 2 = (0.5, 0.45); tau solves (0.5 - t)^2 + (0.45 - t)^2 = 1.
    tau = (0.95 - np.sqrt(0.95**2 - 2 * (0.5**2 + 0.45**2 - 1))) / 2
    np.testing.assert_allclose(out[2], [(0.5 - tau) ** 2, (0.45 - tau) ** 2], atol=1e-6)


@settings(deadline=None, max_examples=15, derandomize=True)
@given(
    length=st.integers(1, 12),
    scale=st.sampled_from([0.1, 1.0, 5.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_bisection_reference(length, scale, seed):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=(3, 4, length))).astype("float32")
    mask = rng.random((3, 1, length)) < 0.7
    mask[0, 0, :] = False  # a row with no allowed key
    weights = Entmax15()(logits, mask=mask)
    np.testing.assert_allclose(
        ops.convert_to_numpy(weights), entmax15_reference(logits, mask), atol=2e-5
    )


def test_long_mostly_masked_rows_stay_exact():
    # 1e-9-scale masked logits must not swamp float32 cumulative sums.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 20000)).astype("float32")
    mask = np.zeros((2, 20000), bool)
    mask[:, :5] = True
    weights = ops.convert_to_numpy(Entmax15()(logits, mask=mask))
    np.testing.assert_allclose(weights, entmax15_reference(logits, mask), atol=1e-5)


def test_gradient_matches_closed_form():
    # On the support, d entmax15 / dz = diag(s) - s s^T / sum(s) with s = sqrt(weights).
    rng = np.random.default_rng(1)
    z = (2 * rng.normal(size=(5, 9))).astype("float32")
    v = rng.normal(size=(5, 9)).astype("float32")
    s = np.sqrt(entmax15_reference(z))
    expected = s * v - s * (s * v).sum(-1, keepdims=True) / s.sum(-1, keepdims=True)
    np.testing.assert_allclose(gradient(entmax15, z, v), expected, atol=1e-5)


def test_honours_the_normalizer_interface(keras_attn_check):
    keras_attn_check(Entmax15, sums_to_one=True)


def test_model_saves_and_loads(tmp_path):
    inputs = keras.Input((6, 8))
    outputs = keras_attn.Attention(num_heads=2, normalizer="entmax15")(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(2).normal(size=(2, 6, 8)).astype("float32")
    model.save(tmp_path / "entmax.keras")
    loaded = keras.saving.load_model(tmp_path / "entmax.keras")
    assert isinstance(loaded.layers[1].normalizer, Entmax15)
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))
