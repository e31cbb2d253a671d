"""GPT: a decoder-only language model assembled from keras_attn layers.

Reads top to bottom: `TokenAndPositionEmbedding`, then `DecoderBlock` (pre-norm
causal self-attention and an MLP, each with a residual connection), then
`build_gpt`, which stacks them into a functional `keras.Model` mapping token ids
``(B, T)`` to next-token logits ``(B, T, vocab_size)``. Decoding with a key/value
cache is in `examples.gpt.generation`, the training program in `examples.gpt.__main__`.

The attention of every block is configurable (`attention=` of `build_gpt`): the
blocks always call it with ``use_causal_mask=True``, so any pattern is
intersected with causal.
"""

import keras
from keras import ops

from examples.common.attention import attention_layer
from examples.common.attention import check_attention
from examples.common.attention import default_attention
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

    def call(self, token_ids, start_index=0):
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
        positions = ops.arange(ops.shape(token_ids)[1], dtype="int32") + ops.cast(
            start_index, "int32"
        )
        return (
            self.token_embedding(token_ids) + self.position_embedding(positions)[None]
        )  # (B, T, E)

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

    Call arguments:
        x: ``(B, T, E)``.
        cache: Optional ``(B, 2, S, H, E // H)`` key/value cache of this block.
        cache_update_index: Position of ``x[:, 0]`` in the cache.
        return_attention_weights: Also return the attention weights ``(B, H, T, S)``.

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.attention_config = {**default_attention(), **(attention or {})}
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon

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
        self.attention = attention_layer(
            self.attention_config,
            self.num_heads,
            hidden_dim // self.num_heads,
            dropout=self.dropout,
            name="attention",
            dtype=dtype,
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
        self, x, cache=None, cache_update_index=None, return_attention_weights=False, training=None
    ):
        h = self.attention_norm(x)
        kwargs = dict(use_causal_mask=True, training=training)
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
        self, x, cache=None, cache_update_index=None, return_attention_weights=False, training=None
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

    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    x = TokenAndPositionEmbedding(vocab_size, max_length, hidden_dim, name="embedding")(token_ids)
    for i in range(num_layers):
        x = DecoderBlock(
            num_heads, intermediate_dim, attention=attention, dropout=dropout, name=f"block_{i}"
        )(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(vocab_size, dtype="float32", name="logits")(x)
    return keras.Model(token_ids, logits, name=name)


def compile_gpt(model, learning_rate=1e-3):
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.01, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


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
