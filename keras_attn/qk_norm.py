"""QK-norm: each head's queries and keys normalised over the head dim before the score.

Normalising queries and keys bounds the attention logits, which keeps training
stable at scale (Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion
Parameters"; Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities"). Two forms are in use:

- ``"rms"``, `RMSNorm`: RMS normalisation (Zhang & Sennrich 2019) with a learned
  per-dim scale, shared by the heads: Gemma 3 and 4, Qwen3, OLMo 2 (which normalises
  the whole projection rather than each head).
- ``"l2"``, `L2Norm`: L2 normalisation without weights, so that the scaled dot
  product is a cosine (Swin Transformer V2's cosine attention, Liu et al. 2022;
  "Query-Key Normalization for Transformers", Henry et al. 2020).

`keras_attn.Attention(qk_norm=...)` clones the layer `get` returns once for the
queries (``query_norm``) and once for the keys (``key_norm``) and applies them to the
projected heads before the position encoding, so keys are cached normalised.
Both compute in float32 and return the layer's compute dtype.
"""

import keras
from keras import ops

from keras_attn import validation

__all__ = ["L2Norm", "RMSNorm", "get", "serialize"]

_NAMES = ("rms", "l2")


@keras.saving.register_keras_serializable(package="keras_attn")
class RMSNorm(keras.layers.Layer):
    """RMS normalisation over the last axis, with a learned scale of that axis' size.

    ``y = x / sqrt(mean(x**2) + epsilon) * scale``, or ``* (1 + scale)`` with
    `unit_offset`. The weight is named ``scale``, shape ``(D,)``, as in KerasHub:

    - Qwen3 (``Qwen3LayerNorm``, ``query_dense_layernorm``/``key_dense_layernorm``)
      and Gemma 4: ``RMSNorm(epsilon=1e-6)``, scale initialised to ones;
    - Gemma 3 (``RMSNormalization``, ``query_norm``/``key_norm``):
      ``RMSNorm(epsilon=1e-6, unit_offset=True)``, scale initialised to zeros.

    Args:
        epsilon: Added to the mean square, so that a zero vector stays zero.
        unit_offset: Multiply by ``1 + scale`` (Gemma's parametrisation, the scale
            starting at 0) instead of ``scale`` (starting at 1).
        **kwargs: As `keras.layers.Layer` (``name``, ``dtype``).

    Call arguments:
        x: ``(..., D)``, e.g. heads ``(B, T, H, D)``.

    Returns:
        ``(..., D)`` in the layer's compute dtype.

    Raises:
        ValueError: a negative `epsilon` or a non-boolean `unit_offset`.
    """

    def __init__(self, epsilon=1e-6, unit_offset=False, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.epsilon = validation.number(epsilon, "epsilon", low=0)
        self.unit_offset = validation.boolean(unit_offset, "unit_offset")

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale",
            shape=(input_shape[-1],),
            initializer="zeros" if self.unit_offset else "ones",
            # Read in float32 under mixed precision: the normalisation runs in float32.
            autocast=False,
        )

    def call(self, x):
        x32 = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        scale = ops.cast(self.scale, "float32")
        if self.unit_offset:
            scale = scale + 1.0
        return ops.cast(x32 * ops.rsqrt(mean_square + self.epsilon) * scale, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "unit_offset": self.unit_offset}


@keras.saving.register_keras_serializable(package="keras_attn")
class L2Norm(keras.layers.Layer):
    """L2 normalisation over the last axis, no weights: ``x / max(||x||, epsilon)``.

    As ``torch.nn.functional.normalize`` and Swin Transformer V2's cosine attention.
    With queries and keys of unit length the dot product is their cosine, so the
    score's scale is the temperature: e.g. ``score={"name": "scaled_dot",
    "config": {"scale": 10.0}}``.

    Args:
        epsilon: Lower bound of the norm, so that a zero vector stays zero (and its
            gradient finite).
        **kwargs: As `keras.layers.Layer` (``name``, ``dtype``).

    Call arguments:
        x: ``(..., D)``.

    Returns:
        ``(..., D)`` in the layer's compute dtype, each vector of norm 1 (or 0).

    Raises:
        ValueError: a negative `epsilon`.
    """

    def __init__(self, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.epsilon = validation.number(epsilon, "epsilon", low=0)

    def call(self, x):
        x32 = ops.cast(x, "float32")
        square_norm = ops.sum(ops.square(x32), axis=-1, keepdims=True)
        normed = x32 * ops.rsqrt(ops.maximum(square_norm, self.epsilon**2))
        return ops.cast(normed, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def get(qk_norm):
    """The QK-norm layer an `Attention`'s `qk_norm` argument names (a template), or None.

    Args:
        qk_norm: None, ``"rms"`` (`RMSNorm()`), ``"l2"`` (`L2Norm()`), a Keras config
            dict (as `serialize` writes it) or a `keras.layers.Layer` that maps
            ``(..., D)`` to ``(..., D)`` (e.g. ``RMSNorm(unit_offset=True)``). The
            layer is a template: `clone` makes the query's and the key's from its
            config, not its weights.

    Returns:
        A `keras.layers.Layer`, or None.

    Raises:
        ValueError: anything else.
    """
    if qk_norm is None:
        return None
    if isinstance(qk_norm, str) and qk_norm in _NAMES:
        return RMSNorm() if qk_norm == "rms" else L2Norm()
    if isinstance(qk_norm, dict):
        layer = keras.saving.deserialize_keras_object(qk_norm)
        if isinstance(layer, keras.layers.Layer):
            return layer
    if isinstance(qk_norm, keras.layers.Layer):
        return qk_norm
    raise ValueError(
        "`qk_norm` must be None, 'rms', 'l2', a Keras layer (e.g. "
        "keras_attn.qk_norm.RMSNorm(unit_offset=True)) or its config dict. "
        f"Received: qk_norm={qk_norm!r}"
    )


def serialize(qk_norm):
    """The `qk_norm` argument as `get_config` stores it: None, a name, or a config dict."""
    if qk_norm is None or isinstance(qk_norm, str):
        return qk_norm
    config = keras.saving.serialize_keras_object(get(qk_norm))
    # The clones take their names and dtype from the attention layer.
    config["config"] = {k: v for k, v in config["config"].items() if k not in ("name", "dtype")}
    return config


def clone(template, name, dtype):
    """A fresh, unbuilt copy of `template` named `name` with the dtype policy `dtype`."""
    config = {**template.get_config(), "name": name, "dtype": dtype}
    return type(template).from_config(config)
