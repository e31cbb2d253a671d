"""The named presets of `Attention`: soft, hard, global, local, self and cross attention.

Each fixes one component or the call's inputs and is otherwise `Attention`, so every
combination works (e.g. hard + local + cross + 4 heads).
"""

from keras_attn import patterns as patterns_module
from keras_attn.components import builtin
from keras_attn.layers.attention import Attention


def _preset_config(config, fixed):
    """Drop the constructor arguments a preset sets itself from a config."""
    return {k: v for k, v in config.items() if k not in fixed}


@builtin("layer")
class SoftAttention(Attention):
    """Soft attention: `Attention` with the ``softmax`` normalizer.

    Args:
        **kwargs: As `Attention`, except `normalizer`.
    """

    name = "soft"

    def __init__(self, num_heads=1, **kwargs):
        kwargs.setdefault("normalizer", "softmax")
        super().__init__(num_heads=num_heads, **kwargs)


@builtin("layer")
class HardAttention(Attention):
    """Hard attention: each query takes the value of its single best allowed key.

    The forward pass puts weight 1.0 on the argmax; gradients flow through the
    softmax (straight-through), so the layer trains.

    Args:
        gumbel: Sample the key with Gumbel noise while training.
        temperature: Temperature of the straight-through softmax.
        **kwargs: As `Attention`, except `normalizer`.
    """

    name = "hard"

    def __init__(self, num_heads=1, gumbel=False, temperature=1.0, **kwargs):
        kwargs.pop("normalizer", None)
        self.gumbel = gumbel
        self.temperature = temperature
        normalizer = {
            "name": "hard",
            "config": {"gumbel": gumbel, "temperature": temperature, "seed": kwargs.get("seed")},
        }
        super().__init__(num_heads=num_heads, normalizer=normalizer, **kwargs)

    def get_config(self):
        config = _preset_config(super().get_config(), {"normalizer"})
        return {**config, "gumbel": self.gumbel, "temperature": self.temperature}


@builtin("layer")
class GlobalAttention(Attention):
    """Global attention: every query attends to every key (the ``full`` pattern).

    Args:
        **kwargs: As `Attention`, except `pattern`.
    """

    name = "global"

    def __init__(self, num_heads=1, **kwargs):
        kwargs.pop("pattern", None)
        super().__init__(num_heads=num_heads, pattern="full", **kwargs)

    def get_config(self):
        return _preset_config(super().get_config(), {"pattern"})


@builtin("layer")
class LocalAttention(Attention):
    """Local (sliding window) attention: query i attends to keys with ``|i - j| < window``.

    Runs on the block-sparse path for long inputs, so cost grows with
    ``T * window`` rather than ``T**2``.

    Args:
        window: Positive integer, the window's half-width plus one (as
            `keras.layers.MultiHeadAttention(sliding_window=...)`).
        causal: Attend only to keys ``i - window < j <= i``.
        **kwargs: As `Attention`, except `pattern`.
    """

    name = "local"

    def __init__(self, window=None, causal=False, num_heads=1, **kwargs):
        kwargs.pop("pattern", None)
        if window is None:
            raise ValueError(
                "LocalAttention needs `window`, a positive integer. Received: window=None"
            )
        pattern = patterns_module.Local(window, causal=causal)
        self.window = window
        self.causal = causal
        super().__init__(num_heads=num_heads, pattern=pattern, **kwargs)

    def get_config(self):
        config = _preset_config(super().get_config(), {"pattern"})
        return {**config, "window": self.window, "causal": self.causal}


@builtin("layer")
class SelfAttention(Attention):
    """Self-attention: queries, keys and values all come from `inputs`.

    Call arguments:
        inputs: ``(B, T, dim)``.
        mask: Bool ``(B, T)`` padding mask (taken from the Keras mask if unset).
        Other arguments as `Attention.call`.
    """

    name = "self"

    def build(self, inputs_shape):
        super().build(inputs_shape, inputs_shape, inputs_shape)

    def call(
        self,
        inputs,
        mask=None,
        attention_mask=None,
        use_causal_mask=False,
        return_attention_scores=False,
        training=None,
        cache=None,
        cache_update_index=None,
        segment_ids=None,
    ):
        if mask is not None and len(mask.shape) > 2:
            raise ValueError(
                "SelfAttention takes one input, `inputs`, for queries, keys and values; its "
                "second argument is the padding `mask` (B, T). For separate query and value "
                "tensors use CrossAttention or MultiHeadAttention. "
                f"Received: mask.shape={tuple(mask.shape)}"
            )
        return super().call(
            inputs,
            inputs,
            inputs,
            query_mask=mask,
            value_mask=mask,
            attention_mask=attention_mask,
            use_causal_mask=use_causal_mask,
            return_attention_scores=return_attention_scores,
            training=training,
            cache=cache,
            cache_update_index=cache_update_index,
            segment_ids=segment_ids,
        )

    def compute_output_shape(self, inputs_shape, *args, **kwargs):
        return super().compute_output_shape(inputs_shape)

    def compute_output_spec(
        self, inputs, mask=None, return_attention_scores=False, cache=None, **kwargs
    ):
        return super().compute_output_spec(
            inputs, return_attention_scores=return_attention_scores, cache=cache
        )


@builtin("layer")
class CrossAttention(Attention):
    """Cross-attention: queries from `query`, keys and values from `context`.

    Call arguments:
        query: ``(B, Tq, dim)``.
        context: ``(B, Tk, dim_c)``.
        query_mask: Bool ``(B, Tq)`` (taken from the Keras mask if unset).
        context_mask: Bool ``(B, Tk)`` (taken from the Keras mask if unset).
        Other arguments as `Attention.call`.
    """

    name = "cross"

    def build(self, query_shape, context_shape=None):
        if context_shape is None:
            raise ValueError("CrossAttention needs a `context` input. Received: context=None")
        super().build(query_shape, context_shape, context_shape)

    def call(
        self,
        query,
        context=None,
        query_mask=None,
        context_mask=None,
        attention_mask=None,
        use_causal_mask=False,
        return_attention_scores=False,
        training=None,
        cache=None,
        cache_update_index=None,
        query_segment_ids=None,
        key_segment_ids=None,
    ):
        if context is None:
            raise ValueError(
                "CrossAttention needs a `context` tensor (B, Tk, dim). Received: context=None"
            )
        return super().call(
            query,
            context,
            context,
            query_mask=query_mask,
            value_mask=context_mask,
            attention_mask=attention_mask,
            use_causal_mask=use_causal_mask,
            return_attention_scores=return_attention_scores,
            training=training,
            cache=cache,
            cache_update_index=cache_update_index,
            query_segment_ids=query_segment_ids,
            key_segment_ids=key_segment_ids,
        )

    def compute_output_shape(self, query_shape, context_shape=None, *args, **kwargs):
        return super().compute_output_shape(query_shape, context_shape)

    def compute_output_spec(
        self, query, context=None, return_attention_scores=False, cache=None, **kwargs
    ):
        return super().compute_output_spec(
            query, context, return_attention_scores=return_attention_scores, cache=cache
        )
