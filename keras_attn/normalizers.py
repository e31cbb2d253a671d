"""Normalizers: how logits become attention weights.

A normalizer is called as ``normalizer(logits, mask=mask, training=training)`` with
logits ``(..., Tq, Tk)`` and a bool mask broadcastable to them (or None), and
returns weights of the same shape. Masked-out pairs get exactly zero weight, and a
row with no allowed key gets all zeros, never NaN. Normalization runs in float32
and the weights are returned in the logits' dtype.
"""

import keras
from keras import ops

from keras_attn import validation
from keras_attn.components import NEG_INF
from keras_attn.components import Normalizer
from keras_attn.components import builtin
from keras_attn.hookspecs import hookimpl


@builtin("normalizer")
class Softmax(Normalizer):
    """Soft attention: ``softmax`` over the allowed keys."""

    name = "softmax"

    @property
    def is_softmax(self):
        cls = type(self)
        return cls.call is Normalizer.call and cls.normalize is Softmax.normalize

    def normalize(self, logits, mask, training):
        return ops.softmax(logits, axis=-1)


def _one_hot_argmax(logits):
    index = ops.argmax(logits, axis=-1)
    return ops.one_hot(index, ops.shape(logits)[-1], dtype=logits.dtype)


@builtin("normalizer")
class Hard(Normalizer):
    """Hard attention: weight 1.0 on the best allowed key of each row.

    The forward pass is the one-hot argmax; the backward pass is the gradient of the
    softmax (straight-through estimator, Bengio et al., 2013), so the layer trains.

    Args:
        gumbel: If True, add Gumbel noise to the logits while training, so the key
            is sampled from the softmax distribution (Gumbel-max; Jang et al., 2017).
        temperature: Temperature of the softmax used for the gradient.
        seed: Seed of the Gumbel noise.
    """

    name = "hard"

    def __init__(self, gumbel=False, temperature=1.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.gumbel = validation.boolean(gumbel, "gumbel")
        self.temperature = validation.positive_number(temperature, "temperature")
        self.seed = validation.integer(seed, "seed", allow_none=True)
        self.seed_generator = keras.random.SeedGenerator(seed) if gumbel else None

    def normalize(self, logits, mask, training):
        if self.gumbel and training:
            uniform = keras.random.uniform(
                ops.shape(logits), minval=1e-6, maxval=1.0 - 1e-6, seed=self.seed_generator
            )
            logits = logits - ops.log(-ops.log(uniform))
        soft = ops.softmax(logits / self.temperature, axis=-1)
        hard = _one_hot_argmax(logits)
        return soft + ops.stop_gradient(hard - soft)

    def get_config(self):
        return {
            **super().get_config(),
            "gumbel": self.gumbel,
            "temperature": self.temperature,
            "seed": self.seed,
        }


@builtin("normalizer")
class TopK(Normalizer):
    """Softmax over the `k` largest allowed logits of each row; the rest get zero.

    Ties at the k-th value are all kept.
    """

    name = "topk"

    def __init__(self, k=8, **kwargs):
        super().__init__(**kwargs)
        self.k = validation.positive_int(k, "k")

    def normalize(self, logits, mask, training):
        length = logits.shape[-1]
        # An unknown length (TensorFlow graphs) is read at run time.
        k = ops.minimum(self.k, ops.shape(logits)[-1]) if length is None else min(self.k, length)
        kth = ops.top_k(logits, k=k, sorted=True)[0][..., -1:]  # (..., Tq, 1)
        keep = logits >= kth
        weights = ops.softmax(ops.where(keep, logits, NEG_INF), axis=-1)
        return ops.where(keep, weights, 0.0)

    def get_config(self):
        return {**super().get_config(), "k": self.k}


@builtin("normalizer")
class Sparsemax(Normalizer):
    """Sparsemax (Martins & Astudillo, 2016): Euclidean projection onto the simplex.

    Rows sum to 1 and many weights are exactly zero.
    """

    name = "sparsemax"

    def normalize(self, logits, mask, training):
        # Not keras.ops.sparsemax: up to Keras 3.15 it builds the threshold from the sum
        # of the cumulative sums over the support, so its rows do not sum to 1
        # (keras-team/keras#23425).
        z = ops.flip(ops.sort(logits, axis=-1), axis=-1)  # (..., Tq, Tk), descending
        r = ops.arange(1, ops.shape(logits)[-1] + 1, dtype=logits.dtype)
        support = 1.0 + r * z > ops.cumsum(z, axis=-1)  # a prefix of the sorted row
        # At least one: a fully masked row (all NEG_INF) must not divide by zero.
        k = ops.maximum(ops.sum(ops.cast(support, logits.dtype), axis=-1, keepdims=True), 1.0)
        tau = (ops.sum(ops.where(support, z, 0.0), axis=-1, keepdims=True) - 1.0) / k
        return ops.maximum(logits - tau, 0.0)


@builtin("normalizer")
class SinkSoftmax(Normalizer):
    """Softmax with attention sinks: one learned logit per head in each row's denominator.

    ``w_ij = exp(x_ij) / (exp(s_h) + sum_j exp(x_ij))`` over the allowed keys j, where
    ``s_h`` is the sink logit of head h (as in gpt-oss; "off-by-one" softmax when
    ``s_h = 0``). The sink takes part of the weight, so a row sums to less than 1 and
    a query may attend to (almost) nothing. Masked-out pairs still get zero weight
    and a row with no allowed key all zeros. Computed in float32, with the sinks kept
    in float32 under mixed precision.

    The logits are ``(B, H, ...)``, heads on axis 1, as the engine calls normalizers:
    whole ``(B, H, Tq, Tk)`` matrices and block-sparse slabs ``(B, H, R, bs, W * bs)``.
    With ``num_heads=1`` one sink is shared by every head and logits of any rank work.

    Args:
        num_heads: Number of sink logits, one per head. ``None`` (default): the
            attention layer sets it to its number of heads when it builds (and a
            normalizer built on its own takes it from axis 1 of the logits).
        sink_initializer: Initializer of the sink logits.
    """

    name = "sink_softmax"

    def __init__(self, num_heads=None, sink_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        validation.positive_int(num_heads, "num_heads", allow_none=True)
        self.num_heads = num_heads
        self.sink_initializer = keras.initializers.get(sink_initializer)

    def build(self, logits_shape, mask_shape=None):
        heads = logits_shape[1] if len(logits_shape) >= 3 else None
        if self.num_heads is None:
            if heads is None:
                raise ValueError(
                    "sink_softmax needs its number of heads: pass `num_heads`, or build it "
                    "on logits (B, H, Tq, Tk) with a known H. "
                    f"Received: logits_shape={tuple(logits_shape)}"
                )
            self.num_heads = heads
        if heads is not None and self.num_heads not in (1, heads):
            raise ValueError(
                f"sink_softmax has one sink per head for num_heads={self.num_heads}, so it "
                "takes logits (B, H, ...) with the heads on axis 1, H == num_heads (or "
                f"num_heads=1, one shared sink). Received: logits_shape={tuple(logits_shape)}"
            )
        self.sinks = self.add_weight(
            shape=(self.num_heads,),
            initializer=self.sink_initializer,
            dtype="float32",
            autocast=False,  # a float16 sink would lose the digits that float32 math keeps
            name="sinks",
        )

    def _sinks_like(self, logits):
        """The sink logits ``(1, H, 1, ..., 1)``, broadcastable to `logits`."""
        rank = len(logits.shape)
        sinks = ops.cast(self.sinks, "float32")
        if self.num_heads == 1:
            return ops.reshape(sinks, (1,) * rank)
        if rank < 3 or logits.shape[1] not in (None, self.num_heads):
            raise ValueError(
                f"sink_softmax has one sink per head for num_heads={self.num_heads}, so it "
                "takes logits (B, H, ...) with the heads on axis 1. "
                f"Received: logits.shape={tuple(logits.shape)}"
            )
        return ops.reshape(sinks, (1, self.num_heads) + (1,) * (rank - 2))

    def normalize(self, logits, mask, training):
        sinks = self._sinks_like(logits)
        # The row max, taken with the sink, keeps exp() finite; a row of masked
        # (very negative) logits then has the sink alone and gets zeros.
        top = ops.stop_gradient(ops.maximum(ops.max(logits, axis=-1, keepdims=True), sinks))
        e = ops.exp(logits - top)
        return e / (ops.sum(e, axis=-1, keepdims=True) + ops.exp(sinks - top))

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "sink_initializer": keras.initializers.serialize(self.sink_initializer),
        }


@hookimpl
def register_normalizers(register):
    for cls in (Softmax, Hard, TopK, Sparsemax, SinkSoftmax):
        register(cls)
