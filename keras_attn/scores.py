"""Scores: how well key j matches query i.

A score maps ``query (..., Tq, D)`` and ``key (..., Tk, D)`` to logits
``(..., Tq, Tk)``. It computes the whole thing, scaling included: the engine adds
nothing of its own.

float16 tops out at 65504, which a product of large activations passes easily; under a
float16 policy the dot-product scores form their logits in float32 (and keep them
there: score_mods and normalizers take float32 logits under such a policy, see
`keras_attn.components.ScoreMod.input_dtype`). bfloat16 has float32's range and is
left as it is.
"""

import math

import keras
from keras import ops

from keras_attn import validation
from keras_attn.components import Score
from keras_attn.components import builtin
from keras_attn.hookspecs import hookimpl


def _dot(query, key):
    if keras.backend.standardize_dtype(query.dtype) == "float16":
        query, key = ops.cast(query, "float32"), ops.cast(key, "float32")
    # An einsum rather than matmul(query, swapaxes(key)): its gradient for the key
    # needs no transpose of the (..., Tk, D) result.
    return ops.einsum("...qd,...kd->...qk", query, key)  # (..., Tq, Tk)


@builtin("score")
class Dot(Score):
    """Unscaled dot product ``q · k`` (Luong "dot")."""

    name = "dot"

    def call(self, query, key):
        return _dot(query, key)


@builtin("score")
class ScaledDot(Score):
    """Scaled dot product ``q · k / sqrt(D)`` (Vaswani et al.), the default score.

    Args:
        scale: Optional float replacing ``1 / sqrt(D)``.
    """

    name = "scaled_dot"

    def __init__(self, scale=None, **kwargs):
        super().__init__(**kwargs)
        validation.positive_number(scale, "scale", allow_none=True)
        self.scale = scale

    def scale_for(self, depth):
        return self.scale if self.scale is not None else 1.0 / math.sqrt(depth)

    def fused_scale(self, depth):
        return self.scale_for(depth) if type(self).call is ScaledDot.call else None

    def call(self, query, key):
        scale = self.scale_for(query.shape[-1])
        # Scale the (smaller) query before the matmul, as Keras's MultiHeadAttention does.
        return _dot(query * ops.cast(scale, query.dtype), key)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@builtin("score")
class General(Score):
    """Luong's bilinear ("general") score ``q W kᵀ`` with a learned ``W`` (D, D)."""

    name = "general"

    def __init__(self, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, query_shape, key_shape=None):
        depth = query_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(depth, depth), initializer=self.kernel_initializer
        )

    def call(self, query, key):
        return _dot(ops.matmul(query, ops.cast(self.kernel, query.dtype)), key)

    def get_config(self):
        return {
            **super().get_config(),
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


@builtin("score")
class Additive(Score):
    """Bahdanau's additive score ``vᵀ tanh(W_q q + W_k k)``.

    Memory grows as ``Tq * Tk * units``: this score is for short sequences.

    Args:
        units: Width of the hidden layer. Defaults to the head dim D.
    """

    name = "additive"

    def __init__(self, units=None, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.units = validation.positive_int(units, "units", allow_none=True)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, query_shape, key_shape=None):
        depth = query_shape[-1]
        units = self.units or depth
        init = self.kernel_initializer
        self.query_kernel = self.add_weight(
            name="query_kernel", shape=(depth, units), initializer=init
        )
        self.key_kernel = self.add_weight(name="key_kernel", shape=(depth, units), initializer=init)
        self.bias = self.add_weight(name="bias", shape=(units,), initializer="zeros")
        self.v = self.add_weight(name="v", shape=(units,), initializer=init)

    def call(self, query, key):
        dtype = query.dtype
        q = ops.matmul(query, ops.cast(self.query_kernel, dtype))  # (..., Tq, U)
        k = ops.matmul(key, ops.cast(self.key_kernel, dtype))  # (..., Tk, U)
        hidden = ops.tanh(
            ops.expand_dims(q, -2) + ops.expand_dims(k, -3) + ops.cast(self.bias, dtype)
        )  # (..., Tq, Tk, U)
        return ops.matmul(hidden, ops.cast(self.v, dtype))  # (..., Tq, Tk)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


@builtin("score")
class Cosine(Score):
    """Cosine similarity times a temperature ``scale``: ``scale * cos(q, k)``.

    Args:
        scale: Initial value of the multiplier. Cosines lie in [-1, 1], so a scale
            above 1 is needed for sharp attention.
        trainable_scale: Whether the scale is learned (kept in log space).
        epsilon: Added to the norms so zero vectors give zero logits, not NaN.
    """

    name = "cosine"

    def __init__(self, scale=10.0, trainable_scale=False, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.scale = validation.positive_number(scale, "scale")
        self.trainable_scale = validation.boolean(trainable_scale, "trainable_scale")
        self.epsilon = validation.number(epsilon, "epsilon", low=0)

    def build(self, query_shape, key_shape=None):
        if self.trainable_scale:
            self.log_scale = self.add_weight(
                name="log_scale",
                shape=(),
                initializer=keras.initializers.Constant(math.log(self.scale)),
                # Read in float32 under mixed precision: the logits are float32 here,
                # and its gradient sums over every (query, key) pair.
                autocast=False,
            )

    def call(self, query, key):
        def normalize(x):
            x32 = ops.cast(x, "float32")
            norm = ops.sqrt(ops.sum(ops.square(x32), axis=-1, keepdims=True))
            return x32 / (norm + self.epsilon)

        scale = ops.exp(ops.cast(self.log_scale, "float32")) if self.trainable_scale else self.scale
        logits = _dot(normalize(query), normalize(key)) * scale
        return ops.cast(logits, query.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "scale": self.scale,
            "trainable_scale": self.trainable_scale,
            "epsilon": self.epsilon,
        }


def _score_mode(score_mode):
    if score_mode not in ("dot", "concat"):
        raise ValueError(
            "Invalid value for argument score_mode. Expected one of {'dot', 'concat'}. "
            f"Received: score_mode={score_mode}"
        )
    return score_mode


def _pairwise_sum(query, key):
    """``query_i + key_j`` for every pair: ``(..., Tq, Tk, D)`` (memory grows as Tq·Tk·D)."""
    return ops.expand_dims(query, -2) + ops.expand_dims(key, -3)


@builtin("score")
class LuongScore(Score):
    """The score of `keras.layers.Attention` (Luong et al., 2015), of `LuongAttention`.

    ``"dot"``: ``s * (q · k)``; ``"concat"``: ``c * sum(tanh(s * (q + k)))`` over the
    features, with ``s`` a learned scalar (1 without `use_scale`) and ``c`` a learned
    scalar. Keys and queries need the same feature size D.

    Weights, in this order: ``scale`` ``()`` if `use_scale`, then
    ``concat_score_weight`` ``()`` for ``"concat"``, both initialized to ones.

    Args:
        use_scale: Learn the scalar ``s``.
        score_mode: ``"dot"`` or ``"concat"``.

    Raises:
        ValueError: `score_mode` is neither, or `use_scale` is not a bool.
    """

    name = "luong"

    def __init__(self, use_scale=False, score_mode="dot", **kwargs):
        super().__init__(**kwargs)
        self.use_scale = validation.boolean(use_scale, "use_scale")
        self.score_mode = _score_mode(score_mode)

    def build(self, query_shape, key_shape=None):
        # Created as Keras's layer creates them (in the variable dtype), in its order.
        self.scale = None
        self.concat_score_weight = None
        if self.use_scale:
            self.scale = self.add_weight(name="scale", shape=(), initializer="ones")
        if self.score_mode == "concat":
            self.concat_score_weight = self.add_weight(
                name="concat_score_weight", shape=(), initializer="ones"
            )

    def fused_scale(self, depth):
        unscaled_dot = self.score_mode == "dot" and not self.use_scale
        return 1.0 if unscaled_dot and type(self).call is LuongScore.call else None

    def call(self, query, key):
        dtype = query.dtype
        if self.score_mode == "dot":
            logits = _dot(query, key)
            if self.use_scale:
                logits = logits * ops.cast(self.scale, logits.dtype)
            return logits
        pairs = _pairwise_sum(query, key)  # (..., Tq, Tk, D)
        if self.use_scale:
            pairs = pairs * ops.cast(self.scale, dtype)
        return ops.cast(self.concat_score_weight, dtype) * ops.sum(ops.tanh(pairs), axis=-1)

    def get_config(self):
        return {**super().get_config(), "use_scale": self.use_scale, "score_mode": self.score_mode}


@builtin("score")
class BahdanauScore(Score):
    """The score of `keras.layers.AdditiveAttention`, of `BahdanauAttention`: ``sum(v * tanh(q + k))``.

    Bahdanau et al.'s additive score (2015) without its projections (in a keras_attn
    layer with projections, e.g. ``Attention(score="bahdanau")``, it is his score with
    the query and key projections as ``W_q`` and ``W_k``). Keys and queries need the
    same feature size D. Memory grows as ``Tq * Tk * D``: this score is for short
    sequences.

    Weights: ``scale`` ``(D,)`` (``v`` above, Glorot-uniform) if `use_scale`; without
    it, ``v`` is all ones.

    Args:
        use_scale: Learn the per-feature weights ``v``.

    Raises:
        ValueError: `use_scale` is not a bool.
    """

    name = "bahdanau"

    def __init__(self, use_scale=True, **kwargs):
        super().__init__(**kwargs)
        self.use_scale = validation.boolean(use_scale, "use_scale")

    def build(self, query_shape, key_shape=None):
        self.scale = None
        if self.use_scale:
            self.scale = self.add_weight(
                name="scale", shape=(query_shape[-1],), initializer="glorot_uniform"
            )

    def call(self, query, key):
        hidden = ops.tanh(_pairwise_sum(query, key))  # (..., Tq, Tk, D)
        if self.use_scale:
            hidden = hidden * ops.cast(self.scale, hidden.dtype)
        return ops.sum(hidden, axis=-1)  # (..., Tq, Tk)

    def get_config(self):
        return {**super().get_config(), "use_scale": self.use_scale}


@hookimpl
def register_scores(register):
    for cls in (Dot, ScaledDot, General, Additive, Cosine, LuongScore, BahdanauScore):
        register(cls)
