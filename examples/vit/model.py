"""Vision Transformer assembled from keras_attn layers: self-attention over image patches.

Reads top to bottom: the layer ViT adds (class token), then the model (`ViT`:
patch embedding, class token, learned positions, pre-norm
`examples.common.blocks.TransformerBlock`s, classifier), a functional
`keras.Model` that keeps handles to its parts (``vit.blocks``). The data is in
`examples.vit.data`, the training program in `examples.vit.__main__`.

The attention of every block is an argument, so ViT with hard attention is::

    build_vit(image_shape=(8, 8, 1), num_classes=10, patch_size=2, attention={"layer": "hard"})
"""

import types

import keras
from keras import ops

from examples.common.attention import AttentionConfig
from examples.common.blocks import TransformerBlock
from examples.common.layers import PACKAGE
from examples.common.layers import PositionEmbedding
from examples.common.layers import TakeToken
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


@keras.saving.register_keras_serializable(package=PACKAGE)
class ViT(keras.Model):
    """ViT classifier (Dosovitskiy et al., 2021) built from keras_attn layers.

    Args:
        image_shape: ``(height, width, channels)`` of the input images.
        num_classes: Number of classes.
        patch_size: Side of the square patches; each becomes one token.
        num_layers: Number of encoder blocks.
        num_heads: Attention heads per block.
        hidden_dim: Width of the model (divisible by `num_heads`).
        mlp_dim: Width of the blocks' MLP; defaults to ``2 * hidden_dim``.
        dropout: Dropout on embeddings and block outputs.
        attention_dropout: Dropout on the attention weights.
        attention: The attention of every block (`examples.common.attention.AttentionConfig`,
            a dict of its fields such as ``{"layer": "hard"}``, or None).

    Inputs: images ``(B, height, width, channels)`` with pixels in 0..255.
    Output: class logits ``(B, num_classes)`` (float32).

    Attributes:
        patch_embedding, class_token, position_embedding: The embedding layers.
        blocks: The `TransformerBlock`s, in the order they run.

    Raises:
        ValueError: the image does not tile into patches, a size is not a positive
            integer, `hidden_dim` is not divisible by `num_heads`, or the attention
            is not valid.
    """

    def __init__(
        self,
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
        **kwargs,
    ):
        image_shape = tuple(image_shape)
        check_image(image_shape, patch_size)
        for arg, value in (
            ("num_classes", num_classes),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("hidden_dim", hidden_dim),
        ):
            validation.positive_int(value, arg)
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        mlp_dim = mlp_dim or 2 * hidden_dim
        attention = AttentionConfig.from_dict(attention)
        num_patches = (image_shape[0] // patch_size) * (image_shape[1] // patch_size)

        # === layers ===
        parts = types.SimpleNamespace()
        parts.rescale = keras.layers.Rescaling(1.0 / 255.0, name="rescale")
        # A patch_size-strided convolution is a dense layer applied to each flattened patch.
        parts.patch_embedding = keras.layers.Conv2D(
            hidden_dim, patch_size, strides=patch_size, name="patch_embedding"
        )
        parts.patches = keras.layers.Reshape((num_patches, hidden_dim), name="patches")
        parts.class_token = ClassToken(name="class_token")
        parts.position_embedding = PositionEmbedding(num_patches + 1, name="position_embedding")
        parts.embeddings_dropout = keras.layers.Dropout(dropout, name="embeddings_dropout")
        parts.blocks = [
            TransformerBlock(
                num_heads,
                mlp_dim,
                attention=attention,
                dropout=dropout,
                attention_dropout=attention_dropout,
                norm_first=True,
                layer_norm_epsilon=1e-6,
                name=f"block_{i}",
            )
            for i in range(num_layers)
        ]
        parts.final_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")
        parts.class_output = TakeToken(0, name="class_output")
        parts.head = keras.layers.Dense(num_classes, dtype="float32", name="logits")

        # === functional model ===
        # A model takes layers as attributes only after `Model.__init__` (PyTorch's
        # modules require it), so the wiring runs `embed` on a namespace of the layers;
        # they become the model's attributes below.
        images = keras.Input(image_shape, name="images")
        x, arguments = ViT.embed(parts, images)
        for block in parts.blocks:
            x = block(x, **arguments)
        x = parts.class_output(parts.final_norm(x))  # (B, E)
        super().__init__(images, parts.head(x), **kwargs)
        for name, value in vars(parts).items():
            setattr(self, name, value)

        # === config ===
        self.image_shape = image_shape
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.attention_config = attention

    def embed(self, images, training=None):
        """The input of the first block and the arguments of every block.

        Returns:
            ``(x, arguments)``: ``x`` ``(B, 1 + N, hidden_dim)``, the class token then
            the N patches with their positions, and ``{}`` (the blocks take nothing more).
        """
        x = self.patch_embedding(self.rescale(images))  # (B, H / p, W / p, E)
        x = self.class_token(self.patches(x))  # (B, N + 1, E)
        x = self.embeddings_dropout(self.position_embedding(x), training=training)
        return x, {}

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "patch_size": self.patch_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "hidden_dim": self.hidden_dim,
            "mlp_dim": self.mlp_dim,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "attention": self.attention_config.to_dict(),
        }


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
    """A `ViT` (arguments as there), named `name`."""
    return ViT(
        image_shape,
        num_classes,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        dropout=dropout,
        attention_dropout=attention_dropout,
        attention=attention,
        name=name,
    )


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
