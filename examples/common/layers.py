"""The small layers the examples share: padding mask, learned positions, taking one token.

The Transformer block itself is `examples.common.blocks.TransformerBlock`.
"""

import keras
from keras import ops

from keras_attn import validation

PACKAGE = "keras_attn_examples"  # where the layers below are registered for saving


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
