"""BERT assembled from keras_attn layers: an encoder of unmasked self-attention.

Reads top to bottom: the encoder (`BertEncoder`: token + position + segment
embeddings, then post-norm `examples.common.blocks.TransformerBlock`s), the
masked-language-model pretraining model (`BertPretrainer`) and the classifier
(`BertClassifier`) that fine-tunes the same encoder. Each is a functional
`keras.Model` that keeps handles to its parts (``encoder.blocks``,
``pretrainer.encoder``). The data is in `examples.bert.data`, the training
program in `examples.bert.__main__`.

The attention of every block is an argument::

    build_bert_encoder(vocab_size, max_length, attention={"layer": "hard"})
    build_bert_encoder(..., attention={"layer": "attention", "score": "cosine",
                                       "pattern": {"name": "local", "config": {"window": 16}}})
    build_bert_encoder(..., attention={"layer": "keras"})  # keras.layers.MultiHeadAttention

Any registered layer, score, score_mod, pattern and normalizer works, plugin ones
included; ``{"layer": "keras"}`` is the reference the `compare` command trains
side by side.
"""

import types

import keras
from keras import ops

from examples.common.attention import AttentionConfig
from examples.common.blocks import TransformerBlock
from examples.common.layers import PACKAGE
from examples.common.layers import PaddingMask
from examples.common.layers import PositionEmbedding
from examples.common.layers import TakeToken
from keras_attn import validation

INPUTS = ("token_ids", "segment_ids")  # the encoder's inputs, int (B, T) each


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatherPositions(keras.layers.Layer):
    """``sequence (B, T, E)``, ``positions (B, P)`` -> ``(B, P, E)``."""

    def call(self, sequence, positions):
        index = ops.cast(positions, "int32")[:, :, None]  # (B, P, 1)
        return ops.take_along_axis(sequence, index, axis=1)

    def compute_output_spec(self, sequence, positions):
        return keras.KerasTensor(
            (sequence.shape[0], positions.shape[1], sequence.shape[2]), dtype=sequence.dtype
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class BertEncoder(keras.Model):
    """The BERT encoder: embeddings of tokens, positions and segments, then blocks.

    Args:
        vocab_size: Number of token ids.
        max_length: Longest sequence the model takes (positions it has embeddings for).
        num_layers: Number of encoder blocks.
        num_heads: Attention heads per block.
        hidden_dim: Width of the model (divisible by `num_heads`).
        intermediate_dim: Width of the MLP; defaults to ``4 * hidden_dim``.
        num_segments: Number of segment ids (sentence A / B).
        dropout: Dropout on embeddings and block outputs.
        attention_dropout: Dropout on the attention weights.
        attention: The attention of every block (`examples.common.attention.AttentionConfig`,
            a dict of its fields, or None).
        pad_id: The padding token id; padded keys get no attention.

    Inputs: ``{"token_ids": (B, T) int, "segment_ids": (B, T) int}``, ``T <= max_length``.
    Output: the sequence ``(B, T, hidden_dim)``.

    Attributes:
        blocks: The `TransformerBlock`s, in the order they run.

    Raises:
        ValueError: a size is not a positive integer, `hidden_dim` is not divisible
            by `num_heads`, or the attention is not valid.
    """

    def __init__(
        self,
        vocab_size,
        max_length,
        num_layers=2,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=None,
        num_segments=2,
        dropout=0.1,
        attention_dropout=0.0,
        attention=None,
        pad_id=0,
        **kwargs,
    ):
        for arg, value in (
            ("vocab_size", vocab_size),
            ("max_length", max_length),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("hidden_dim", hidden_dim),
            ("num_segments", num_segments),
        ):
            validation.positive_int(value, arg)
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        intermediate_dim = intermediate_dim or 4 * hidden_dim
        attention = AttentionConfig.from_dict(attention)

        # === layers ===
        parts = types.SimpleNamespace()
        parts.padding_mask = PaddingMask(pad_id, name="padding_mask")
        parts.token_embedding = keras.layers.Embedding(
            vocab_size, hidden_dim, name="token_embedding"
        )
        parts.segment_embedding = keras.layers.Embedding(
            num_segments, hidden_dim, name="segment_embedding"
        )
        parts.embeddings_sum = keras.layers.Add(name="embeddings_sum")
        parts.position_embedding = PositionEmbedding(max_length, name="position_embedding")
        parts.embeddings_norm = keras.layers.LayerNormalization(
            epsilon=1e-12, name="embeddings_norm"
        )
        parts.embeddings_dropout = keras.layers.Dropout(dropout, name="embeddings_dropout")
        parts.blocks = [
            TransformerBlock(
                num_heads,
                intermediate_dim,
                attention=attention,
                dropout=dropout,
                attention_dropout=attention_dropout,
                norm_first=False,
                layer_norm_epsilon=1e-12,
                name=f"block_{i}",
            )
            for i in range(num_layers)
        ]

        # === functional model ===
        # A model takes layers as attributes only after `Model.__init__` (PyTorch's
        # modules require it), so the wiring runs `embed` on a namespace of the layers;
        # they become the model's attributes below.
        inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in INPUTS}
        x, arguments = BertEncoder.embed(parts, inputs)
        for block in parts.blocks:
            x = block(x, **arguments)
        super().__init__(inputs, x, **kwargs)
        for name, value in vars(parts).items():
            setattr(self, name, value)

        # === config ===
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_segments = num_segments
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.attention_config = attention
        self.pad_id = pad_id

    def embed(self, inputs, training=None):
        """The input of the first block and the arguments of every block.

        Returns:
            ``(x, arguments)``: ``x`` ``(B, T, hidden_dim)`` and
            ``{"padding_mask": (B, T) bool}`` (False at padding tokens).
        """
        token_ids = inputs["token_ids"]
        tokens = self.token_embedding(token_ids)
        segments = self.segment_embedding(inputs["segment_ids"])
        x = self.position_embedding(self.embeddings_sum([tokens, segments]))
        x = self.embeddings_dropout(self.embeddings_norm(x), training=training)
        return x, {"padding_mask": self.padding_mask(token_ids)}

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "num_segments": self.num_segments,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "attention": self.attention_config.to_dict(),
            "pad_id": self.pad_id,
        }


class _EncoderTask(keras.Model):
    """A model around a `BertEncoder` (kept as ``self.encoder``, its weights shared)."""

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)


@keras.saving.register_keras_serializable(package=PACKAGE)
class BertPretrainer(_EncoderTask):
    """Masked-language-model pretraining model around `encoder`.

    Inputs: the encoder's, plus ``"mask_positions" (B, P)``, the positions whose
    token was masked. Output: logits ``(B, P, vocab_size)`` (float32) of the
    original tokens there. Only the P masked positions go through the vocabulary
    projection, as in BERT.

    Attributes:
        encoder: The `BertEncoder`.
    """

    def __init__(self, encoder, **kwargs):
        # === layers ===
        gather = GatherPositions(name="gather_masked")
        transform = keras.layers.Dense(encoder.hidden_dim, activation="gelu", name="mlm_transform")
        norm = keras.layers.LayerNormalization(epsilon=1e-12, name="mlm_norm")
        head = keras.layers.Dense(encoder.vocab_size, dtype="float32", name="mlm_logits")

        # === functional model ===
        inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in INPUTS}
        positions = keras.Input((None,), dtype="int32", name="mask_positions")
        x = gather(encoder(inputs), positions)
        logits = head(norm(transform(x)))
        super().__init__({**inputs, "mask_positions": positions}, logits, **kwargs)
        self.encoder = encoder
        self.head = head


@keras.saving.register_keras_serializable(package=PACKAGE)
class BertClassifier(_EncoderTask):
    """Sequence classifier fine-tuning `encoder` (its weights are shared, not copied).

    The ``[CLS]`` token (position 0) goes through BERT's pooler (dense + tanh) to
    the class logits ``(B, num_classes)`` (float32).

    Attributes:
        encoder: The `BertEncoder`.
    """

    def __init__(self, encoder, num_classes, dropout=0.1, **kwargs):
        validation.positive_int(num_classes, "num_classes")
        # === layers ===
        cls_token = TakeToken(0, name="cls_token")
        pooler = keras.layers.Dense(encoder.hidden_dim, activation="tanh", name="pooler")
        classifier_dropout = keras.layers.Dropout(dropout, name="classifier_dropout")
        head = keras.layers.Dense(num_classes, dtype="float32", name="logits")

        # === functional model ===
        inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in INPUTS}
        pooled = pooler(cls_token(encoder(inputs)))
        logits = head(classifier_dropout(pooled))
        super().__init__(inputs, logits, **kwargs)
        self.encoder = encoder
        self.head = head

        # === config ===
        self.num_classes = num_classes
        self.dropout = dropout

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dropout": self.dropout}


def build_bert_encoder(
    vocab_size,
    max_length,
    num_layers=2,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=None,
    num_segments=2,
    dropout=0.1,
    attention_dropout=0.0,
    attention=None,
    pad_id=0,
    name="bert_encoder",
):
    """A `BertEncoder` (arguments as there), named `name`."""
    return BertEncoder(
        vocab_size,
        max_length,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        num_segments=num_segments,
        dropout=dropout,
        attention_dropout=attention_dropout,
        attention=attention,
        pad_id=pad_id,
        name=name,
    )


def build_bert_pretrainer(encoder, name="bert_pretrainer"):
    """A `BertPretrainer` around `encoder`, named `name`."""
    return BertPretrainer(encoder, name=name)


def build_bert_classifier(encoder, num_classes, dropout=0.1, name="bert_classifier"):
    """A `BertClassifier` around `encoder`, named `name`."""
    return BertClassifier(encoder, num_classes, dropout=dropout, name=name)


def build_bert(
    vocab_size,
    max_length,
    num_layers=2,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=None,
    num_classes=None,
    dropout=0.1,
    attention_dropout=0.0,
    attention=None,
    pad_id=0,
):
    """BERT: the MLM pretraining model, or the classifier when `num_classes` is given.

    A shortcut for `build_bert_encoder` followed by `build_bert_pretrainer` or
    `build_bert_classifier`; arguments as there.
    """
    encoder = build_bert_encoder(
        vocab_size,
        max_length,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        dropout=dropout,
        attention_dropout=attention_dropout,
        attention=attention,
        pad_id=pad_id,
    )
    if num_classes is None:
        return build_bert_pretrainer(encoder)
    return build_bert_classifier(encoder, num_classes, dropout=dropout)


def compile_bert(model, learning_rate=1e-3, weight_decay=0.01):
    """Compile a pretrainer or classifier: AdamW, cross-entropy on logits, accuracy."""
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate, weight_decay=weight_decay, global_clipnorm=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def encoder_config(encoder):
    """The sizes of a `BertEncoder`, as its builder's arguments:
    ``max_length``, ``num_layers``, ``num_heads``, ``hidden_dim``."""
    config = encoder.get_config()
    return {k: config[k] for k in ("max_length", "num_layers", "num_heads", "hidden_dim")}
