"""GPT: a decoder-only language model assembled from keras_attn layers.

Reads top to bottom: `TokenAndPositionEmbedding`, then `DecoderBlock` (pre-norm
causal self-attention and an MLP, each with a residual connection), then
`build_gpt`, which stacks them into a functional `keras.Model` mapping token ids
``(B, T)`` to next-token logits ``(B, T, vocab_size)``. Decoding with a key/value
cache is in `examples.gpt.generation`, the training program in `examples.gpt.__main__`.

The attention of every block is configurable (`attention=` of `build_gpt`): the
blocks always call it with ``use_causal_mask=True``, so any pattern is
intersected with causal. ``build_gpt(..., packed=True)`` takes several documents
per row: its inputs are ``{"token_ids", "segment_ids"}``, no token attends to
another document, and positions (learned and the attention's position encoding)
restart at each document.
"""

import keras
from keras import ops

import keras_attn
from examples.common.attention import REFERENCE_LAYER
from examples.common.attention import attention_layer
from examples.common.attention import check_attention
from examples.common.attention import default_attention
from keras_attn import segments
from keras_attn import validation

# -- blocks --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="examples.gpt")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a learned absolute position embedding.

    Args:
        vocab_size: Number of token ids.
        max_length: Longest sequence the model accepts (number of positions).
        hidden_dim: Embedding size.

    Call arguments:
        token_ids: Int ``(B, T)``.
        start_index: Position of the first token (int or scalar tensor); a
            decoding step with a cache starts past the tokens already seen.
        segment_ids: Optional int ``(B, T)`` of packed documents: positions
            restart at 0 where the id changes.

    Returns:
        ``(B, T, hidden_dim)``.
    """

    def __init__(self, vocab_size, max_length, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.hidden_dim = hidden_dim

    def build(self, input_shape):
        self.token_embedding = keras.layers.Embedding(
            self.vocab_size, self.hidden_dim, dtype=self.dtype_policy, name="token_embedding"
        )
        self.token_embedding.build(input_shape)
        self.position_embedding = keras.layers.Embedding(
            self.max_length, self.hidden_dim, dtype=self.dtype_policy, name="position_embedding"
        )
        self.position_embedding.build((None,))

    def call(self, token_ids, start_index=0, segment_ids=None):
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
            ops.arange(ops.shape(token_ids)[1], dtype="int32")
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
        return config


@keras.saving.register_keras_serializable(package="examples.gpt")
class DecoderBlock(keras.layers.Layer):
    """Pre-norm decoder block: causal self-attention, then an MLP, both residual.

    Args:
        num_heads: Attention heads.
        intermediate_dim: Width of the MLP.
        attention: The ``attention`` dict (`examples.common.attention.check_attention`).
        dropout: Dropout after attention and MLP (and on the attention weights).
        layer_norm_epsilon: Epsilon of the layer norms.
        reset_positions: The attention's position encoding and score_mods count
            positions from the start of each packed document (keras_attn layers'
            ``reset_positions``).

    Call arguments:
        x: ``(B, T, E)``.
        cache: Optional ``(B, 2, S, H, E // H)`` key/value cache of this block.
        cache_update_index: Position of ``x[:, 0]`` in the cache.
        return_attention_weights: Also return the attention weights ``(B, H, T, S)``.
        segment_ids: Optional int ``(B, T)`` of packed documents: a token attends
            only to the tokens of its own document.

    Returns:
        ``(B, T, E)``; then the weights if asked; then the new cache if given one.
    """

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        attention=None,
        dropout=0.0,
        layer_norm_epsilon=1e-5,
        reset_positions=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.attention_config = {**default_attention(), **(attention or {})}
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.reset_positions = validation.boolean(reset_positions, "reset_positions")

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim % self.num_heads:
            raise ValueError(
                "hidden_dim must be divisible by num_heads. "
                f"Received: hidden_dim={hidden_dim}, num_heads={self.num_heads}"
            )
        dtype = self.dtype_policy
        eps = self.layer_norm_epsilon
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=eps, dtype=dtype, name="attention_norm"
        )
        self.attention_norm.build(input_shape)
        # keras.layers.MultiHeadAttention (the reference) takes no reset_positions.
        reference = self.attention_config["layer"] == REFERENCE_LAYER
        self.attention = attention_layer(
            self.attention_config,
            self.num_heads,
            hidden_dim // self.num_heads,
            dropout=self.dropout,
            name="attention",
            dtype=dtype,
            **({"reset_positions": True} if self.reset_positions and not reference else {}),
        )
        self.attention.build(input_shape, input_shape)
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=dtype)
        self.mlp_norm = keras.layers.LayerNormalization(epsilon=eps, dtype=dtype, name="mlp_norm")
        self.mlp_norm.build(input_shape)
        self.mlp_in = keras.layers.Dense(
            self.intermediate_dim, activation="gelu", dtype=dtype, name="mlp_in"
        )
        self.mlp_in.build(input_shape)
        self.mlp_out = keras.layers.Dense(hidden_dim, dtype=dtype, name="mlp_out")
        self.mlp_out.build((*input_shape[:-1], self.intermediate_dim))
        self.mlp_dropout = keras.layers.Dropout(self.dropout, dtype=dtype)

    def call(
        self,
        x,
        cache=None,
        cache_update_index=None,
        return_attention_weights=False,
        training=None,
        segment_ids=None,
    ):
        h = self.attention_norm(x)
        kwargs = dict(use_causal_mask=True, training=training)
        if segment_ids is not None and isinstance(self.attention, keras_attn.Attention):
            kwargs["segment_ids"] = segment_ids
        elif segment_ids is not None:  # the reference: the same as a (B, T, T) mask
            kwargs["attention_mask"] = ops.equal(segment_ids[:, :, None], segment_ids[:, None, :])
        if return_attention_weights:
            kwargs["return_attention_scores"] = True
        if cache is not None:
            kwargs.update(cache=cache, cache_update_index=cache_update_index)
        outputs = self.attention(h, h, **kwargs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        x = x + self.attention_dropout(outputs[0], training=training)
        x = x + self.mlp_dropout(self.mlp_out(self.mlp_in(self.mlp_norm(x))), training=training)
        return x if len(outputs) == 1 else (x, *outputs[1:])

    def compute_output_spec(
        self,
        x,
        cache=None,
        cache_update_index=None,
        return_attention_weights=False,
        training=None,
        segment_ids=None,
    ):
        result = (keras.KerasTensor(x.shape, dtype=self.compute_dtype),)
        if return_attention_weights:
            key_length = cache.shape[2] if cache is not None else x.shape[1]
            result += (keras.KerasTensor((x.shape[0], self.num_heads, x.shape[1], key_length)),)
        if cache is not None:
            result += (keras.KerasTensor(cache.shape, dtype=cache.dtype),)
        return result[0] if len(result) == 1 else result

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            attention=self.attention_config,
            dropout=self.dropout,
            layer_norm_epsilon=self.layer_norm_epsilon,
            reset_positions=self.reset_positions,
        )
        return config


# -- model ---------------------------------------------------------------------------


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
    name="gpt",
):
    """A GPT decoder as a functional `keras.Model`: token ids ``(B, T)`` to logits ``(B, T, V)``.

    Args:
        vocab_size: Number of token ids.
        max_length: Longest sequence (prompt plus generated tokens) it accepts.
        num_layers: Number of `DecoderBlock`s.
        num_heads: Attention heads per block.
        hidden_dim: Model width (divisible by `num_heads`).
        intermediate_dim: MLP width (default ``4 * hidden_dim``).
        dropout: Dropout rate.
        attention: Dict with any of ``layer``, ``score``, ``pattern``,
            ``normalizer``, ``score_mods``: the attention of every block, from
            the registries (plugins' included). ``layer="keras"`` builds the
            reference with `keras.layers.MultiHeadAttention`.
        packed: Take packed rows: the inputs are ``{"token_ids": (B, T),
            "segment_ids": (B, T)}`` (int; equal ids = one document), no token
            attends to another document, and the learned positions and the
            attention's position encoding restart at each document.

    The logits are float32 under mixed precision, for a stable loss.
    """
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
    attention = check_attention(attention)
    intermediate_dim = intermediate_dim or 4 * hidden_dim

    validation.boolean(packed, "packed")
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    inputs, segment_ids = token_ids, None
    if packed:
        segment_ids = keras.Input(shape=(None,), dtype="int32", name="segment_ids")
        inputs = {"token_ids": token_ids, "segment_ids": segment_ids}
    embedding = TokenAndPositionEmbedding(vocab_size, max_length, hidden_dim, name="embedding")
    x = embedding(token_ids, segment_ids=segment_ids)
    for i in range(num_layers):
        x = DecoderBlock(
            num_heads,
            intermediate_dim,
            attention=attention,
            dropout=dropout,
            reset_positions=packed,
            name=f"block_{i}",
        )(x, segment_ids=segment_ids)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(vocab_size, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


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


def is_packed(model):
    """Whether `model` (from `build_gpt`) takes packed rows (``{"token_ids", "segment_ids"}``)."""
    return isinstance(model.input, dict)


def single_document(model, token_ids):
    """The inputs of `model` for int ids ``(B, T)`` holding one document per row: the ids,
    with all-zero segment ids where the model is packed."""
    if not is_packed(model):
        return token_ids
    token_ids = ops.convert_to_tensor(token_ids, "int32")
    return {"token_ids": token_ids, "segment_ids": ops.zeros_like(token_ids)}


def model_parts(model):
    """The layers of a `build_gpt` model by role: ``(embedding, blocks, final_norm, logits)``.

    The blocks come in the order they run (a functional model lists its layers
    in the order of its graph).
    """
    blocks = [layer for layer in model.layers if isinstance(layer, DecoderBlock)]
    return (
        model.get_layer("embedding"),
        blocks,
        model.get_layer("final_norm"),
        model.get_layer("logits"),
    )


def attention_weights(model, token_ids):
    """The causal attention weights of every block on `token_ids`: ``{name: (B, H, T, T)}``."""
    embedding, blocks, _, _ = model_parts(model)
    x = embedding(ops.convert_to_tensor(token_ids, "int32"))
    result = {}
    for block in blocks:
        x, weights = block(x, return_attention_weights=True, training=False)
        result[block.name] = ops.convert_to_numpy(weights).astype("float32")
    return result
