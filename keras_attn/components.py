"""The component interfaces: the base classes every score, score_mod, pattern,
normalizer and position encoding subclasses, built-in or plugin.

Shapes: components see tensors with arbitrary leading dims ``(..., Tq, Tk)``, because
the engine calls them on whole ``(B, H, Tq, Tk)`` score matrices and on blocks of a
sparse layout alike. A subclass sets the class attribute ``name`` (its registry
name) and is registered through a `keras_attn.hookspecs` hook.

The pattern algebra lives beside `Pattern`: ``p1 | p2`` is a `Union`, ``p1 & p2`` an
`Intersection` (`keras_attn.patterns` exports them with the other built-in patterns).

The registry (`keras_attn.plugins`) sits below this module and never imports it: this
module declares its base classes to it when imported (`keras_attn.plugins.define_kind`),
and the pattern algebra resolves and serializes its sub-patterns through it.
"""

import dataclasses

import keras
from keras import ops

from keras_attn import block_layout
from keras_attn import plugins

__all__ = [
    "NEG_INF",
    "Components",
    "Intersection",
    "Normalizer",
    "Pattern",
    "PositionEncoding",
    "Score",
    "ScoreMod",
    "Union",
    "builtin",
]


def builtin(kind):
    """Class decorator: make a built-in class Keras-serializable under its registry name.

    Keras finds built-in layers by name when it loads a ``.keras`` file, before the
    registry is built (which happens lazily, on the first lookup). The name is the
    one `keras_attn.plugins` would give it: ``keras_attn.<kind>>name``.
    """

    def decorate(cls):
        name = cls.__dict__.get("registry_name", cls.__dict__.get("name"))
        return keras.saving.register_keras_serializable(package=f"keras_attn.{kind}", name=name)(
            cls
        )

    return decorate


class Score(keras.layers.Layer):
    """Base class of scores. Subclasses set ``name`` and implement ``call``.

    ``call(query, key)`` receives ``query`` of shape ``(..., Tq, D)`` and ``key`` of
    shape ``(..., Tk, D)`` with the same leading dims, and returns logits of shape
    ``(..., Tq, Tk)``. A score may own weights, created in ``build(query_shape)``.
    """

    name = None

    def call(self, query, key):
        raise NotImplementedError(f"{type(self).__name__} must implement call(query, key).")

    def fused_scale(self, depth):
        """The factor `s` if this score is exactly ``s * (query · key)``, else None.

        A score that returns a number lets the engine run the backend's fused kernels
        (`keras.ops.dot_product_attention`, cuDNN, FlexAttention), which compute the
        product themselves. Only ``scaled_dot`` (not a subclass that overrides
        ``call``) says so among the built-ins.
        """
        return None

    def get_config(self):
        # Defined here so that subclasses without arguments serialize as they are.
        return super().get_config()

    def compute_output_shape(self, query_shape, key_shape=None):
        key_shape = query_shape if key_shape is None else key_shape
        return (*query_shape[:-1], key_shape[-2])


class ScoreMod(keras.layers.Layer):
    """Base class of score modifiers. Subclasses set ``name`` and implement ``call``.

    A score_mod that needs the layer's number of heads declares a ``num_heads``
    attribute; if it is ``None`` when the attention layer builds, the layer sets it.
    """

    name = None

    @property
    def input_dtype(self):
        return _logits_input_dtype(self)

    def call(self, logits, positions=None):
        raise NotImplementedError(f"{type(self).__name__} must implement call(logits, positions).")

    def get_config(self):
        # Defined here so that subclasses without arguments serialize as they are.
        return super().get_config()

    def compute_output_shape(self, logits_shape, positions=None):
        return logits_shape


class Pattern:
    """Base class of patterns. Subclasses set ``name`` and implement ``mask``.

    Constructor arguments must be plain Python values returned by ``get_config``.
    """

    name = None

    def mask(self, positions):
        """Bool tensor broadcastable to the logits: True where key j is visible to query i.

        Args:
            positions: `keras_attn.positions.Positions` with integer tensors
                ``query``, ``key`` and ``head`` holding absolute positions.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement mask(positions).")

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        """Which ``block_size`` x ``block_size`` blocks hold at least one allowed pair.

        Works for any pattern by evaluating ``mask`` one row of blocks at a time
        (memory ``block_size * key_length``); patterns with a closed form may
        override it. Returns a numpy bool array ``(ceil(Tq / bs), ceil(Tk / bs))``.
        """
        return block_layout.block_mask_from_mask(
            self, query_length, key_length, block_size, query_offset
        )

    @property
    def causal(self):
        """True if the pattern never lets a query see a later key."""
        return False

    @property
    def kernel_form(self):
        """``"full"`` or ``"causal"`` if a kernel's own masking computes this pattern, else None.

        The fused kernels take no mask but "all pairs" or "keys up to the query", so
        only patterns that are exactly one of them say so (``full``, ``causal``).
        """
        return None

    def __or__(self, other):
        return Union([self, _check_pattern(other, "|")])

    def __and__(self, other):
        return Intersection([self, _check_pattern(other, "&")])

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, repr(self.get_config())))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _check_pattern(other, op):
    if not isinstance(other, Pattern):
        raise TypeError(
            f"Patterns combine with `{op}` only with other patterns. "
            f"Received: {other!r} (of type {type(other).__name__})"
        )
    return other


class _Combined(Pattern):
    """A union or intersection of patterns."""

    def __init__(self, patterns):
        flat = []
        for p in patterns:
            p = plugins.resolve("pattern", p)
            # (a | b) | c is kept flat as a | b | c.
            flat.extend(p.patterns if type(p) is type(self) else [p])
        if len(flat) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least two patterns. Received: {patterns!r}"
            )
        self.patterns = flat

    def get_config(self):
        return {"patterns": [plugins.serialize(p) for p in self.patterns]}

    def __repr__(self):
        return "(" + f" {self.symbol} ".join(repr(p) for p in self.patterns) + ")"


@builtin("pattern")
class Union(_Combined):
    """Pairs allowed by any of the patterns (``p1 | p2``).

    Args:
        patterns: At least two patterns: instances, registry names or config dicts.
            A union among them is flattened into this one.

    Raises:
        ValueError: fewer than two patterns.
        ComponentKindError: an item is not a pattern.
    """

    name = "union"
    symbol = "|"

    def mask(self, positions):
        out = self.patterns[0].mask(positions)
        for p in self.patterns[1:]:
            out = ops.logical_or(out, p.mask(positions))
        return out

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        out = None
        for p in self.patterns:
            m = p.block_mask(query_length, key_length, block_size, query_offset)
            out = m if out is None else out | m
        return out

    @property
    def causal(self):
        return all(p.causal for p in self.patterns)


@builtin("pattern")
class Intersection(_Combined):
    """Pairs allowed by all of the patterns (``p1 & p2``).

    Args:
        patterns: At least two patterns: instances, registry names or config dicts.
            An intersection among them is flattened into this one.

    Raises:
        ValueError: fewer than two patterns.
        ComponentKindError: an item is not a pattern.
    """

    name = "intersection"
    symbol = "&"

    def mask(self, positions):
        out = self.patterns[0].mask(positions)
        for p in self.patterns[1:]:
            out = ops.logical_and(out, p.mask(positions))
        return out

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        # A block with a pair allowed by all patterns is kept by each of them. The
        # result may keep a few blocks with no such pair: those are masked exactly.
        out = None
        for p in self.patterns:
            m = p.block_mask(query_length, key_length, block_size, query_offset)
            out = m if out is None else out & m
        return out

    @property
    def causal(self):
        return any(p.causal for p in self.patterns)


# Finite stand-in for -inf, safe in float32 (the normalizers compute in float32).
NEG_INF = -1e9


def _logits_input_dtype(layer):
    """The dtype Keras casts logits to when a score_mod or normalizer is called.

    Under a float16 policy, float32: the scores form their logits in float32 because
    float16 overflows at 65504, and Keras's input autocasting must not cast them back
    down (it would turn a logit of 70000 into inf, and the softmax into NaN).
    """
    dtype = layer.compute_dtype
    return "float32" if dtype == "float16" else dtype


class Normalizer(keras.layers.Layer):
    """Base class of normalizers. Subclasses set ``name`` and implement ``normalize``.

    ``normalize(logits, mask, training)`` receives float32 logits with masked-out
    entries already set to a large negative number and returns float32 weights;
    the base class casts, and zeroes the masked-out pairs (so fully masked rows
    are zeros) afterwards. Override ``call`` instead to take over all of it.

    Args of ``normalize``:
        logits: float32 ``(..., Tq, Tk)``.
        mask: bool, broadcastable to the logits (e.g. ``(B, 1, Tq, Tk)`` or a
            block's ``(B, H, R, bs, W * bs)``), True where a pair is allowed; or
            **None** when every pair is allowed (no padding, pattern or explicit
            mask on this call: the engine does not build an all-True mask). A
            normalizer that reads the mask must handle None.
        training: Whether training-only behaviour (noise) is active; may be None.
    """

    name = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # `mask` is the attention mask, not a Keras sequence mask: accept it without
        # attaching it to the output weights.
        self.supports_masking = True

    def compute_mask(self, inputs, previous_mask=None):
        return None

    @property
    def input_dtype(self):
        return _logits_input_dtype(self)

    def call(self, logits, mask=None, training=None):
        x = ops.cast(logits, "float32")
        if mask is not None:
            mask = ops.cast(mask, "bool")
            x = ops.where(mask, x, NEG_INF)
        weights = self.normalize(x, mask, training)
        if mask is not None:
            weights = ops.where(mask, weights, 0.0)
        # In the compute dtype: under float16 the logits arrive in float32.
        return ops.cast(weights, self.compute_dtype)

    @property
    def is_softmax(self):
        """True if this normalizer is exactly softmax over the allowed keys.

        Fused kernels and the hand-written softmax gradient then compute it; only the
        built-in ``softmax`` (not a subclass that overrides it) says so.
        """
        return False

    def normalize(self, logits, mask, training):
        raise NotImplementedError(
            f"{type(self).__name__} must implement normalize(logits, mask, training)."
        )

    def get_config(self):
        # Defined here so that subclasses without arguments serialize as they are.
        return super().get_config()

    def compute_output_shape(self, logits_shape, mask_shape=None):
        return logits_shape


class PositionEncoding(keras.layers.Layer):
    """Base class of position encodings. Subclasses set ``name`` and implement ``call``.

    ``call(query, key, positions)`` receives query and key heads ``(..., T, D)`` of
    the same length and an integer tensor ``positions`` broadcastable to ``(..., T)``
    (for ``(B, H, T, D)`` heads: ``(B or 1, 1, T)``) holding their absolute positions,
    and returns ``(query, key)`` of the same shapes and dtypes. The attention layer
    applies it to the projected heads before the score, so it works on every path,
    fused kernels included. Keys are encoded before they are written to a KV cache:
    a decoding step at position 517 is called with ``positions == 517``, and the
    cache holds encoded keys. Where queries and keys have different positions (cross
    attention), the layer calls it twice and keeps the query of the first call and
    the key of the second.

    An encoding that cannot take some head size says so in ``check_head_dim``,
    which the layer calls when it builds.
    """

    name = None

    def call(self, query, key, positions=None):
        raise NotImplementedError(
            f"{type(self).__name__} must implement call(query, key, positions)."
        )

    def check_head_dim(self, head_dim):
        """Raise a ``ValueError`` if heads of size `head_dim` cannot be encoded."""

    def get_config(self):
        # Defined here so that subclasses without arguments serialize as they are.
        return super().get_config()

    def compute_output_shape(self, query_shape, key_shape=None, positions_shape=None):
        return query_shape, query_shape if key_shape is None else key_shape


@dataclasses.dataclass(frozen=True, eq=False)
class Components:
    """The components of one attention computation, handed to the engine as one object.

    Attributes:
        score: The `Score`.
        score_mods: Tuple of `ScoreMod`, applied in order.
        pattern: The `Pattern` of this call (the layer's, plus causal if asked).
        normalizer: The `Normalizer`.
        dropout: A `keras.layers.Dropout` applied to the weights, or None.
    """

    score: Score
    score_mods: tuple
    pattern: Pattern
    normalizer: Normalizer
    dropout: object = None

    def replace(self, **changes):
        """A copy with some attributes changed (e.g. the pattern of one call)."""
        return dataclasses.replace(self, **changes)

    def softmax_scale(self, depth, return_weights=False, dropout_active=False):
        """`scale` if, whatever the pattern, this is ``softmax(scale * q · kᵀ)``, else None.

        That is what fused and native kernels compute: scaled_dot + softmax, no
        score_mods, without returning the weights or dropping them out.
        """
        if self.score_mods or return_weights or dropout_active or not self.normalizer.is_softmax:
            return None
        return self.score.fused_scale(depth)

    def fused_scale(self, depth, return_weights=False, dropout_active=False):
        """The scale for a fused kernel if one computes exactly this attention, else None.

        A fused kernel computes ``softmax(scale * q · kᵀ)`` over all pairs or the
        causal ones (`softmax_scale`, and a pattern with a ``kernel_form``).
        """
        if self.pattern.kernel_form is None:
            return None
        return self.softmax_scale(depth, return_weights, dropout_active)

    def dropout_active(self, training):
        return self.dropout is not None and bool(training) and self.dropout.rate > 0

    def check_num_heads(self, num_heads):
        """Raise if a score_mod was made for another number of heads than `num_heads`.

        Raises:
            ValueError: naming the score_mod and both numbers.
        """
        for i, mod in enumerate(self.score_mods):
            heads = getattr(mod, "num_heads", None)
            if heads is not None and heads != num_heads:
                raise ValueError(
                    f"score_mod {plugins.registry_name(mod)!r} was made for another number "
                    f"of heads than the layer's num_heads={num_heads}. "
                    f"Received: score_mods[{i}].num_heads={heads}"
                )

    def build(self, query_heads_shape, logits_shape):
        """Build the components not built yet, for heads of these shapes.

        Args:
            query_heads_shape: ``(B, H, Tq, D)`` (None where unknown), the score's input.
            logits_shape: ``(B, H, Tq, Tk)``: the score_mods' and normalizer's input. A
                score_mod made with ``num_heads=None`` gets the layer's ``H`` first.
        """
        if not self.score.built:
            self.score.build(query_heads_shape)
        for mod in self.score_mods:
            if getattr(mod, "num_heads", "unset") is None:
                mod.num_heads = logits_shape[1]
            if not mod.built:
                mod.build(logits_shape)
        if not self.normalizer.built:
            self.normalizer.build(logits_shape)


def score_mods_arg(score_mods):
    """A layer's `score_mods` argument as a list: one score_mod given alone is wrapped.

    Raises:
        ValueError: `score_mods` is neither a score_mod (name, config dict, instance)
            nor a list or tuple of them.
    """
    if isinstance(score_mods, (str, dict)) or plugins.kind_of(score_mods) is not None:
        return [score_mods]
    if not isinstance(score_mods, (list, tuple)):
        raise ValueError(
            "`score_mods` must be a list of score_mods (names, config dicts or "
            f"instances). Received: score_mods={score_mods!r}"
        )
    return list(score_mods)


# The registry below learns the base classes from here (it imports no component).
plugins.define_kind("score", Score)
plugins.define_kind("score_mod", ScoreMod)
plugins.define_kind("pattern", Pattern)
plugins.define_kind("normalizer", Normalizer)
plugins.define_kind("position_encoding", PositionEncoding)
