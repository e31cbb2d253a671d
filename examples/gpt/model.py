"""GPT: a decoder-only language model assembled from keras_attn layers.

Reads top to bottom: `TokenAndPositionEmbedding`, then `GPT`, a functional
`keras.Model` that stacks pre-norm causal `examples.common.blocks.TransformerBlock`s
(self-attention and an MLP, each with a residual connection) and maps token ids
``(B, T)`` to next-token logits ``(B, T, vocab_size)``; it keeps handles to its
parts (``embedding``, ``blocks``, ``final_norm``, ``head``). Decoding with a
key/value cache is in `examples.gpt.generation`, the training program in
`examples.gpt.__main__`.

The attention of every block is configurable (`attention=` of `build_gpt`): the
blocks always call it with ``use_causal_mask=True``, so any pattern is
intersected with causal. ``build_gpt(..., packed=True)`` takes several documents
per row: its inputs are ``{"token_ids", "segment_ids"}``, no token attends to
another document, and positions (learned and the attention's position encoding)
restart at each document. ``build_gpt(..., position_embedding="none")`` leaves out the
learned position embedding (positions then come from the attention's position
encoding, e.g. rope), so the model takes sequences of any length; with a causal
sliding-window attention, `examples.gpt.generation` then decodes past `max_length`
in constant cache memory.
"""

import types

import keras
from keras import ops

from examples.common.attention import AttentionConfig
from examples.common.blocks import TransformerBlock
from keras_attn import segments
from keras_attn import validation

POSITION_EMBEDDINGS = ("learned", "none")


def check_position_embedding(value):
    """`value` if it is one of `POSITION_EMBEDDINGS`, else a ValueError."""
    if value not in POSITION_EMBEDDINGS:
        raise ValueError(
            f"`position_embedding` must be one of {POSITION_EMBEDDINGS}. "
            f"Received: position_embedding={value!r}"
        )
    return value


# -- embedding -----------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="examples.gpt")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a learned absolute position embedding (or none).

    Args:
        vocab_size: Number of token ids.
        max_length: Longest sequence the model accepts (number of positions).
        hidden_dim: Embedding size.
        position_embedding: ``"learned"`` (default): `max_length` learned positions
            are added. ``"none"``: only the token embedding; any length is accepted
            (positions come from the attention's position encoding, if any).

    Call arguments:
        token_ids: Int ``(B, T)``.
        start_index: Position of the first token (int or scalar tensor); a
            decoding step with a cache starts past the tokens already seen.
        segment_ids: Optional int ``(B, T)`` of packed documents: positions
            restart at 0 where the id changes.

    Returns:
        ``(B, T, hidden_dim)``.

    Raises:
        ValueError: with learned positions, a sequence longer than `max_length`
            (where its length is known); an unknown `position_embedding`.
    """

    def __init__(self, vocab_size, max_length, hidden_dim, position_embedding="learned", **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.hidden_dim = hidden_dim
        # Not `self.position_embedding`: that names the learned positions' layer.
        self.position_kind = check_position_embedding(position_embedding)

    def build(self, input_shape):
        self.token_embedding = keras.layers.Embedding(
            self.vocab_size, self.hidden_dim, dtype=self.dtype_policy, name="token_embedding"
        )
        self.token_embedding.build(input_shape)
        if self.position_kind == "none":
            return
        self.position_embedding = keras.layers.Embedding(
            self.max_length, self.hidden_dim, dtype=self.dtype_policy, name="position_embedding"
        )
        self.position_embedding.build((None,))

    def call(self, token_ids, start_index=0, segment_ids=None):
        if self.position_kind == "none":
            return self.token_embedding(token_ids)  # (B, T, E)
        length = token_ids.shape[1]
        if (
            length is not None
            and isinstance(start_index, int)
            and start_index + length > self.max_length
        ):
            raise ValueError(
                f"The sequence is longer than the model's maximum length {self.max_length}. "
                f"Received: sequence length={start_index + length}"
            )
        positions = (
            # The start named: jax2onnx (ONNX export on JAX) takes no arange(n) from Keras.
            ops.arange(0, ops.shape(token_ids)[1], dtype="int32")
            + ops.cast(start_index, "int32")[None]
        )  # (T,)
        if segment_ids is not None:
            starts = segments.segment_starts(segment_ids)  # (B, T)
            positions = positions - starts  # (B, T)
        return self.token_embedding(token_ids) + self.position_embedding(positions)  # (B, T, E)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size, max_length=self.max_length, hidden_dim=self.hidden_dim
        )
        if self.position_kind != "learned":  # the configs of learned positions stay as they were
            config["position_embedding"] = self.position_kind
        return config


# -- model ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="examples.gpt")
class GPT(keras.Model):
    """A GPT decoder as a functional `keras.Model`: token ids ``(B, T)`` to logits ``(B, T, V)``.

    Args:
        vocab_size: Number of token ids.
        max_length: Longest sequence (prompt plus generated tokens) it accepts
            with learned positions; without them (``position_embedding="none"``)
            the length it is meant for, which a windowed model decodes past.
        num_layers: Number of blocks.
        num_heads: Attention heads per block.
        hidden_dim: Model width (divisible by `num_heads`).
        intermediate_dim: MLP width (default ``4 * hidden_dim``).
        dropout: Dropout rate (after attention and MLP, and on the attention weights).
        attention: The attention of every block: an
            `examples.common.attention.AttentionConfig`, a dict of its fields (e.g.
            ``{"layer": "hard"}``; ``{"layer": "keras"}`` builds the reference with
            `keras.layers.MultiHeadAttention`) or None.
        packed: Take packed rows: the inputs are ``{"token_ids": (B, T),
            "segment_ids": (B, T)}`` (int; equal ids = one document), no token
            attends to another document, and the learned positions and the
            attention's position encoding restart at each document.
        position_embedding: ``"learned"`` (default): a learned absolute position
            embedding of `max_length` positions is added to the tokens.
            ``"none"``: no position embedding; positions come from the attention's
            position encoding (e.g. ``attention={"position_encoding": "rope"}``),
            and the model takes sequences of any length. With a causal sliding
            window in every block (``pattern`` ``local``), `generate` decodes
            past `max_length` with a ring cache of `window` slots per layer.

    Attributes:
        embedding: The `TokenAndPositionEmbedding`.
        blocks: The `TransformerBlock`s, in the order they run.
        final_norm, head: The last layer norm and the logits layer.

    The logits are float32 under mixed precision, for a stable loss.

    Raises:
        ValueError: a size is not a positive integer, `hidden_dim` is not divisible
            by `num_heads`, `position_embedding` is not ``"learned"`` or ``"none"``,
            or the attention is not valid (unknown components
            raise `keras_attn.UnknownComponentError`).
    """

    def __init__(
        self,
        vocab_size,
        max_length,
        num_layers=4,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=None,
        dropout=0.0,
        attention=None,
        packed=False,
        position_embedding="learned",
        **kwargs,
    ):
        for arg, value in (
            ("vocab_size", vocab_size),
            ("max_length", max_length),
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
        attention = AttentionConfig.from_dict(attention)
        packed = validation.boolean(packed, "packed")
        position_embedding = check_position_embedding(position_embedding)
        intermediate_dim = intermediate_dim or 4 * hidden_dim

        # === layers ===
        parts = types.SimpleNamespace(packed=packed)
        parts.embedding = TokenAndPositionEmbedding(
            vocab_size, max_length, hidden_dim, position_embedding, name="embedding"
        )
        parts.blocks = [
            TransformerBlock(
                num_heads,
                intermediate_dim,
                attention=attention,
                dropout=dropout,
                attention_dropout=dropout,
                norm_first=True,
                causal=True,
                layer_norm_epsilon=1e-5,
                reset_positions=packed,
                name=f"block_{i}",
            )
            for i in range(num_layers)
        ]
        parts.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")
        parts.head = keras.layers.Dense(vocab_size, dtype="float32", name="logits")

        # === functional model ===
        # A model takes layers as attributes only after `Model.__init__` (PyTorch's
        # modules require it), so the wiring runs `embed` on a namespace of the layers;
        # they become the model's attributes below.
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        inputs = token_ids
        if packed:
            segment_ids = keras.Input(shape=(None,), dtype="int32", name="segment_ids")
            inputs = {"token_ids": token_ids, "segment_ids": segment_ids}
        x, arguments = GPT.embed(parts, inputs)
        for block in parts.blocks:
            x = block(x, **arguments)
        logits = parts.head(parts.final_norm(x))
        super().__init__(inputs, logits, **kwargs)
        for name, value in vars(parts).items():
            setattr(self, name, value)

        # === config ===
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.attention_config = attention
        self.position_embedding = position_embedding

    def embed(self, inputs, training=None):
        """The input of the first block and the arguments of every block.

        Args:
            inputs: Int ids ``(B, T)``, or ``{"token_ids", "segment_ids"}`` where packed.

        Returns:
            ``(x, arguments)``: ``x`` ``(B, T, hidden_dim)`` and the keyword
            arguments each block takes (``segment_ids``, None unless packed).
        """
        if self.packed:
            token_ids, segment_ids = inputs["token_ids"], inputs["segment_ids"]
        else:
            token_ids, segment_ids = inputs, None
        x = self.embedding(token_ids, segment_ids=segment_ids)  # (B, T, E)
        return x, {"segment_ids": segment_ids}

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "dropout": self.dropout,
            "attention": self.attention_config.to_dict(),
            "packed": self.packed,
        }
        if self.position_embedding != "learned":  # the configs of learned positions stay
            config["position_embedding"] = self.position_embedding
        return config


def build_gpt(
    vocab_size,
    max_length,
    num_layers=4,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=None,
    dropout=0.0,
    attention=None,
    packed=False,
    position_embedding="learned",
    name="gpt",
):
    """A `GPT` (arguments as there), named `name`."""
    return GPT(
        vocab_size,
        max_length,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        dropout=dropout,
        attention=attention,
        packed=packed,
        position_embedding=position_embedding,
        name=name,
    )


def compile_gpt(model, learning_rate=1e-3):
    # With sample weights (packed rows weigh out the targets across documents) the
    # loss is the mean over the weighted targets, not over every position.
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.01, global_clipnorm=1.0),
        loss=loss,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def single_document(model, token_ids):
    """The inputs of a `GPT` for int ids ``(B, T)`` holding one document per row: the ids,
    with all-zero segment ids where the model is packed."""
    token_ids = ops.convert_to_tensor(token_ids, "int32")
    if not model.packed:
        return token_ids
    return {"token_ids": token_ids, "segment_ids": ops.zeros_like(token_ids)}
