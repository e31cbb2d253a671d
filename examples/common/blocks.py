"""The Transformer block of every example: attention, then an MLP, each residual.

GPT stacks it pre-norm and causal, BERT post-norm over the real (non-padding)
tokens, ViT pre-norm over image patches: one layer, three settings. A model keeps
its blocks in ``model.blocks`` and says what they take with ``model.embed``
(`examples.common.heatmaps` reads the attention weights through both).

    block = TransformerBlock(num_heads=4, intermediate_dim=512, attention=attention,
                             norm_first=True, causal=True, name="block_0")
    x = block(x, segment_ids=segment_ids)                     # (B, T, E)
    x, weights = block(x, return_attention_scores=True)       # weights (B, H, T, T)
    x, cache = block(x, cache=cache, cache_update_index=i)    # decoding
"""

import keras
from keras import ops

import keras_attn
from examples.common.attention import AttentionConfig
from examples.common.layers import PACKAGE
from keras_attn import validation


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(keras.layers.Layer):
    """Self-attention, then a two-layer MLP, each with a residual connection.

    Args:
        num_heads: Attention heads; the width ``E`` of the input must be divisible by it.
        intermediate_dim: Width of the MLP.
        attention: The attention (`examples.common.attention.AttentionConfig`, a
            dict of its fields, or None for the defaults).
        dropout: Dropout after the attention and after the MLP.
        attention_dropout: Dropout on the attention weights.
        norm_first: Layer norm before each sub-block (GPT, ViT) or after each
            residual sum (BERT).
        causal: Attention with ``use_causal_mask=True`` (GPT): whatever the pattern
            allows is intersected with causal.
        activation: Activation of the MLP's first layer.
        layer_norm_epsilon: Epsilon of the layer norms.
        reset_positions: The attention's position encoding and score_mods count
            positions from the start of each packed document (keras_attn layers'
            ``reset_positions``; the reference layer has none).

    Call arguments:
        x: ``(B, T, E)``.
        padding_mask: Optional bool ``(B, T)``: the keys to attend to (padding is
            False). Only keys are masked, so no query row is left without a key.
        segment_ids: Optional int ``(B, T)`` of packed documents: a token attends
            only to the tokens of its own document.
        cache: Optional ``(B, 2, S, H, E // H)`` key/value cache of this block
            (keras_attn layers only).
        cache_update_index: Position of ``x[:, 0]`` in the cache.
        return_attention_scores: Also return the attention weights ``(B, H, T, S)``.
        training: Whether dropout is on.

    Returns:
        ``(B, T, E)``; then the weights if asked; then the new cache if given one.

    Raises:
        ValueError: ``E`` is not divisible by `num_heads` (when built).
    """

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        attention=None,
        dropout=0.0,
        attention_dropout=0.0,
        norm_first=True,
        causal=False,
        activation="gelu",
        layer_norm_epsilon=1e-5,
        reset_positions=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = validation.positive_int(num_heads, "num_heads")
        self.intermediate_dim = validation.positive_int(intermediate_dim, "intermediate_dim")
        self.attention_config = AttentionConfig.from_dict(attention)
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.norm_first = validation.boolean(norm_first, "norm_first")
        self.causal = validation.boolean(causal, "causal")
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.reset_positions = validation.boolean(reset_positions, "reset_positions")

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim % self.num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={self.num_heads}"
            )
        dtype = self.dtype_policy

        def norm(name):
            layer = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon, dtype=dtype, name=name
            )
            layer.build(input_shape)
            return layer

        extra = {}
        if self.reset_positions and not self.attention_config.is_reference:
            extra["reset_positions"] = True
        self.attention = self.attention_config.make_layer(
            self.num_heads,
            hidden_dim // self.num_heads,
            dropout=self.attention_dropout,
            name="attention",
            dtype=dtype,
            **extra,
        )
        if isinstance(self.attention, keras_attn.SelfAttention):
            self.attention.build(input_shape)
        else:
            self.attention.build(input_shape, input_shape)
        self.attention_norm = norm("attention_norm")
        self.attention_output_dropout = keras.layers.Dropout(self.dropout, dtype=dtype)
        self.mlp_in = keras.layers.Dense(
            self.intermediate_dim, activation=self.activation, dtype=dtype, name="mlp_in"
        )
        self.mlp_in.build(input_shape)
        self.mlp_out = keras.layers.Dense(hidden_dim, dtype=dtype, name="mlp_out")
        self.mlp_out.build((*input_shape[:-1], self.intermediate_dim))
        self.mlp_norm = norm("mlp_norm")
        self.mlp_dropout = keras.layers.Dropout(self.dropout, dtype=dtype)

    def attend(self, x, padding_mask=None, segment_ids=None, training=None, **kwargs):
        """The block's attention on `x` ``(B, T, E)`` (no residual, no norm).

        keras_attn layers take `segment_ids` themselves; for the reference they
        become a ``(B, T, T)`` mask. `keras_attn.SelfAttention` takes its input
        once. `kwargs` (``cache``, ``cache_update_index``,
        ``return_attention_scores``) go to the layer as they are.
        """
        kwargs = dict(kwargs, training=training)
        if self.causal:
            kwargs["use_causal_mask"] = True
        ours = isinstance(self.attention, keras_attn.Attention)
        if segment_ids is not None and ours:
            kwargs["segment_ids"] = segment_ids
        elif segment_ids is not None:  # the reference: the same as a (B, T, T) mask
            kwargs["attention_mask"] = ops.equal(segment_ids[:, :, None], segment_ids[:, None, :])
        if isinstance(self.attention, keras_attn.SelfAttention):
            if padding_mask is not None:
                # Its `mask` pads queries too; the keys alone are masked as (B, 1, T).
                kwargs["attention_mask"] = ops.expand_dims(padding_mask, 1)
            return self.attention(x, **kwargs)
        if padding_mask is not None:
            kwargs["value_mask"] = padding_mask
        return self.attention(x, x, **kwargs)

    def call(
        self,
        x,
        padding_mask=None,
        segment_ids=None,
        cache=None,
        cache_update_index=None,
        return_attention_scores=False,
        training=None,
    ):
        kwargs = {}
        if return_attention_scores:
            kwargs["return_attention_scores"] = True
        if cache is not None:
            kwargs.update(cache=cache, cache_update_index=cache_update_index)
        h = self.attention_norm(x) if self.norm_first else x
        outputs = self.attend(h, padding_mask, segment_ids, training=training, **kwargs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        x = x + self.attention_output_dropout(outputs[0], training=training)
        if not self.norm_first:
            x = self.attention_norm(x)

        h = self.mlp_norm(x) if self.norm_first else x
        h = self.mlp_dropout(self.mlp_out(self.mlp_in(h)), training=training)
        x = x + h
        if not self.norm_first:
            x = self.mlp_norm(x)
        return x if len(outputs) == 1 else (x, *outputs[1:])

    def compute_output_spec(
        self,
        x,
        padding_mask=None,
        segment_ids=None,
        cache=None,
        cache_update_index=None,
        return_attention_scores=False,
        training=None,
    ):
        result = (keras.KerasTensor(x.shape, dtype=self.compute_dtype),)
        if return_attention_scores:
            key_length = cache.shape[2] if cache is not None else x.shape[1]
            shape = (x.shape[0], self.num_heads, x.shape[1], key_length)
            result += (keras.KerasTensor(shape, dtype=self.compute_dtype),)
        if cache is not None:
            result += (keras.KerasTensor(cache.shape, dtype=cache.dtype),)
        return result[0] if len(result) == 1 else result

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            attention=self.attention_config.to_dict(),
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            norm_first=self.norm_first,
            causal=self.causal,
            activation=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon,
            reset_positions=self.reset_positions,
        )
        return config
