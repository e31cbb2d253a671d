"""Layers and the encoder block that BERT and ViT share.

Reads top to bottom: how a block calls its attention layer, the layers an
encoder needs (padding mask, learned positions, taking one token), then
`encoder_block`, which wires attention and an MLP onto a sequence, post-norm
(BERT) or pre-norm (ViT).
"""

import keras
from keras import ops

import keras_attn
from examples.common.attention import attention_layer
from keras_attn import validation

PACKAGE = "keras_attn_examples"  # where the layers below are registered for saving


# -- how a block calls its attention -------------------------------------------------------


def self_attend(layer, x, mask):
    """Unmasked self-attention of `x` ``(B, T, E)`` over the keys `mask` ``(B, T)`` keeps.

    `keras_attn.SelfAttention` takes its input once; every other layer (ours,
    plugin layers built on `keras_attn.Attention`, Keras's) takes query and value.
    Only the keys are masked, so no query row is left without a key.
    """
    if isinstance(layer, keras_attn.SelfAttention):
        # Its `mask` pads queries too; the keys alone are masked as (B, 1, T).
        return layer(x, attention_mask=None if mask is None else keras.ops.expand_dims(mask, 1))
    return layer(x, x, value_mask=mask)


# -- layers -------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=PACKAGE)
class PaddingMask(keras.layers.Layer):
    """Bool ``(B, T)``: True where `token_ids` is not `pad_id`."""

    def __init__(self, pad_id=0, **kwargs):
        super().__init__(**kwargs)
        self.pad_id = pad_id

    def call(self, token_ids):
        return ops.not_equal(token_ids, self.pad_id)

    def compute_output_spec(self, token_ids):
        return keras.KerasTensor(token_ids.shape, dtype="bool")

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}


def check_length(length, max_length):
    """Raise the error a sequence longer than the model's maximum gets."""
    if isinstance(length, int) and max_length is not None and length > max_length:
        raise ValueError(
            f"The sequence is longer than the model's maximum length max_length={max_length}. "
            f"Cut or split it. Received: a sequence of length {length}"
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position ``0..T-1`` to `x` ``(B, T, E)``.

    Args:
        max_length: The most positions the layer has embeddings for. Longer
            inputs are an error, not silently wrapped or clipped.
    """

    def __init__(self, max_length, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.max_length = validation.positive_int(max_length, "max_length")
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        check_length(input_shape[1], self.max_length)
        self.embeddings = self.add_weight(
            shape=(self.max_length, input_shape[-1]),
            initializer=self.initializer,
            name="embeddings",
        )

    def call(self, x):
        length = x.shape[1]
        if isinstance(length, int):
            check_length(length, self.max_length)
        else:  # unknown (or symbolic, on JAX) while tracing: slice dynamically
            length = ops.shape(x)[1]
        positions = ops.cast(self.embeddings[:length], x.dtype)  # (T, E)
        return x + positions[None]

    def compute_output_shape(self, input_shape):
        check_length(input_shape[1], self.max_length)
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "max_length": self.max_length,
            "initializer": keras.initializers.serialize(self.initializer),
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class TakeToken(keras.layers.Layer):
    """``(B, T, E)`` -> ``(B, E)``: the token at position `index` (``[CLS]`` at 0)."""

    def __init__(self, index=0, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def call(self, sequence):
        return sequence[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "index": self.index}


# -- encoder block -------------------------------------------------------------------------


def encoder_block(
    x,
    mask,
    *,
    num_heads,
    intermediate_dim,
    attention=None,
    dropout=0.1,
    attention_dropout=0.0,
    norm_first=False,
    activation="gelu",
    layer_norm_epsilon=1e-12,
    name="block",
):
    """One Transformer encoder block wired onto `x` ``(B, T, E)``: attention, then MLP.

    Args:
        mask: Bool ``(B, T)`` of real (non-padding) tokens, or None.
        attention: The ``attention`` dict (`examples.common.attention.check_attention`).
        norm_first: Layer norm before each sub-block (ViT) or after the residual
            sum (BERT).

    Returns:
        ``(B, T, E)``.
    """
    hidden_dim = x.shape[-1]
    if hidden_dim % num_heads:
        raise ValueError(
            "`hidden_dim` must be divisible by `num_heads`. "
            f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
        )

    def norm(suffix):
        return keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name=f"{name}_{suffix}")

    attn = attention_layer(
        attention, num_heads, hidden_dim // num_heads, attention_dropout, name=f"{name}_attention"
    )
    h = norm("attention_norm")(x) if norm_first else x
    h = self_attend(attn, h, mask)
    h = keras.layers.Dropout(dropout, name=f"{name}_attention_dropout")(h)
    x = keras.layers.Add(name=f"{name}_attention_residual")([x, h])
    if not norm_first:
        x = norm("attention_norm")(x)

    h = norm("mlp_norm")(x) if norm_first else x
    h = keras.layers.Dense(intermediate_dim, activation=activation, name=f"{name}_mlp_in")(h)
    h = keras.layers.Dense(hidden_dim, name=f"{name}_mlp_out")(h)
    h = keras.layers.Dropout(dropout, name=f"{name}_mlp_dropout")(h)
    x = keras.layers.Add(name=f"{name}_mlp_residual")([x, h])
    if not norm_first:
        x = norm("mlp_norm")(x)
    return x
