"""keras_attn.components: what the base classes do for every score, score_mod, pattern,
normalizer and position encoding, and the `Components` of one computation.

Each base class is checked through a small subclass written here, against numpy.
"""

import dataclasses
import math
import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_attn import components
from keras_attn import normalizers
from keras_attn import patterns
from keras_attn import score_mods
from keras_attn import scores
from keras_attn.components import Components
from keras_attn.positions import make_positions


def _np(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


def _data(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# -- builtin: Keras-serializable under the registry name ---------------------------------


def test_builtin_registers_the_class_with_keras_under_its_registry_name():
    assert keras.saving.get_registered_name(scores.ScaledDot) == "keras_attn.score>scaled_dot"
    assert keras.saving.get_registered_name(normalizers.TopK) == "keras_attn.normalizer>topk"

    @components.builtin("score_mod")
    class Shifted(components.ScoreMod):
        name = "test_components_shifted"

        def call(self, logits, positions=None):
            return logits + 1.0

    name = "keras_attn.score_mod>test_components_shifted"
    assert keras.saving.get_registered_name(Shifted) == name
    assert keras.saving.get_registered_object(name) is Shifted
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(Shifted()))
    assert type(restored) is Shifted
    np.testing.assert_array_equal(_np(restored(np.zeros((2, 3), "float32"))), 1.0)


# -- every base class: a subclass that forgets its method says which -----------------------


@pytest.mark.parametrize(
    "base,call,method",
    [
        (components.Score, lambda c: c(np.zeros((2, 4)), np.zeros((3, 4))), "call(query, key)"),
        (components.ScoreMod, lambda c: c(np.zeros((2, 3))), "call(logits, positions)"),
        (components.Normalizer, lambda c: c(np.zeros((2, 3))), "normalize(logits, mask, training)"),
        (
            components.PositionEncoding,
            lambda c: c(np.zeros((2, 4)), np.zeros((2, 4))),
            "call(query, key, positions)",
        ),
        (
            components.Pattern,
            lambda c: c.mask(make_positions(2, 3, 1)),
            "mask(positions)",
        ),
    ],
)
def test_a_subclass_that_forgets_its_method_says_which(base, call, method):
    forgetful = type("Forgetful", (base,), {"name": "forgetful"})
    with pytest.raises(NotImplementedError, match=f"Forgetful must implement {re.escape(method)}"):
        call(forgetful())


# -- Score and ScoreMod --------------------------------------------------------------------


class Doubled(components.Score):
    """2 (q · k), written here."""

    name = "test_components_doubled"

    def call(self, query, key):
        return 2.0 * ops.matmul(query, ops.swapaxes(key, -1, -2))


def test_a_score_subclass_computes_and_describes_its_shape():
    q, k = _data(2, 3, 5, 4), _data(2, 3, 7, 4, seed=1)
    score = Doubled()
    np.testing.assert_allclose(_np(score(q, k)), 2.0 * q @ np.swapaxes(k, -1, -2), rtol=1e-5)
    assert score.compute_output_shape((2, 3, 5, 4), (2, 3, 7, 4)) == (2, 3, 5, 7)
    assert score.compute_output_shape((5, 4)) == (5, 5)
    # Only scaled_dot itself is s * (q · k) for a fused kernel; a subclass is not.
    assert score.fused_scale(16) is None
    assert scores.ScaledDot().fused_scale(16) == 0.25
    assert scores.ScaledDot(scale=0.3).fused_scale(16) == 0.3

    class Overridden(scores.ScaledDot):
        def call(self, query, key):
            return super().call(query, key) + 1.0

    assert Overridden().fused_scale(16) is None
    assert scores.Dot().fused_scale(16) is None


def test_score_mods_and_normalizers_take_float32_logits_under_float16():
    # float16 overflows at 65504: the logits are not cast down by Keras's autocasting.
    for layer in (score_mods.Softcap(cap=1e5), normalizers.Softmax()):
        assert layer.input_dtype == "float32"
        layer16 = type(layer).from_config({**layer.get_config(), "dtype": "mixed_float16"})
        assert layer16.input_dtype == "float32"
        bf16 = type(layer).from_config({**layer.get_config(), "dtype": "mixed_bfloat16"})
        assert bf16.input_dtype == "bfloat16"
    logits = np.array([[7e4, 0.0, -7e4]], "float32")
    capped = score_mods.Softcap(cap=1e5, dtype="mixed_float16")(logits)
    np.testing.assert_allclose(_np(capped), 1e5 * np.tanh(logits / 1e5), rtol=1e-3)
    assert components.ScoreMod().compute_output_shape((2, 3, 4, 5)) == (2, 3, 4, 5)


# -- Pattern ------------------------------------------------------------------------------


class Even(components.Pattern):
    """Keys at even positions, written here; no closed-form block mask."""

    name = "test_components_even"

    def __init__(self, offset=0):
        self.offset = offset

    def mask(self, positions):
        return ops.equal((positions.key + self.offset) % 2, 0)

    def get_config(self):
        return {"offset": self.offset}


def test_a_pattern_subclass_gets_block_mask_equality_and_combinators():
    pattern = Even()
    # The generic block mask: blocks of 3 keys hold an even key unless they are one odd key.
    keys = np.arange(10)
    expected_row = np.array([(keys[i : i + 3] % 2 == 0).any() for i in range(0, 10, 3)])
    np.testing.assert_array_equal(pattern.block_mask(7, 10, 3), np.tile(expected_row, (3, 1)))
    assert pattern.block_mask(7, 10, 3).tolist() == [[True, True, True, False]] * 3
    assert Even(1).block_mask(7, 10, 3).tolist() == [[True, True, True, True]] * 3
    assert pattern.causal is False and pattern.kernel_form is None
    assert Even.from_config(pattern.get_config()) == pattern
    assert Even(1) != pattern and hash(Even(0)) == hash(pattern)
    assert repr(Even(1)) == "Even(offset=1)"
    both = pattern & patterns.Causal()
    assert isinstance(both, patterns.Intersection) and both.causal
    i, j = np.arange(6)[:, None], np.arange(6)[None]
    got = _np(both.mask(make_positions(6, 6, 1)))[0, 0]
    np.testing.assert_array_equal(got, (j % 2 == 0) & (j <= i))
    either = pattern | patterns.Causal()
    assert isinstance(either, patterns.Union) and not either.causal
    got = _np(either.mask(make_positions(6, 6, 1)))[0, 0]
    np.testing.assert_array_equal(got, np.broadcast_to((j % 2 == 0) | (j <= i), (6, 6)))


def test_a_pattern_combines_only_with_patterns():
    with pytest.raises(TypeError, match=r"combine with `\|` only.*Received: 'causal'"):
        Even() | "causal"
    with pytest.raises(TypeError, match=r"combine with `&` only.*Received: 'causal'"):
        Even() & "causal"


# -- Normalizer ----------------------------------------------------------------------------


class Squares(components.Normalizer):
    """Weights proportional to exp(logit) ** 2, written here."""

    name = "test_components_squares"

    def normalize(self, logits, mask, training):
        return ops.softmax(2.0 * logits, axis=-1)


def ref_squares(logits, mask):
    """What the base class promises around `normalize`: masked logits out, zeros there."""
    e = np.where(mask, np.exp(2.0 * (logits - logits.max(-1, keepdims=True))), 0.0)
    total = e.sum(-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def test_a_normalizer_subclass_gets_masking_and_zeros_for_masked_rows():
    logits = _data(2, 3, 4, 6) * 3
    mask = np.random.default_rng(1).random((2, 3, 4, 6)) > 0.4
    mask[0, 0, 1] = False  # a fully masked row: zeros, not NaN
    normalizer = Squares()
    out = _np(normalizer(logits, mask=mask))
    np.testing.assert_allclose(out, ref_squares(logits, mask), atol=1e-6)
    np.testing.assert_array_equal(out[0, 0, 1], 0.0)
    np.testing.assert_allclose(
        _np(normalizer(logits)), ref_squares(logits, np.ones_like(mask)), atol=1e-6
    )
    assert normalizer.compute_mask(logits, mask) is None
    assert normalizer.compute_output_shape((2, 3, 4, 6)) == (2, 3, 4, 6)
    # Only the built-in softmax itself says it is softmax (fused kernels compute it).
    assert not normalizer.is_softmax and normalizers.Softmax().is_softmax

    class Tweaked(normalizers.Softmax):
        def normalize(self, logits, mask, training):
            return super().normalize(logits * 2.0, mask, training)

    assert not Tweaked().is_softmax


def test_a_normalizer_returns_its_compute_dtype():
    logits = _data(2, 5) * 3
    out = Squares(dtype="mixed_bfloat16")(logits)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    # The logits arrive in bfloat16; the weights are computed in float32, then rounded.
    rounded = _np(ops.cast(logits, "bfloat16"))
    np.testing.assert_allclose(_np(out), ref_squares(rounded, np.ones((2, 5), bool)), atol=1e-2)


# -- PositionEncoding ----------------------------------------------------------------------


class Shift(components.PositionEncoding):
    """Adds the position to every feature of the query, twice it to the key."""

    name = "test_components_shift"

    def call(self, query, key, positions=None):
        p = ops.cast(ops.expand_dims(positions, -1), query.dtype)
        return query + p, key + 2.0 * p


def test_a_position_encoding_subclass():
    q, k = _data(2, 3, 5, 4), _data(2, 3, 5, 4, seed=1)
    positions = np.arange(5)[None, None] + 10
    got_q, got_k = Shift()(q, k, positions=positions)
    np.testing.assert_allclose(_np(got_q), q + positions[..., None], rtol=1e-6)
    np.testing.assert_allclose(_np(got_k), k + 2.0 * positions[..., None], rtol=1e-6)
    assert Shift().check_head_dim(3) is None  # the base class accepts any head size
    assert Shift().compute_output_shape((2, 5, 4)) == ((2, 5, 4), (2, 5, 4))
    assert Shift().compute_output_shape((2, 5, 4), (2, 7, 4)) == ((2, 5, 4), (2, 7, 4))


# -- Components ------------------------------------------------------------------------------


def _components(score=None, mods=(), pattern=None, normalizer=None, dropout=None):
    return Components(
        score or scores.ScaledDot(),
        tuple(mods),
        pattern or patterns.Causal(),
        normalizer or normalizers.Softmax(),
        dropout,
    )


def test_softmax_scale_and_fused_scale():
    plain = _components()
    assert plain.softmax_scale(16) == plain.fused_scale(16) == 0.25
    assert _components(score=scores.ScaledDot(scale=0.5)).fused_scale(64) == 0.5
    # Not softmax(s * q · kᵀ): a score_mod, another score or normalizer, the weights asked
    # for or dropped out.
    assert _components(mods=[score_mods.Softcap()]).softmax_scale(16) is None
    assert _components(score=scores.Dot()).softmax_scale(16) is None
    assert _components(normalizer=normalizers.Sparsemax()).softmax_scale(16) is None
    assert plain.softmax_scale(16, return_weights=True) is None
    assert plain.softmax_scale(16, dropout_active=True) is None
    assert plain.fused_scale(16, return_weights=True) is None
    # A pattern a kernel cannot mask by itself: softmax still, but no fused kernel.
    local = _components(pattern=patterns.Local(3))
    assert local.softmax_scale(16) == 0.25 and local.fused_scale(16) is None
    assert _components(pattern=patterns.Full()).fused_scale(9) == pytest.approx(1 / math.sqrt(9))


def test_replace_and_dropout_active():
    plain = _components()
    local = plain.replace(pattern=patterns.Local(2))
    assert local.pattern == patterns.Local(2) and plain.pattern == patterns.Causal()
    assert local.score is plain.score and local.normalizer is plain.normalizer
    assert not plain.dropout_active(True)
    dropped = plain.replace(dropout=keras.layers.Dropout(0.1))
    assert dropped.dropout_active(True)
    assert not dropped.dropout_active(False) and not dropped.dropout_active(None)
    assert not plain.replace(dropout=keras.layers.Dropout(0.0)).dropout_active(True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plain.score = scores.Dot()
