"""The hook specifications: the contract between keras_attn and its plugins.

Each hook receives a ``register`` callable. A plugin calls ``register(cls)`` once per
component class it provides; ``cls.name`` is the component's registry name, unique
within its kind. keras_attn registers its own built-ins through these same hooks.
"""

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("keras_attn")
hookimpl = pluggy.HookimplMarker("keras_attn")

Register = Callable[[type], None]


@hookspec
def register_layers(register: Register) -> None:
    """Register attention layer classes (subclasses of ``keras.layers.Layer``)."""


@hookspec
def register_scores(register: Register) -> None:
    """Register score classes (subclasses of ``keras_attn.Score``)."""


@hookspec
def register_score_mods(register: Register) -> None:
    """Register score modifier classes (subclasses of ``keras_attn.ScoreMod``)."""


@hookspec
def register_patterns(register: Register) -> None:
    """Register sparsity pattern classes (subclasses of ``keras_attn.Pattern``)."""


@hookspec
def register_normalizers(register: Register) -> None:
    """Register normalizer classes (subclasses of ``keras_attn.Normalizer``)."""


@hookspec
def register_position_encodings(register: Register) -> None:
    """Register position encoding classes (subclasses of ``keras_attn.PositionEncoding``)."""
