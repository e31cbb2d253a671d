"""Drop-ins for Keras's own attention layers: same arguments, same weights, same numbers.

`MultiHeadAttention` and `GroupedQueryAttention` take Keras's constructor and call
arguments, build Keras's weights in Keras's order, honour Keras's override points
(`build`, `_compute_attention`, `_masked_softmax`, `_get_common_kwargs_for_sublayer`,
`_build_attention`) and pass Keras's own test files. Where they differ, they differ on
purpose: a query row with no allowed key gets zero weights (Keras spreads them
uniformly over the masked keys), and the caller's tensors keep their Keras masks.

A subclass written against Keras's class reads its private attributes: the
constructor's (`_num_heads`, `_key_dim`, `_use_bias`, `_kernel_initializer`, ...) and,
once `_build_attention` ran, `_dot_product_equation`, `_combine_equation`, `_softmax`
and `_dropout_layer` (KerasHub's Whisper, Moonshine and XLNet attention build their
projections themselves from them). The drop-ins have them with Keras's meaning
(`KERAS_PRIVATE_ATTRIBUTES` lists them), so such a subclass of keras_attn's class runs
unchanged; Keras's other private names are not part of the contract.
"""

import math
import string

import keras
from keras import ops

from keras_attn import patterns as patterns_module
from keras_attn.components import builtin
from keras_attn.layers.attention import Attention


def _check_positive(value, name, allow_none=False):
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        expected = "a positive integer or `None`" if allow_none else "a positive integer"
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected {expected}. "
            f"Received: {name}={value}"
        )


def _sliding_window_pattern(sliding_window, kwargs):
    if sliding_window is None:
        return
    if (
        not isinstance(sliding_window, int)
        or isinstance(sliding_window, bool)
        or sliding_window <= 0
    ):
        raise ValueError(
            "`sliding_window` must be `None` or a positive integer. "
            f"Received: sliding_window={sliding_window}"
        )
    if "pattern" in kwargs:
        raise ValueError("Pass either `sliding_window` or `pattern`, not both.")
    kwargs["pattern"] = patterns_module.Local(sliding_window)


# Keras's private names that keras_attn's MultiHeadAttention has, with Keras's meaning.
KERAS_PRIVATE_ATTRIBUTES = (
    # Set by the constructor (an alias of the public attribute, read and written).
    "_num_heads", "_key_dim", "_value_dim", "_dropout", "_use_bias", "_use_gate",
    "_output_shape", "_attention_axes", "_flash_attention", "_sliding_window",
    "_kernel_initializer", "_bias_initializer", "_kernel_regularizer",
    "_bias_regularizer", "_activity_regularizer", "_kernel_constraint",
    "_bias_constraint", "_inverse_sqrt_key_dim",
    # Set by `_build_attention`.
    "_dot_product_equation", "_combine_equation", "_softmax", "_dropout_layer",
    # Set by `build`.
    "_query_dense", "_key_dense", "_value_dense", "_output_dense", "_gate_dense",
)  # fmt: skip


def _alias(public):
    """Keras's private spelling of the public attribute `public` (read and written)."""

    def get(self):
        return getattr(self, public)

    def set(self, value):
        setattr(self, public, value)

    return property(get, set, doc=f"Keras's private name of `{public}`.")


def _attention_equations(rank, attention_axes):
    """Keras's einsum equations of multi-head attention over heads of rank `rank`.

    Heads are ``(B, *dims, H, D)``; the scores are laid out as Keras's,
    ``(B, *other dims, H, *query attention axes, *key attention axes)``.

    Args:
        rank: Rank of the projected heads (the inputs' rank plus one).
        attention_axes: Axes of the heads attended over (resolved, positive).

    Returns:
        ``(dot_product_equation, combine_equation)``: the first takes ``(key, query)``
        to the scores, the second ``(weights, value)`` to the output.
    """
    letters = string.ascii_lowercase
    query = letters[:rank]
    key = list(query)
    for i, axis in enumerate(attention_axes):
        key[axis] = letters[rank + i]  # key positions get letters of their own
    key = "".join(key)
    others = "".join(query[i] for i in range(rank - 1) if i not in attention_axes)
    scores = (
        others + "".join(query[a] for a in attention_axes) + "".join(key[a] for a in attention_axes)
    )
    return f"{key},{query}->{scores}", f"{scores},{key}->{query}"


class _KerasDropIn(Attention):
    """What both drop-ins share: the gate, sliding windows and Keras's private names."""

    _num_heads = _alias("num_heads")
    _dropout = _alias("dropout")
    _use_bias = _alias("use_bias")
    _use_gate = _alias("use_gate")
    _kernel_initializer = _alias("kernel_initializer")
    _bias_initializer = _alias("bias_initializer")
    _kernel_regularizer = _alias("kernel_regularizer")
    _bias_regularizer = _alias("bias_regularizer")
    _activity_regularizer = _alias("activity_regularizer")
    _kernel_constraint = _alias("kernel_constraint")
    _bias_constraint = _alias("bias_constraint")

    def _build_attention(self, rank):
        """As `Attention._build_attention`, then Keras's equations and `_softmax`.

        A subclass that builds its own projections (KerasHub's Whisper, Moonshine,
        XLNet) calls this from its `build`, then reads them.
        """
        super()._build_attention(rank)
        self._dot_product_equation, self._combine_equation = self._attention_equations(rank)
        self._num_key_axes = len(self._attention_axes)
        self._softmax = self._normalize_over_key_axes

    def _attention_equations(self, rank):
        return _attention_equations(rank, self._attention_axes)

    def _normalize_over_key_axes(self, inputs, mask=None):
        """Keras's `_softmax`: the layer's normalizer over the scores' key axes.

        Args:
            inputs: Scores in Keras's layout, the key axes last.
            mask: Bool (or 0/1) mask broadcastable to `inputs`, True where allowed.

        Returns:
            The weights, shaped as `inputs`; a row with no allowed key is all zero.
        """
        normalizer = self.components.normalizer
        n = self._num_key_axes
        if n == 1:
            return normalizer(inputs, mask=mask)
        shape = ops.shape(inputs)
        flat = (*shape[:-n], -1)  # the key axes as one
        if mask is not None:
            mask = ops.reshape(ops.broadcast_to(ops.cast(mask, "bool"), shape), flat)
        return ops.reshape(normalizer(ops.reshape(inputs, flat), mask=mask), shape)

    def _post_build(self):
        # A subclass whose own `build` replaces keras_attn's (KerasHub's, written
        # for Keras's class) has not attached the components: attach them here, as
        # the build ends, so their weights are tracked before the state is locked.
        if getattr(self, "_normalizer", None) is None and hasattr(self, "_num_key_axes"):
            unknown = (None,) * (max(self._attention_axes, default=0) + 1)  # any lengths
            self._build_components(unknown, unknown)
        super()._post_build()

    def _build_extra_projections(self, query_shape):
        # Keras builds the gate between key and value; keep its weight order.
        if self.use_gate:
            self._gate_dense = self._projection(
                "gate", len(query_shape), self.num_heads, self._value_dim, activation="sigmoid"
            )
            self._gate_dense.build(query_shape)

    def _gate(self, query):
        return self._gate_dense(query) if self.use_gate else None

    @property
    def _flash_attention(self):
        return self.flash_attention or keras.config.is_flash_attention_enabled()

    @property
    def _sliding_window(self):
        return self.sliding_window

    def get_config(self):
        config = super().get_config()
        if self.sliding_window is not None:
            config.pop("pattern")
        return {**config, "sliding_window": self.sliding_window, "use_gate": self.use_gate}


@builtin("layer")
class MultiHeadAttention(_KerasDropIn):
    """Drop-in replacement for `keras.layers.MultiHeadAttention`.

    Same constructor and call arguments, same weights in the same order and shapes:
    ``ours.set_weights(theirs.get_weights())`` gives the same outputs and scores, for
    inputs of any rank and any `attention_axes`. It also accepts every `Attention`
    argument (score, pattern, normalizer, num_key_value_heads, ...), and
    `Attention.call`'s `cache` and `cache_update_index`.
    Differences: a query row that may attend to no key gets zero weights where
    Keras spreads them uniformly, and the inputs keep their Keras masks.

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each head for query and key.
        value_dim: Size of each head for value. Defaults to `key_dim`.
        dropout: Dropout rate on the attention weights.
        use_bias: Whether the projections have biases.
        output_shape: Output features besides the batch and attended axes: an int or
            a tuple (``(8, 8)`` gives ``(B, T, 8, 8)``). Defaults to the query's.
        attention_axes: Axes attended over (None: every axis but batch, heads and
            features).
        sliding_window: If set, query i attends to keys with ``|i - j| < sliding_window``.
        use_gate: Gate the attention output with a sigmoid projection of the query.
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
        _check_positive(num_heads, "num_heads")
        _check_positive(key_dim, "key_dim")
        _check_positive(value_dim, "value_dim", allow_none=True)
        _sliding_window_pattern(sliding_window, kwargs)
        self.sliding_window = sliding_window
        self.use_gate = use_gate
        super().__init__(
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            dropout=dropout,
            use_bias=use_bias,
            output_shape=output_shape,
            attention_axes=attention_axes,
            **kwargs,
        )
        # Keras's private names of the constructor's values (`build` resolves them
        # again; `_build_attention` resolves the axes).
        self._key_dim = key_dim
        self._value_dim = value_dim or key_dim
        self._attention_axes = self._attention_axes_arg

    @property
    def _inverse_sqrt_key_dim(self):
        """Keras's scale of the dot products, ``1 / sqrt(key_dim)``."""
        return 1.0 / math.sqrt(float(self._key_dim))


@builtin("layer")
class GroupedQueryAttention(_KerasDropIn):
    """Drop-in replacement for `keras.layers.GroupedQueryAttention`.

    Same constructor and call arguments and the same weights, so
    ``ours.set_weights(theirs.get_weights())`` gives the same outputs and scores.
    Keys and values have `num_key_value_heads` heads, each shared by
    ``num_query_heads // num_key_value_heads`` query heads; a key/value cache holds
    only the key/value heads. It also accepts every `Attention` argument.
    Differences: as `MultiHeadAttention`.

    Args:
        head_dim: Size of each head (queries, keys and values).
        num_query_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads; divides `num_query_heads`.
        dropout: Dropout rate on the attention weights.
        use_bias: Whether the projections have biases.
        sliding_window: If set, query i attends to keys with ``|i - j| < sliding_window``.
        use_gate: Gate the attention output with a sigmoid projection of the query.
        **kwargs: As `keras.layers.GroupedQueryAttention` and `Attention`.
    """

    name = "grouped_query"

    def __init__(
        self,
        head_dim,
        num_query_heads,
        num_key_value_heads,
        dropout=0.0,
        use_bias=True,
        sliding_window=None,
        use_gate=False,
        **kwargs,
    ):
        if num_query_heads % num_key_value_heads != 0:
            raise ValueError("`num_query_heads` must be divisible by `num_key_value_heads`.")
        _sliding_window_pattern(sliding_window, kwargs)
        self.sliding_window = sliding_window
        self.use_gate = use_gate
        self._return_attention_scores = False
        super().__init__(
            num_heads=num_query_heads,
            key_dim=head_dim,
            dropout=dropout,
            use_bias=use_bias,
            num_key_value_heads=num_key_value_heads,
            **kwargs,
        )

    @property
    def head_dim(self):
        return self.key_dim

    @property
    def num_query_heads(self):
        return self.num_heads

    @property
    def num_repeats(self):
        return self.num_heads // self.num_key_value_heads

    @property
    def _inverse_sqrt_head_dim(self):
        """Keras's scale of the dot products, ``1 / sqrt(head_dim)``."""
        return 1.0 / math.sqrt(float(self.head_dim))

    def _attention_equations(self, rank):
        # Keras's GroupedQueryAttention's: query first, heads (B, T, H, D).
        return "bquh,bkuh->buqk", "buqk,bkuh->bquh"

    def call(
        self,
        query,
        value=None,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        use_causal_mask=False,
        return_attention_scores=False,
        training=None,
        cache=None,
        cache_update_index=None,
    ):
        self._return_attention_scores = return_attention_scores
        return super().call(
            query,
            value,
            key,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            use_causal_mask=use_causal_mask,
            return_attention_scores=return_attention_scores,
            training=training,
            cache=cache,
            cache_update_index=cache_update_index,
        )

    def _invoke_compute_attention(self, q, k, v, mask, training, return_attention_scores):
        # Keras's GroupedQueryAttention passes these by keyword, and the scores flag
        # through `self._return_attention_scores`.
        return self._compute_attention(q, k, v, attention_mask=mask, training=training)

    def _compute_attention(
        self, query, key, value, attention_mask=None, training=None, use_causal_mask=False
    ):
        """As `Attention._compute_attention`, with Keras's GroupedQueryAttention signature."""
        return super()._compute_attention(
            query,
            key,
            value,
            attention_mask,
            training,
            self._return_attention_scores,
            use_causal_mask=use_causal_mask,
        )

    def compute_output_shape(self, query_shape, value_shape=None, key_shape=None):
        value_shape = query_shape if value_shape is None else value_shape
        if query_shape[-1] != value_shape[-1]:
            raise ValueError(
                "The last dimension of `query_shape` and `value_shape` must be equal, but "
                f"are {query_shape[-1]}, {value_shape[-1]}. Received: "
                f"query_shape={query_shape}, value_shape={value_shape}"
            )
        return super().compute_output_shape(query_shape, value_shape, key_shape)

    def get_config(self):
        config = super().get_config()
        for name in ("num_heads", "key_dim", "value_dim", "output_shape", "attention_axes"):
            config.pop(name)
        return {
            **config,
            "head_dim": self.head_dim,
            "num_query_heads": self.num_heads,
            "num_key_value_heads": self.num_key_value_heads,
        }
