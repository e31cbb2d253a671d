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
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"`k` must be a positive integer. Received: k={k!r}")
        self.k = k

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


@hookimpl
def register_normalizers(register):
    for cls in (Softmax, Hard, TopK, Sparsemax):
        register(cls)
