"""The attention of an example's blocks: one `AttentionConfig`, checked once.

    attention = AttentionConfig(layer="hard", pattern="local")  # fails now if unknown
    attention = AttentionConfig.from_dict({"layer": "hard"})    # the same, from a dict
    layer = attention.make_layer(num_heads=4, key_dim=32, name="attention")

Its fields are ``layer``, ``score``, ``pattern``, ``normalizer`` (a registry name,
plugins' included, or ``{"name": ..., "config": {...}}``), ``score_mods`` (a
sequence of them), ``position_encoding`` (one, e.g. ``"rope"``, or None) and
``num_key_value_heads`` (grouped-query attention, or None for one per head) and
``context_parallel`` (a `keras_attn.ContextParallel` config dict, or None: the
layers' sequence sharded over a mesh axis while a `keras.distribution` with that
axis is active, `examples.common.devices`).
``layer="keras"`` stands for `keras.layers.MultiHeadAttention`, the reference the
``compare`` commands train beside.

The model builders take an `AttentionConfig`, a dict of some of its fields or
None (the defaults); `AttentionConfig.from_dict` is the one place where defaults
are filled in. `to_dict` gives the JSON form that ``run.json`` records and that a
saved model's config holds.
"""

import copy
import dataclasses

import keras

from keras_attn import plugins
from keras_attn import validation
from keras_attn.context_parallel import ContextParallel

REFERENCE_LAYER = "keras"  # --layer keras: keras.layers.MultiHeadAttention, the reference

# The fields naming one component each, and the registry kind each is looked up in.
_COMPONENTS = {"score": "score", "pattern": "pattern", "normalizer": "normalizer"}


def _check_spec(value, field):
    """A component spec is a registry name or ``{"name": ..., "config": {...}}``."""
    if isinstance(value, str) or (isinstance(value, dict) and "name" in value):
        return copy.deepcopy(value)
    raise ValueError(
        f'`{field}` must be a registry name or a dict {{"name": ..., "config": {{...}}}}. '
        f"Received: {field}={value!r}"
    )


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The attention of every block of an example's model, checked when it is made.

    Args:
        layer: The attention layer: a registry name (``"attention"``, ``"hard"``,
            ``"local"``, a plugin's), ``{"name": ..., "config": {...}}`` (the config
            adds constructor arguments, e.g. ``window`` of ``local``) or ``"keras"``
            for `keras.layers.MultiHeadAttention`.
        score, pattern, normalizer: One component each, by name or spec. Presets
            that fix a component (``hard`` its normalizer, ``local`` its pattern)
            keep their own.
        score_mods: A list or tuple of score_mod specs.
        position_encoding: One position encoding spec (e.g. ``"rope"``) or None.
        num_key_value_heads: Key/value heads (grouped-query attention) or None.
        context_parallel: A `keras_attn.ContextParallel` or its config dict
            (``{"axis": "seq", "strategy": "auto"}``), or None. Kept as the dict;
            `to_dict` leaves it out where None (the configs of models without it
            stay as they were).

    Raises:
        UnknownComponentError: a name is not registered (the message lists the names
            there are).
        ValueError: a field has the wrong type, or the reference layer is given a
            position encoding, key/value heads or context parallelism (it takes none).
        TypeError: `context_parallel` is not a `keras_attn.ContextParallel`, its
            config dict or None.
    """

    layer: object = "attention"
    score: object = "scaled_dot"
    pattern: object = "full"
    normalizer: object = "softmax"
    score_mods: tuple = ()
    position_encoding: object = None
    num_key_value_heads: object = None
    context_parallel: object = None

    def __post_init__(self):
        def put(field, value):
            object.__setattr__(self, field, value)  # the dataclass is frozen

        put("layer", _check_spec(self.layer, "layer"))
        if not self.is_reference:
            plugins.get("layer", self.layer_name)
        for field, kind in _COMPONENTS.items():
            put(field, _check_spec(getattr(self, field), field))
            plugins.resolve(kind, getattr(self, field))
        if isinstance(self.score_mods, (str, dict)) or not isinstance(
            self.score_mods, (list, tuple)
        ):
            raise ValueError(
                "`score_mods` must be a list of score_mod specs. "
                f"Received: score_mods={self.score_mods!r}"
            )
        put("score_mods", tuple(_check_spec(m, "score_mods") for m in self.score_mods))
        for mod in self.score_mods:
            plugins.resolve("score_mod", mod)
        if self.position_encoding is not None:
            put("position_encoding", _check_spec(self.position_encoding, "position_encoding"))
            plugins.resolve("position_encoding", self.position_encoding)
        put(
            "num_key_value_heads",
            validation.positive_int(
                self.num_key_value_heads, "num_key_value_heads", allow_none=True
            ),
        )
        if self.context_parallel is not None:
            put("context_parallel", ContextParallel.get(self.context_parallel).get_config())
        extras = [
            k
            for k in ("position_encoding", "num_key_value_heads", "context_parallel")
            if getattr(self, k) is not None
        ]
        if self.is_reference and extras:
            raise ValueError(
                f"The reference layer (--layer {REFERENCE_LAYER}, keras.layers.MultiHeadAttention) "
                f"takes no {' or '.join(extras)}. Received: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in extras)
            )

    @classmethod
    def from_dict(cls, attention):
        """An `AttentionConfig` from a dict of some of its fields (the rest default).

        None gives the defaults; an `AttentionConfig` is returned as is (it was
        checked when it was made).

        Raises:
            ValueError: `attention` is not a dict, or has a key that is not a field.
            And what the constructor raises.
        """
        if attention is None:
            return cls()
        if isinstance(attention, cls):
            return attention
        if not isinstance(attention, dict):
            raise ValueError(
                "`attention` must be an AttentionConfig, a dict of its fields or None. "
                f"Received: attention={attention!r}"
            )
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(attention) - set(fields), key=str)
        if unknown:
            raise ValueError(
                f"Unknown attention keys {unknown}; the keys are {fields}. "
                f"Received: attention={attention!r}"
            )
        return cls(**attention)

    def to_dict(self):
        """Every field, JSON-ready (``score_mods`` as a list; ``context_parallel`` only
        where set); `from_dict` takes it back."""
        result = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        result["score_mods"] = list(result["score_mods"])
        if result["context_parallel"] is None:
            del result["context_parallel"]
        return result

    @property
    def is_reference(self):
        """Whether the layer is `keras.layers.MultiHeadAttention` (``layer="keras"``)."""
        return self.layer == REFERENCE_LAYER

    @property
    def layer_name(self):
        """The registry name of the layer (``"keras"`` for the reference)."""
        return self.layer["name"] if isinstance(self.layer, dict) else self.layer

    def make_layer(self, num_heads, key_dim, dropout=0.0, name=None, **kwargs):
        """A new attention layer of this config.

        Args:
            num_heads, key_dim, dropout, name: As `keras_attn.Attention` takes them.
            **kwargs: More constructor arguments (e.g. ``dtype``); the ``config``
                of a ``layer`` spec overrides them.

        Returns:
            A `keras_attn.Attention` (or the registered layer class), or a
            `keras.layers.MultiHeadAttention` for the reference.
        """
        if self.is_reference:
            return keras.layers.MultiHeadAttention(
                num_heads=num_heads, key_dim=key_dim, dropout=dropout, name=name, **kwargs
            )
        arguments = dict(
            num_heads=num_heads,
            key_dim=key_dim,
            dropout=dropout,
            name=name,
            score=copy.deepcopy(self.score),
            pattern=copy.deepcopy(self.pattern),
            normalizer=copy.deepcopy(self.normalizer),
            score_mods=copy.deepcopy(list(self.score_mods)),
        )
        for field in ("position_encoding", "num_key_value_heads", "context_parallel"):
            if getattr(self, field) is not None:
                arguments[field] = copy.deepcopy(getattr(self, field))
        arguments.update(kwargs)
        if isinstance(self.layer, dict):
            arguments.update(self.layer.get("config") or {})
        return plugins.get("layer", self.layer_name)(**arguments)
