"""Model-parallel layouts: attention heads sharded over a mesh axis (Megatron-style).

`layout_map(mesh, model)` gives the `keras.distribution.LayoutMap` that splits every
attention layer's heads over the mesh axis ``"model"``: the query, key, value (and
gate) kernels ``(E, H, D)`` are sharded on their heads, ``(None, "model", None)``,
their biases ``(H, D)`` on ``("model", None)``, and the output kernel
``(H, Dv, E)`` on ``("model", None, None)``. Each device then projects, attends and
projects back its own heads, and the one collective of a forward pass is the
all-reduce that sums the devices' partial outputs after the output projection
(the output bias, replicated, is added once to that sum). No weight is gathered.

Keras's `ModelParallel` looks a variable's path up in the map (by ``re.fullmatch``
of each key, one match at most); the keys here are full-path regexes, so they can
sit beside the user's own keys for embeddings and feed-forward layers. The mesh's
other axes (data, sequence) are left alone: the map names the model axis only.
"""

import re

import keras

from keras_attn.layers import Attention
from keras_attn.normalizers import SinkSoftmax
from keras_attn.score_mods import RelativePosition

__all__ = [
    "HEADS_IN_PROJECTION",
    "HEADS_OUT_PROJECTIONS",
    "attention_layers",
    "check_layout",
    "layout_map",
]

# Projections whose output holds the heads: kernel (E, H, D), bias (H, D), and a LoRA
# factor `lora_kernel_a` (E, H, r); Keras's names, which keras_attn's layers keep.
HEADS_OUT_PROJECTIONS = ("query", "key", "value", "gate")
# The projection whose input holds the heads: kernel and `lora_kernel_a` (H, Dv, ...).
HEADS_IN_PROJECTION = "attention_output"
_PROJECTIONS = (*HEADS_OUT_PROJECTIONS, HEADS_IN_PROJECTION)

# Built-in components holding one entry per (query) head: variable name -> heads axis.
# A plugin's component or layer declares the same with a `heads_axes` attribute.
_PER_HEAD_WEIGHTS = {SinkSoftmax: {"sinks": 0}, RelativePosition: {"embeddings": 1}}


def attention_layers(model):
    """The attention layers of `model` whose heads `layout_map` shards, in model order.

    keras_attn's layers (presets, drop-ins and plugin layers, which subclass
    `keras_attn.Attention`) and Keras's `MultiHeadAttention` and
    `GroupQueryAttention` (KerasHub's subclasses included), whose weights have the
    same names. keras_attn's `LuongAttention` and `BahdanauAttention` have no heads.

    Args:
        model: A Keras model or layer.

    Returns:
        A list of layers, each once.
    """
    kinds = (Attention, keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention)
    return [layer for layer in model._flatten_layers(include_self=True) if isinstance(layer, kinds)]


def _heads(layer):
    """``(query heads, key/value heads)`` of an attention layer (keras_attn's or Keras's)."""
    query = getattr(layer, "num_query_heads", None) or layer.num_heads
    return query, getattr(layer, "num_key_value_heads", None) or query


def _axis_size(mesh, model_axis):
    if not isinstance(mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "Expected a keras.distribution.DeviceMesh. "
            f"Received: mesh={mesh!r} of type {type(mesh).__name__}"
        )
    names = list(mesh.axis_names)
    if model_axis not in names:
        raise ValueError(
            f"The mesh has no axis {model_axis!r} to shard the heads over. Received: "
            f"model_axis={model_axis!r}, mesh axis_names={names}, shape={tuple(mesh.shape)}"
        )
    return mesh.shape[names.index(model_axis)]


def check_layout(model, mesh, model_axis="model"):
    """Check that every attention layer of `model` can shard its heads over `model_axis`.

    Each device of the axis holds ``num_heads / size`` query heads and
    ``num_key_value_heads / size`` key/value heads (grouped-query attention keeps
    each query head's key/value head on its device), so both must be multiples of
    the axis size.

    Args:
        model: A Keras model or layer.
        mesh: A `keras.distribution.DeviceMesh` with an axis named `model_axis`.
        model_axis: Name of the mesh axis the heads are sharded over.

    Raises:
        TypeError: `mesh` is not a `keras.distribution.DeviceMesh`.
        ValueError: the mesh has no axis `model_axis`; `model` has no attention layer;
            a layer whose `num_heads` or `num_key_value_heads` is not a multiple of the
            axis size (the error names the layer and the numbers).
    """
    size = _axis_size(mesh, model_axis)
    layers = attention_layers(model)
    if not layers:
        raise ValueError(
            f"Model {model.name!r} has no attention layer whose heads could be sharded "
            "(keras_attn's, or Keras's MultiHeadAttention and GroupQueryAttention)."
        )
    for layer in layers:
        query_heads, kv_heads = _heads(layer)
        for argument, heads in (("num_heads", query_heads), ("num_key_value_heads", kv_heads)):
            if heads % size:
                where = layer.path or layer.name
                raise ValueError(
                    f"{type(layer).__name__} {where!r} cannot shard its heads over the "
                    f"mesh axis {model_axis!r} of size {size}: {argument}={heads} is "
                    f"not a multiple of {size}. Use a model axis whose size divides "
                    f"num_heads={query_heads} and num_key_value_heads={kv_heads} (the "
                    "other devices can go to a data or sequence axis)."
                )


def _heads_axis(projection, variable_name, rank):
    """The axis of a projection's variable that holds the heads, or None (replicated)."""
    if projection in HEADS_OUT_PROJECTIONS and variable_name in ("kernel", "bias", "lora_kernel_a"):
        return rank - 2  # kernel (E, H, D), bias (H, D), lora_kernel_a (E, H, r)
    if projection == HEADS_IN_PROJECTION and variable_name in ("kernel", "lora_kernel_a"):
        return 0  # (H, Dv, ...)
    return None


def _component_heads_axes(layer):
    """id(variable) -> heads axis, for the per-head weights of `layer` and its sublayers."""
    query_heads, _ = _heads(layer)
    axes = {}
    for sublayer in layer._flatten_layers(include_self=True):
        declared = dict(getattr(sublayer, "heads_axes", None) or {})
        for cls, table in _PER_HEAD_WEIGHTS.items():
            if isinstance(sublayer, cls):
                declared.update(table)
        for variable in sublayer.weights:
            axis = declared.get(variable.name)
            rank = len(variable.shape)
            # A weight shared by all heads (a single sink) stays replicated.
            if (
                axis is not None
                and -rank <= axis < rank
                and variable.shape[axis] == query_heads > 1
            ):
                axes[id(variable)] = axis % len(variable.shape)
    return axes


def _variable_layouts(layer, model_axis):
    """``(prefix, pattern, axes)`` for every variable of `layer`.

    ``prefix + pattern`` (a literal prefix and a regex) fully matches the variable's path.
    """
    if not layer.weights:
        raise ValueError(
            f"{type(layer).__name__} {layer.path or layer.name!r} has no weights yet: build "
            "the model before giving it to layout_map, or call layout_map without `model` "
            "(its keys then match every layer's projections by name) and check_layout "
            "once the model is built."
        )
    component_axes = _component_heads_axes(layer)
    for variable in layer.weights:
        parts = variable.path.split("/")
        rank = len(variable.shape)
        suffix = "/".join(parts[-2:])
        prefix, pattern = variable.path[: -len(suffix)], re.escape(suffix)
        if id(variable) in component_axes:
            axis = component_axes[id(variable)]
        else:
            axis = _heads_axis(parts[-2] if len(parts) >= 2 else "", parts[-1], rank)
        if prefix == f"{layer.path}/" and parts[-2] not in _PROJECTIONS:
            # A component's name is made unique by Keras (`sink_softmax_3`): the same
            # model made again (e.g. under the distribution) numbers it anew.
            sublayer = re.sub(r"_\d+$", "", parts[-2])
            pattern = rf"{re.escape(sublayer)}(?:_\d+)?/{re.escape(parts[-1])}"
        yield prefix, pattern, tuple(model_axis if i == axis else None for i in range(rank))


def _alternation(strings):
    escaped = [re.escape(s) for s in dict.fromkeys(strings)]
    return escaped[0] if len(escaped) == 1 else f"(?:{'|'.join(escaped)})"


def layout_map(mesh, model=None, *, model_axis="model"):
    """A `keras.distribution.LayoutMap` sharding attention heads over `model_axis`.

    Megatron-style: the query, key, value and gate projections are split by their
    output heads (kernels ``(E, H, D)`` on ``(None, model_axis, None)``, biases
    ``(H, D)`` on ``(model_axis, None)``, LoRA ``lora_kernel_a`` ``(E, H, r)`` like the
    kernel) and the output projection by its input heads (kernel ``(H, Dv, E)`` on
    ``(model_axis, None, None)``); the output bias and LoRA ``lora_kernel_b`` are
    replicated. A forward pass then communicates once per layer: an all-reduce of
    the output ``(B, T, E)``. Use it with
    ``keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)``; add
    keys of your own for the other layers (they must not match attention weights:
    Keras refuses a path matched by two keys).

    With `model`, the keys are the full paths of its attention layers' variables
    (grouped into one regex per weight and layout), they cover every weight of those
    layers (weights not split by heads, such as a QK-norm scale or a score's kernel,
    get an explicit replicated layout), and the heads are checked (`check_layout`).
    Per-head weights of components, such as ``sink_softmax``'s sinks ``(H,)`` and
    ``relative_position``'s table ``(buckets, H)``, are split by heads too; a plugin's
    layer or component declares its own as ``heads_axes = {"weight_name": axis}``.
    A converted model (`keras_attn.convert`) keeps the original's paths, so the map of
    the original serves its converted copy, e.g. one made under the distribution.

    Without `model` (before the model exists), the keys match any path ending in
    ``query``, ``key``, ``value`` or ``gate`` then ``kernel``, ``bias`` or
    ``lora_kernel_a``, or in ``attention_output`` then ``kernel`` or
    ``lora_kernel_a``, for 3-D inputs and a 1-D output shape (the usual case); call
    `check_layout` once the model is built.

    Args:
        mesh: A `keras.distribution.DeviceMesh`; its axes other than `model_axis`
            (data, sequence) are not used by the map.
        model: A built Keras model or layer, or None.
        model_axis: Name of the mesh axis the heads are sharded over.

    Returns:
        A `keras.distribution.LayoutMap` on `mesh`.

    Raises:
        TypeError: `mesh` is not a `keras.distribution.DeviceMesh`.
        ValueError: the mesh has no axis `model_axis`; `model` has no attention
            layer, one not built yet, or one whose `num_heads` or
            `num_key_value_heads` is not a multiple of the axis size.
    """
    _axis_size(mesh, model_axis)
    result = keras.distribution.LayoutMap(mesh)
    heads_out = _alternation(HEADS_OUT_PROJECTIONS)
    if model is None:
        result[rf".+/{heads_out}/(?:kernel|lora_kernel_a)"] = (None, model_axis, None)
        result[rf".+/{heads_out}/bias"] = (model_axis, None)
        result[rf".+/{HEADS_IN_PROJECTION}/(?:kernel|lora_kernel_a)"] = (model_axis, None, None)
        return result
    check_layout(model, mesh, model_axis)
    groups = {}  # (pattern, axes) -> prefixes, in the model's order
    for layer in attention_layers(model):
        for prefix, pattern, axes in _variable_layouts(layer, model_axis):
            groups.setdefault((pattern, axes), []).append(prefix)
    for (pattern, axes), prefixes in groups.items():
        result[_alternation(prefixes) + pattern] = axes
    return result
