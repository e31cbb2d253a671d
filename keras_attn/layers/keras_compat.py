"""Drop-ins for Keras's own attention layers: same arguments, same weights, same numbers."""

import keras

from keras_attn import patterns as patterns_module
from keras_attn import validation
from keras_attn.components import builtin
from keras_attn.layers.attention import Attention


@builtin("layer")
class MultiHeadAttention(Attention):
    """Drop-in replacement for `keras.layers.MultiHeadAttention`.

    Same constructor and call arguments, same weights in the same order and shapes:
    ``ours.set_weights(theirs.get_weights())`` gives the same outputs and scores.
    It also accepts every `Attention` argument (score, pattern, normalizer, ...).
    Differences: inputs must be rank 3 (`attention_axes` must be None or the
    sequence axis), and a query row that may attend to no key gets zero weights
    where Keras spreads them uniformly.

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each head for query and key.
        value_dim: Size of each head for value. Defaults to `key_dim`.
        sliding_window: If set, query i attends to keys with ``|i - j| < sliding_window``.
        use_gate: Gate the attention output with a sigmoid projection of the query.
        attention_axes: None (or ``1``/``(1,)``): attention over the sequence axis.
        **kwargs: As `keras.layers.MultiHeadAttention` and `Attention`.
    """

    name = "multi_head"

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        sliding_window=None,
        use_gate=False,
        **kwargs,
    ):
        if attention_axes not in (None, 1, -2, (1,), [1], (-2,), [-2]):
            raise ValueError(
                "keras_attn.MultiHeadAttention attends over the sequence axis of "
                "(B, T, dim) inputs only. Expected attention_axes=None or 1. "
                f"Received: attention_axes={attention_axes}"
            )
        if key_dim is None:
            raise ValueError(
                "`key_dim` is required, as in keras.layers.MultiHeadAttention. Received: key_dim=None"
            )
        if sliding_window is not None:
            validation.positive_int(sliding_window, "sliding_window")
            if "pattern" in kwargs:
                raise ValueError("Pass either `sliding_window` or `pattern`, not both.")
            kwargs["pattern"] = patterns_module.Local(sliding_window)
        self.attention_axes = None if attention_axes is None else (1,)
        self.sliding_window = sliding_window
        self.use_gate = use_gate
        super().__init__(
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            dropout=dropout,
            use_bias=use_bias,
            output_shape=output_shape,
            **kwargs,
        )

    def _build_extra_projections(self, query_shape):
        # Keras builds the gate between key and value; keep its weight order.
        if self.use_gate:
            self._gate_dense = keras.layers.EinsumDense(
                "abc,cde->abde",
                output_shape=(None, self.num_heads, self._value_dim or self._key_dim),
                bias_axes="de" if self.use_bias else None,
                activation="sigmoid",
                name="gate",
                **self._dense_kwargs(),
            )
            self._gate_dense.build(query_shape)

    def _gate(self, query):
        return self._gate_dense(query) if self.use_gate else None

    def get_config(self):
        config = super().get_config()
        if self.sliding_window is not None:
            config.pop("pattern")
        return {
            **config,
            "attention_axes": self.attention_axes,
            "sliding_window": self.sliding_window,
            "use_gate": self.use_gate,
        }
