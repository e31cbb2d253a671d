"""Vision Transformer assembled from keras_attn layers: self-attention over image patches.

Reads top to bottom: the layer ViT adds (class token), then the model (patch
embedding, class token, learned positions, the pre-norm encoder blocks of
`examples.common.layers`, classifier). The data is in `examples.vit.data`, the
training program in `examples.vit.__main__`.

The attention of every block is an argument, so ViT with hard attention is::

    build_vit(image_shape=(8, 8, 1), num_classes=10, patch_size=2, attention={"layer": "hard"})
"""

import keras
from keras import ops

from examples.common.attention import check_attention
from examples.common.layers import PACKAGE
from examples.common.layers import PositionEmbedding
from examples.common.layers import TakeToken
from examples.common.layers import encoder_block
from keras_attn import validation


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassToken(keras.layers.Layer):
    """Prepends one learned token to the patch sequence: ``(B, N, E)`` -> ``(B, N + 1, E)``."""

    def __init__(self, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.token = self.add_weight(
            shape=(1, 1, input_shape[-1]), initializer=self.initializer, name="token"
        )

    def call(self, patches):
        batch = ops.shape(patches)[0]
        token = ops.broadcast_to(
            ops.cast(self.token, patches.dtype), (batch, 1, ops.shape(patches)[-1])
        )  # (B, 1, E)
        return ops.concatenate([token, patches], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], length, input_shape[2])

    def get_config(self):
        return {
            **super().get_config(),
            "initializer": keras.initializers.serialize(self.initializer),
        }


def check_image(image_shape, patch_size):
    if len(image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in image_shape):
        raise ValueError(
            "`image_shape` must be (height, width, channels) of positive integers. "
            f"Received: image_shape={image_shape!r}"
        )
    validation.positive_int(patch_size, "patch_size")
    if image_shape[0] % patch_size or image_shape[1] % patch_size:
        raise ValueError(
            "The image height and width must be multiples of `patch_size`. "
            f"Received: image_shape={tuple(image_shape)}, patch_size={patch_size}"
        )


def build_vit(
    image_shape,
    num_classes,
    patch_size=2,
    num_layers=4,
    num_heads=4,
    hidden_dim=64,
    mlp_dim=None,
    dropout=0.1,
    attention_dropout=0.0,
    attention=None,
    name="vit",
):
    """ViT classifier (Dosovitskiy et al., 2021) built from keras_attn layers.

    Args:
        image_shape: ``(height, width, channels)`` of the input images.
        num_classes: Number of classes.
        patch_size: Side of the square patches; each becomes one token.
        num_layers: Number of encoder blocks.
        num_heads: Attention heads per block.
        hidden_dim: Width of the model.
        mlp_dim: Width of the blocks' MLP; defaults to ``2 * hidden_dim``.
        dropout: Dropout on embeddings and block outputs.
        attention_dropout: Dropout on the attention weights.
        attention: The ``attention`` dict of every block (`examples.common.attention`):
            e.g. ``{"layer": "hard"}``.

    Inputs: images ``(B, height, width, channels)`` with pixels in 0..255.

    Returns:
        A functional `keras.Model` with class logits ``(B, num_classes)`` (float32).
    """
    image_shape = tuple(image_shape)
    check_image(image_shape, patch_size)
    validation.positive_int(num_classes, "num_classes")
    validation.positive_int(num_layers, "num_layers")
    mlp_dim = mlp_dim or 2 * hidden_dim
    attention = check_attention(attention)
    num_patches = (image_shape[0] // patch_size) * (image_shape[1] // patch_size)

    images = keras.Input(image_shape, name="images")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(images)
    # A patch_size-strided convolution is a dense layer applied to each flattened patch.
    x = keras.layers.Conv2D(hidden_dim, patch_size, strides=patch_size, name="patch_embedding")(
        x
    )  # (B, H / p, W / p, E)
    x = keras.layers.Reshape((num_patches, hidden_dim), name="patches")(x)  # (B, N, E)
    x = ClassToken(name="class_token")(x)  # (B, N + 1, E)
    x = PositionEmbedding(num_patches + 1, name="position_embedding")(x)
    x = keras.layers.Dropout(dropout, name="embeddings_dropout")(x)
    for i in range(num_layers):
        x = encoder_block(
            x,
            None,
            num_heads=num_heads,
            intermediate_dim=mlp_dim,
            attention=attention,
            dropout=dropout,
            attention_dropout=attention_dropout,
            norm_first=True,
            layer_norm_epsilon=1e-6,
            name=f"block_{i}",
        )
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = TakeToken(0, name="class_output")(x)  # (B, E)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(images, logits, name=name)


def compile_vit(model, learning_rate=2e-3, total_steps=1000, weight_decay=0.05):
    """AdamW with linear warm-up (first 10%) and cosine decay over `total_steps`."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, total_steps),
        warmup_target=learning_rate,
        warmup_steps=max(1, total_steps // 10),
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=weight_decay, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model
