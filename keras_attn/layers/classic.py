"""Luong's and Bahdanau's attention, as Keras has them, on keras_attn's engine.

`LuongAttention` is a drop-in for `keras.layers.Attention` (Luong's dot-product
attention, with his "concat" score as an option) and `BahdanauAttention` (also under
Keras's name, `AdditiveAttention`) one for `keras.layers.AdditiveAttention`: the same
constructor and call arguments, the same weights in the same order and shapes, the
same masks and outputs. Neither projects its inputs: queries, keys and values are
attended as given, as one head.

They are keras_attn layers: their score is a registered component
(`keras_attn.scores.LuongScore`, ``"luong"``, and `keras_attn.scores.BahdanauScore`,
``"bahdanau"``, usable in any keras_attn layer) and they take
`pattern`, `normalizer` and `score_mods`, so a classic model turns into, say, local or
sparsemax attention with one argument (or with `from_keras`, from Keras's layer).
"""

import keras
from keras import ops

from keras_attn import dispatch
from keras_attn import patterns as patterns_module
from keras_attn import plugins
from keras_attn import saving
from keras_attn import validation
from keras_attn.components import Components
from keras_attn.components import builtin
from keras_attn.components import score_mods_arg
from keras_attn.positions import make_positions
from keras_attn.scores import BahdanauScore
from keras_attn.scores import LuongScore

__all__ = [
    "AdditiveAttention",
    "BahdanauAttention",
    "LuongAttention",
    "from_keras",
]

# -- layers -------------------------------------------------------------------------


class _ClassicAttention(keras.layers.Layer):
    """What Luong's and Bahdanau's layers share: Keras's call, masks and outputs.

    Subclasses set their own constructor arguments and make their score in `_make_score`.
    """

    def __init__(
        self,
        dropout=0.0,
        seed=None,
        pattern="full",
        normalizer="softmax",
        score_mods=(),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.dropout = validation.number(dropout, "dropout", 0.0, 1.0, high_open=True)
        self.seed = validation.integer(seed, "seed", allow_none=True)
        score_mods = score_mods_arg(score_mods)
        defaults = {"dtype": self.dtype_policy}
        # Tracked in this order, so the score's weights come first, as in Keras's layer.
        self._score = self._make_score()
        self._score_mods = [plugins.resolve("score_mod", m, **defaults) for m in score_mods]
        self._pattern = plugins.resolve("pattern", pattern)
        self._normalizer = plugins.resolve("normalizer", normalizer, **defaults)
        self._dropout_layer = None
        if self.dropout > 0:
            self._dropout_layer = keras.layers.Dropout(
                self.dropout, seed=self.seed, dtype=self.dtype_policy
            )
        self.last_path = None

    def _make_score(self):
        raise NotImplementedError(f"{type(self).__name__} must implement _make_score().")

    # -- components ---------------------------------------------------------------

    @property
    def score(self):
        """The layer's `keras_attn.Score` (it holds the weights)."""
        return self._score

    @property
    def score_mods(self):
        return list(self._score_mods)

    @property
    def pattern(self):
        return self._pattern

    @property
    def normalizer(self):
        return self._normalizer

    @property
    def components(self):
        """The layer's `keras_attn.components.Components` (its own pattern, no dropout)."""
        return Components(self._score, tuple(self._score_mods), self._pattern, self._normalizer)

    @property
    def scale(self):
        """The ``scale`` weight (as on Keras's layer), or None."""
        return getattr(self._score, "scale", None)

    # -- build and call -----------------------------------------------------------

    def build(self, input_shape):
        self._validate_inputs(input_shape)
        query_shape = tuple(input_shape[0])
        key_shape = tuple(input_shape[2] if len(input_shape) > 2 else input_shape[1])
        if None not in (query_shape[-1], key_shape[-1]) and query_shape[-1] != key_shape[-1]:
            raise ValueError(
                f"{type(self).__name__} scores a query against a key feature by feature, so "
                "they need the same last dimension. Received: "
                f"query.shape={query_shape}, key.shape={key_shape}"
            )
        logits_shape = (None, 1, query_shape[-2], key_shape[-2])  # (B, H, Tq, Tk)
        if not self._score.built:
            self._score.build((None, 1, *query_shape[-2:]), (None, 1, *key_shape[-2:]))
        for mod in self._score_mods:
            if getattr(mod, "num_heads", "unset") is None:
                mod.num_heads = 1
            if not mod.built:
                mod.build(logits_shape)
        if not self._normalizer.built:
            self._normalizer.build(logits_shape)

    def call(
        self,
        inputs,
        mask=None,
        training=False,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        self._validate_inputs(inputs, mask)
        query, value = inputs[0], inputs[1]
        key = inputs[2] if len(inputs) > 2 else value
        query_mask = mask[0] if mask else None
        value_mask = mask[1] if mask else None
        dropout_active = bool(training) and self._dropout_layer is not None
        output, weights = self._attend(
            _as_heads(query),
            _as_heads(key),
            _as_heads(value),
            value_mask=None if value_mask is None else _flat(value_mask, 1),
            pattern=patterns_module.with_causal(self._pattern, use_causal_mask),
            return_weights=return_attention_scores or dropout_active,
            training=training,
        )
        if dropout_active:
            # Keras drops out the weights it returns, so they are formed, dropped out and
            # applied here (the engine would return them before its dropout).
            weights = self._dropout_layer(weights, training=training)
            values = _flat(value, 2)  # (N, Tk, Dv)
            if value_mask is not None:
                values = ops.where(_flat(value_mask, 1)[..., None], values, 0)
            output = ops.matmul(ops.cast(weights, values.dtype), values)  # (N, Tq, Dv)
        if len(query.shape) > 3:
            output = ops.reshape(output, (*ops.shape(query)[:-1], ops.shape(value)[-1]))
        if query_mask is not None:
            output = ops.where(ops.cast(query_mask, "bool")[..., None], output, 0)
        if not return_attention_scores:
            return output
        if len(query.shape) > 3:
            weights = ops.reshape(weights, (*ops.shape(query)[:-1], ops.shape(key)[-2]))
        return output, weights

    def _attend(self, q, k, v, value_mask, pattern, return_weights, training):
        """The engine on one head: ``q (N, Tq, 1, D)`` -> ``(N, Tq, Dv)``, ``(N, Tq, Tk)``."""
        mask = None
        if value_mask is not None:
            mask = ops.cast(value_mask, "bool")[:, None, None, :]  # (N, 1, 1, Tk)
        output, weights, plan = dispatch.run(
            self.components.replace(pattern=pattern),
            dispatch.Heads(q, k, v, mask),
            dispatch.Settings(name=self.name),
            training=training,
            return_weights=return_weights,
        )
        self.last_path = plan.path
        output = output[:, :, 0, :]  # (N, Tq, Dv)
        return output, None if weights is None else weights[:, 0]  # (N, Tq, Tk)

    # -- Keras's helpers, with Keras's signatures ----------------------------------

    def _calculate_scores(self, query, key):
        """The logits ``(B, Tq, Tk)`` of ``query (B, Tq, D)`` and ``key (B, Tk, D)``."""
        return self._score(query, key)

    def _calculate_score_mask(self, scores, v_mask, use_causal_mask):
        """The mask ``(B|1, Tq, Tk)`` of the value mask, the pattern and the causal mask.

        As Keras's: the value mask as it is when the pattern allows every pair.
        """
        pattern = patterns_module.with_causal(self._pattern, use_causal_mask)
        if pattern.kernel_form == "full":
            return v_mask
        tq, tk = scores.shape[-2], scores.shape[-1]
        allowed = ops.broadcast_to(pattern.mask(make_positions(tq, tk, 1)), (1, 1, tq, tk))
        allowed = allowed[:, 0]  # (1, Tq, Tk)
        if v_mask is None:
            return allowed
        return ops.logical_and(ops.expand_dims(ops.cast(v_mask, "bool"), -2), allowed)

    def _apply_scores(self, scores, value, scores_mask=None, training=False):
        """The normalizer and dropout on `scores`, then the weighted sum of `value`.

        Args:
            scores: Logits ``(B, Tq, Tk)``.
            value: ``(B, Tk, Dv)``.
            scores_mask: Bool ``(B, Tk)`` or ``(B, Tq, Tk)``, True where allowed, or None.
            training: Whether the dropout is active.

        Returns:
            ``(output (B, Tq, Dv), weights (B, Tq, Tk))``.
        """
        if scores_mask is not None:
            scores_mask = ops.cast(scores_mask, "bool")
            if len(scores_mask.shape) == 2:
                scores_mask = ops.expand_dims(scores_mask, -2)  # (B, 1, Tk)
        weights = self._normalizer(scores, mask=scores_mask, training=training)
        if training and self._dropout_layer is not None:
            weights = self._dropout_layer(weights, training=training)
        return ops.matmul(ops.cast(weights, value.dtype), value), weights

    def _validate_inputs(self, inputs, mask=None):
        class_name = type(self).__name__
        if not isinstance(inputs, list):
            raise ValueError(
                f"{class_name} layer must be called on a list of inputs, namely "
                f"[query, value] or [query, value, key]. Received: inputs={inputs}."
            )
        if len(inputs) < 2 or len(inputs) > 3:
            raise ValueError(
                f"{class_name} layer accepts inputs list of length 2 or 3, namely "
                f"[query, value] or [query, value, key]. Received length: {len(inputs)}."
            )
        if mask is None:
            return
        if not isinstance(mask, list):
            raise ValueError(
                f"{class_name} layer mask must be a list, namely [query_mask, value_mask]. "
                f"Received: mask={mask}."
            )
        if len(mask) < 2 or len(mask) > 3:
            raise ValueError(
                f"{class_name} layer accepts mask list of length 2 or 3. "
                f"Received: inputs={inputs}, mask={mask}."
            )

    def compute_mask(self, inputs, mask=None):
        self._validate_inputs(inputs, mask)
        if mask is None or mask[0] is None:
            return None
        return ops.convert_to_tensor(mask[0])

    def compute_output_shape(self, input_shape):
        return (*input_shape[0][:-1], input_shape[1][-1])

    def compute_output_spec(
        self,
        inputs,
        mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        self._validate_inputs(inputs, mask)
        query, value = inputs[0], inputs[1]
        key = inputs[2] if len(inputs) > 2 else value
        output_shape = self.compute_output_shape([query.shape, value.shape])
        output = keras.KerasTensor(output_shape, dtype=self.compute_dtype)
        if not return_attention_scores:
            return output
        weights_shape = (*query.shape[:-1], key.shape[-2])  # (B, Tq, Tk)
        return output, keras.KerasTensor(weights_shape, dtype=self.compute_dtype)

    # -- config -------------------------------------------------------------------

    @classmethod
    def from_config(cls, config):
        saving.check_layer_config(config, owner=f"{cls.__name__} {config.get('name')!r}")
        return super().from_config(config)

    def get_config(self):
        return {
            **super().get_config(),
            "dropout": self.dropout,
            "seed": self.seed,
            "pattern": plugins.serialize(self._pattern),
            "normalizer": plugins.serialize(self._normalizer),
            "score_mods": [plugins.serialize(m) for m in self._score_mods],
        }


def _as_heads(x):
    """``(B, ..., T, D)`` as one head of the engine: ``(N, T, 1, D)``, N the batch dims."""
    return ops.expand_dims(_flat(x, 2), 2)


def _flat(x, trailing):
    """`x` with every axis before its last `trailing` ones folded into one."""
    x = ops.convert_to_tensor(x)
    if len(x.shape) == trailing + 1:
        return x
    shape = ops.shape(x)
    return ops.reshape(x, (-1, *shape[len(shape) - trailing :]))


@builtin("layer")
class LuongAttention(_ClassicAttention):
    """Luong's dot-product attention: a drop-in for `keras.layers.Attention`.

    ``softmax(scores(query, key)) @ value`` with no projections, where the score is
    ``s * (q · k)`` (``"dot"``) or ``c * sum(tanh(s * (q + k)))`` (``"concat"``), ``s``
    and ``c`` learned scalars (`LuongScore`). Same arguments, weights (``scale``,
    ``concat_score_weight``), masks and outputs as Keras's layer: after
    ``ours.set_weights(theirs.get_weights())`` both give the same outputs and scores.
    It also takes keras_attn's `pattern`, `normalizer` and `score_mods`, which change
    the attention and nothing else (no weights). Differences from Keras's: a query
    row with no allowed key (its value mask all False) gets zero weights where Keras
    spreads them evenly over the masked keys.

    Args:
        use_scale: Learn a scalar ``scale`` multiplying the scores.
        score_mode: ``"dot"`` (the query-key dot product) or ``"concat"`` (the
            hyperbolic tangent of the sum of query and key, summed over features).
        dropout: Fraction of the attention weights to drop while training.
        seed: Seed of the dropout.
        pattern: Which (query, key) pairs may interact (keras_attn's; default
            ``"full"``), e.g. ``keras_attn.patterns.Local(4)``.
        normalizer: How scores become weights (default ``"softmax"``), e.g.
            ``"sparsemax"``.
        score_mods: keras_attn score_mods applied to the scores, in order.
        **kwargs: As `keras.layers.Layer` (``name``, ``dtype``, ...).

    Call arguments:
        inputs: ``[query, value]`` or ``[query, value, key]``: query ``(B, Tq, D)``,
            value ``(B, Tk, Dv)``, key ``(B, Tk, D)`` (defaults to value). Any number
            of leading batch axes: ``(B, ..., T, D)``.
        mask: ``[query_mask, value_mask]``, bool ``(B, Tq)`` and ``(B, Tk)``, True
            for real positions (taken from the inputs' Keras masks if unset). The
            output is zero at masked queries; masked values get no weight.
        training: Whether the dropout is active.
        return_attention_scores: Also return the weights (after dropout, as Keras).
        use_causal_mask: Query i attends only to keys ``j <= i``.

    Returns:
        ``output (B, Tq, Dv)``, and the weights ``(B, Tq, Tk)`` if
        `return_attention_scores`. The query mask is the output's Keras mask.

    Raises:
        ValueError: `score_mode` is not ``"dot"`` or ``"concat"``, `dropout` not in
            [0, 1), `inputs` or `mask` not a list of 2 or 3, or query and key with
            different last dimensions.
    """

    name = "luong"

    def __init__(self, use_scale=False, score_mode="dot", dropout=0.0, seed=None, **kwargs):
        self.use_scale = use_scale
        self.score_mode = score_mode
        super().__init__(dropout=dropout, seed=seed, **kwargs)  # the score checks them
        self.use_scale = self._score.use_scale

    def _make_score(self):
        return LuongScore(self.use_scale, self.score_mode, dtype=self.dtype_policy)

    @property
    def concat_score_weight(self):
        """The ``concat_score_weight`` weight (as on Keras's layer), or None."""
        return getattr(self._score, "concat_score_weight", None)

    def get_config(self):
        return {**super().get_config(), "use_scale": self.use_scale, "score_mode": self.score_mode}

    @classmethod
    def from_keras(cls, layer, **overrides):
        """This layer in place of a `keras.layers.Attention`, holding its weights.

        Args:
            layer: A `keras.layers.Attention` (not a subclass: its own code would be
                lost), built or not.
            **overrides: Constructor arguments to change, e.g. ``pattern=Local(4)``,
                ``normalizer="sparsemax"``, ``dropout=0.1``.

        Returns:
            A `LuongAttention` with the layer's configuration, `overrides` and weights
            (built if `layer` is).

        Raises:
            TypeError: `layer` is not a `keras.layers.Attention` (or is a subclass).
            ValueError: an override this layer does not take.
        """
        return _from_keras(cls, keras.layers.Attention, layer, overrides)


@builtin("layer")
class BahdanauAttention(_ClassicAttention):
    """Bahdanau's additive attention: a drop-in for `keras.layers.AdditiveAttention`.

    ``softmax(sum(v * tanh(query + key))) @ value`` with no projections
    (`BahdanauScore`). Also available as `keras_attn.AdditiveAttention`, Keras's name.
    Same arguments, weights (``scale``, ``(D,)``), masks and outputs as Keras's
    layer; keras_attn's `pattern`, `normalizer` and `score_mods` as in
    `LuongAttention`, and the same one difference (a row with no allowed key).

    Args:
        use_scale: Learn the per-feature weights ``v`` (``scale``); else all ones.
        dropout: Fraction of the attention weights to drop while training.
        seed: Seed of the dropout.
        pattern, normalizer, score_mods: As `LuongAttention`.
        **kwargs: As `keras.layers.Layer` (``name``, ``dtype``, ...).

    Call arguments:
        As `LuongAttention`: ``inputs=[query, value]`` or ``[query, value, key]``,
        ``mask=[query_mask, value_mask]``, `training`, `return_attention_scores`,
        `use_causal_mask`.

    Returns:
        ``output (B, Tq, Dv)``, and the weights ``(B, Tq, Tk)`` if
        `return_attention_scores`.

    Raises:
        ValueError: As `LuongAttention`, but for `score_mode`.
    """

    name = "bahdanau"

    def __init__(self, use_scale=True, dropout=0.0, seed=None, **kwargs):
        self.use_scale = use_scale
        super().__init__(dropout=dropout, seed=seed, **kwargs)  # the score checks it
        self.use_scale = self._score.use_scale

    def _make_score(self):
        return BahdanauScore(self.use_scale, dtype=self.dtype_policy)

    def get_config(self):
        return {**super().get_config(), "use_scale": self.use_scale}

    @classmethod
    def from_keras(cls, layer, **overrides):
        """This layer in place of a `keras.layers.AdditiveAttention`, holding its weights.

        Args and the rest: as `LuongAttention.from_keras`.
        """
        return _from_keras(cls, keras.layers.AdditiveAttention, layer, overrides)


# Keras's name for Bahdanau's attention.
AdditiveAttention = BahdanauAttention


# -- conversion from Keras's layers ---------------------------------------------------


def from_keras(layer, **overrides):
    """keras_attn's drop-in for a `keras.layers.Attention` or `AdditiveAttention`, or None.

    Args:
        layer: Any layer.
        **overrides: As `LuongAttention.from_keras`.

    Returns:
        `LuongAttention` or `BahdanauAttention` holding the layer's weights, or None
        if `layer` is neither of Keras's classes (nor a subclass of them).

    Raises:
        TypeError: `layer` is a subclass of Keras's layers (its own code would be lost).
        ValueError: an override the drop-in does not take.
    """
    for keras_class, ours in (
        (keras.layers.AdditiveAttention, BahdanauAttention),  # a subclass of the next
        (keras.layers.Attention, LuongAttention),
    ):
        if isinstance(layer, keras_class):
            return ours.from_keras(layer, **overrides)
    return None


# What a converted layer may change: the attention, not the weights.
_OVERRIDES = (
    "pattern",
    "normalizer",
    "score_mods",
    "dropout",
    "seed",
    "name",
    "dtype",
    "trainable",
)


def _from_keras(cls, keras_class, layer, overrides):
    if type(layer) is not keras_class:
        raise TypeError(
            f"{cls.__name__}.from_keras takes a keras.layers.{keras_class.__name__}, not a "
            f"subclass (whose own code would be lost) nor another layer. Received: layer "
            f"{getattr(layer, 'name', layer)!r} of class "
            f"{type(layer).__module__}.{type(layer).__qualname__}"
        )
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(
            f"{cls.__name__}.from_keras can change {', '.join(_OVERRIDES)}: the layer has "
            "no projections or heads, and its weights are Keras's. "
            f"Received: {', '.join(f'{u}={overrides[u]!r}' for u in unknown)}"
        )
    config = layer.get_config()
    new = cls.from_config({**config, **overrides})
    if layer.built:
        # The only weight shape that depends on the input is Bahdanau's scale (D,).
        scale = getattr(layer, "scale", None)
        dim = scale.shape[0] if scale is not None and len(scale.shape) == 1 else 1
        new.build([(None, None, dim), (None, None, dim)])
        new.set_weights(layer.get_weights())
    return new
