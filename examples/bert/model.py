"""BERT assembled from keras_attn layers: an encoder of unmasked self-attention.

Reads top to bottom: the encoder (token + position + segment embeddings, then
the encoder blocks of `examples.common.layers`), the masked-language-model
pretraining model and the classifier that fine-tunes the same encoder. The data
is in `examples.bert.data`, the training program in `examples.bert.__main__`.

The attention of every block is an argument::

    build_bert_encoder(vocab_size, max_length, attention={"layer": "hard"})
    build_bert_encoder(..., attention={"layer": "attention", "score": "cosine",
                                       "pattern": {"name": "local", "config": {"window": 16}}})
    build_bert_encoder(..., attention={"layer": "keras"})  # keras.layers.MultiHeadAttention

Any registered layer, score, score_mod, pattern and normalizer works, plugin ones
included; ``{"layer": "keras"}`` is the reference the `compare` command trains
side by side.
"""

import keras
from keras import ops

from examples.common.attention import check_attention
from examples.common.layers import PACKAGE
from examples.common.layers import PaddingMask
from examples.common.layers import PositionEmbedding
from examples.common.layers import TakeToken
from examples.common.layers import encoder_block
from keras_attn import validation


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
    """The BERT encoder: embeddings of tokens, positions and segments, then blocks.

    Args:
        vocab_size: Number of token ids.
        max_length: Longest sequence the model takes (positions it has embeddings for).
        num_layers: Number of encoder blocks.
        num_heads: Attention heads per block.
        hidden_dim: Width of the model.
        intermediate_dim: Width of the MLP; defaults to ``4 * hidden_dim``.
        num_segments: Number of segment ids (sentence A / B).
        dropout: Dropout on embeddings and block outputs.
        attention_dropout: Dropout on the attention weights.
        attention: The ``attention`` dict of every block (`examples.common.attention`).
        pad_id: The padding token id; padded keys get no attention.

    Inputs: ``{"token_ids": (B, T) int, "segment_ids": (B, T) int}``, ``T <= max_length``.

    Returns:
        A functional `keras.Model` whose output is the sequence ``(B, T, hidden_dim)``.
    """
    for arg, value in (
        ("vocab_size", vocab_size),
        ("max_length", max_length),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("hidden_dim", hidden_dim),
        ("num_segments", num_segments),
    ):
        validation.positive_int(value, arg)
    intermediate_dim = intermediate_dim or 4 * hidden_dim
    attention = check_attention(attention)

    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    mask = PaddingMask(pad_id, name="padding_mask")(token_ids)

    tokens = keras.layers.Embedding(vocab_size, hidden_dim, name="token_embedding")(token_ids)
    segments = keras.layers.Embedding(num_segments, hidden_dim, name="segment_embedding")(
        segment_ids
    )
    x = keras.layers.Add(name="embeddings_sum")([tokens, segments])
    x = PositionEmbedding(max_length, name="position_embedding")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-12, name="embeddings_norm")(x)
    x = keras.layers.Dropout(dropout, name="embeddings_dropout")(x)
    for i in range(num_layers):
        x = encoder_block(
            x,
            mask,
            num_heads=num_heads,
            intermediate_dim=intermediate_dim,
            attention=attention,
            dropout=dropout,
            attention_dropout=attention_dropout,
            name=f"block_{i}",
        )
    return keras.Model({"token_ids": token_ids, "segment_ids": segment_ids}, x, name=name)


def build_bert_pretrainer(encoder, name="bert_pretrainer"):
    """Masked-language-model pretraining model around `encoder`.

    Inputs: the encoder's, plus ``"mask_positions" (B, P)``, the positions whose
    token was masked. Output: logits ``(B, P, vocab_size)`` (float32) of the
    original tokens there. Only the P masked positions go through the vocabulary
    projection, as in BERT.
    """
    vocab_size = encoder.get_layer("token_embedding").input_dim
    hidden_dim = encoder.output.shape[-1]
    inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in ("token_ids", "segment_ids")}
    positions = keras.Input((None,), dtype="int32", name="mask_positions")
    sequence = encoder(inputs)
    x = GatherPositions(name="gather_masked")(sequence, positions)
    x = keras.layers.Dense(hidden_dim, activation="gelu", name="mlm_transform")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-12, name="mlm_norm")(x)
    logits = keras.layers.Dense(vocab_size, dtype="float32", name="mlm_logits")(x)
    return keras.Model({**inputs, "mask_positions": positions}, logits, name=name)


def build_bert_classifier(encoder, num_classes, dropout=0.1, name="bert_classifier"):
    """Sequence classifier fine-tuning `encoder` (its weights are shared, not copied).

    The ``[CLS]`` token (position 0) goes through BERT's pooler (dense + tanh) to
    the class logits ``(B, num_classes)`` (float32).
    """
    validation.positive_int(num_classes, "num_classes")
    hidden_dim = encoder.output.shape[-1]
    inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in ("token_ids", "segment_ids")}
    sequence = encoder(inputs)
    cls = TakeToken(0, name="cls_token")(sequence)
    pooled = keras.layers.Dense(hidden_dim, activation="tanh", name="pooler")(cls)
    pooled = keras.layers.Dropout(dropout, name="classifier_dropout")(pooled)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(pooled)
    return keras.Model(inputs, logits, name=name)


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
    """The sizes of a `build_bert_encoder` model, as its builder's arguments:
    ``max_length``, ``num_layers``, ``num_heads``, ``hidden_dim``."""
    attention = [layer for layer in encoder.layers if layer.name.endswith("_attention")]
    return {
        "max_length": encoder.get_layer("position_embedding").max_length,
        "num_layers": len(attention),
        "num_heads": attention[0].num_heads,
        "hidden_dim": encoder.output.shape[-1],
    }
