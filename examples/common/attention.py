"""The attention of an example's blocks: one ``attention`` dict, checked once.

    attention = check_attention({"layer": "hard", "pattern": "local"})  # fails now if unknown
    layer = attention_layer(attention, num_heads=4, key_dim=32, name="block_0_attention")

The dict has the keys ``layer``, ``score``, ``pattern``, ``normalizer`` (a registry
name, plugins' included, or ``{"name": ..., "config": {...}}``), ``score_mods``
(a list of them), ``position_encoding`` (one, e.g. ``"rope"``, or None) and
``num_key_value_heads`` (grouped-query attention, or None for one per head).
``layer="keras"`` stands for `keras.layers.MultiHeadAttention`, the reference the
``compare`` commands train beside.
"""

import keras

from keras_attn import plugins
from keras_attn import validation

REFERENCE_LAYER = "keras"  # --layer keras: keras.layers.MultiHeadAttention, the reference


def default_attention():
    return {
        "layer": "attention",
        "score": "scaled_dot",
        "pattern": "full",
        "normalizer": "softmax",
        "score_mods": [],
        "position_encoding": None,
        "num_key_value_heads": None,
    }


def check_attention(attention):
    """The ``attention`` dict with defaults filled in and every component resolved now,
    so an unknown name fails before any model or folder is made (the error lists the
    names there are)."""
    attention = {**default_attention(), **(attention or {})}
    layer = attention["layer"]
    if layer != REFERENCE_LAYER:
        plugins.get("layer", layer["name"] if isinstance(layer, dict) else layer)
    plugins.resolve("score", attention["score"])
    plugins.resolve("pattern", attention["pattern"])
    plugins.resolve("normalizer", attention["normalizer"])
    for mod in attention["score_mods"]:
        plugins.resolve("score_mod", mod)
    attention["score_mods"] = list(attention["score_mods"])
    if attention["position_encoding"] is not None:
        plugins.resolve("position_encoding", attention["position_encoding"])
    validation.positive_int(
        attention["num_key_value_heads"], "num_key_value_heads", allow_none=True
    )
    extras = [k for k in ("position_encoding", "num_key_value_heads") if attention[k] is not None]
    if layer == REFERENCE_LAYER and extras:
        raise ValueError(
            f"The reference layer (--layer {REFERENCE_LAYER}, keras.layers.MultiHeadAttention) "
            f"takes no {' or '.join(extras)}. Received: "
            + ", ".join(f"{k}={attention[k]!r}" for k in extras)
        )
    return attention


def attention_layer(attention, num_heads, key_dim, dropout=0.0, name=None, **kwargs):
    """One attention layer from an ``attention`` dict (see `check_attention`).

    ``layer`` is a registry name or ``{"name": ..., "config": {...}}`` (its config
    adds constructor arguments, e.g. ``window`` of ``local``); the other entries
    are passed as `score`, `pattern`, `normalizer`, `score_mods`. Presets that fix
    a component (``hard`` its normalizer, ``local`` its pattern) keep their own.
    ``layer="keras"`` gives `keras.layers.MultiHeadAttention`, the reference
    (which takes no components).
    """
    attention = {**default_attention(), **(attention or {})}
    layer = attention["layer"]
    if layer == REFERENCE_LAYER:
        return keras.layers.MultiHeadAttention(
            num_heads=num_heads, key_dim=key_dim, dropout=dropout, name=name, **kwargs
        )
    config = {}
    if isinstance(layer, dict):
        config = dict(layer.get("config") or {})
        layer = layer["name"]
    cls = plugins.get("layer", layer)
    arguments = dict(
        num_heads=num_heads,
        key_dim=key_dim,
        dropout=dropout,
        name=name,
        score=attention["score"],
        pattern=attention["pattern"],
        normalizer=attention["normalizer"],
        score_mods=list(attention["score_mods"]),
    )
    for key in ("position_encoding", "num_key_value_heads"):
        if attention[key] is not None:
            arguments[key] = attention[key]
    arguments.update(kwargs)
    arguments.update(config)
    return cls(**arguments)
