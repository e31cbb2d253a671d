"""`convert`: put keras_attn's attention into any Keras model, weights and all.

`convert(model, **attention)` copies `model` and replaces, at any depth, every
`keras.layers.MultiHeadAttention` and `keras.layers.GroupQueryAttention` (and
KerasHub's `CachedMultiHeadAttention`, whose calls keras_attn's layers take as they
are) with keras_attn's drop-in holding the same weights. With no `attention`
arguments the converted model computes what the original did; with them (a
pattern, a normalizer, a score, ...) every replaced layer uses that attention, e.g.
to fine-tune a pretrained model with local attention.

The copy is wrapped in a `Converted` model, whose config records the original
model and the attention arguments, so that a saved ``.keras`` file loads back
converted (the layers inside a KerasHub layer are rebuilt from their parent's
config, which knows nothing of keras_attn).
"""

import sys
import types

import keras

from keras_attn import plugins
from keras_attn.layers import GroupedQueryAttention
from keras_attn.layers import MultiHeadAttention

__all__ = ["Converted", "convert"]

# Subclasses of Keras's attention whose own code keras_attn's layers replace as is:
# their call arguments and results are a subset of keras_attn's (KerasHub's cache
# layout is keras_attn's).
COMPATIBLE_SUBCLASSES = {
    "keras_hub.src.layers.modeling.cached_multi_head_attention.CachedMultiHeadAttention",
}

# Keras's projections, in Keras's weight order.
_PROJECTIONS = ("_query_dense", "_key_dense", "_gate_dense", "_value_dense", "_output_dense")


def _qualified_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _target_class(layer):
    """keras_attn's class for `layer`, None to keep it, or raise for a foreign subclass."""
    if isinstance(layer, (MultiHeadAttention, GroupedQueryAttention)):
        return None
    for keras_class, ours in (
        (keras.layers.MultiHeadAttention, MultiHeadAttention),
        (keras.layers.GroupQueryAttention, GroupedQueryAttention),
    ):
        if not isinstance(layer, keras_class):
            continue
        cls = type(layer)
        if cls is keras_class or _qualified_name(cls) in COMPATIBLE_SUBCLASSES:
            return ours
        raise ValueError(
            f"keras_attn.convert replaces {keras_class.__name__} and KerasHub's "
            f"CachedMultiHeadAttention, not other subclasses, whose own code it cannot "
            f"keep. Received: layer {layer.name!r} of class {_qualified_name(cls)}. "
            f"Subclass keras_attn.{ours.__name__} instead (it honours Keras's override "
            "points)."
        )
    return None


def _serialize_attention(attention):
    return {
        k: plugins.serialize(v) if plugins.kind_of(v) is not None else v
        for k, v in attention.items()
    }


def _replacement(layer, cls, attention):
    config = layer.get_config()
    config.update(attention)
    if "pattern" in attention and config.get("sliding_window") is not None:
        raise ValueError(
            f"Layer {layer.name!r} has a sliding window; pass no `pattern` to convert it. "
            f"Received: pattern={attention['pattern']!r}"
        )
    new = cls.from_config(config)
    new.build(**layer._build_shapes_dict)
    for name in _PROJECTIONS:
        old_sublayer = getattr(layer, name, None)
        if old_sublayer is not None:
            getattr(new, name).set_weights(old_sublayer.get_weights())
    return new


def _swap(parent, old, new):
    """Put `new` where `parent` holds `old`, in the same place (so weights keep their order)."""
    for attr, value in list(vars(parent).items()):
        if value is old:
            object.__setattr__(parent, attr, new)
    # On PyTorch a layer is a torch.nn.Module, which holds its sublayers in `_modules`.
    modules = vars(parent).get("_modules")
    if modules is not None:
        for attr, value in list(modules.items()):
            if value is old:
                modules[attr] = new
    parent._layers[:] = [new if sublayer is old else sublayer for sublayer in parent._layers]
    operations = getattr(parent, "_operations", None)
    if operations is not None and any(op is old for op in operations):
        # A node of a functional graph: the graph calls `new` instead.
        operations[:] = [new if op is old else op for op in operations]
        for nodes in parent._nodes_by_depth.values():
            for node in nodes:
                if node.operation is old:
                    node.operation = new
        new._inbound_nodes = old._inbound_nodes
        new._outbound_nodes = old._outbound_nodes
        # The tensors `old` made (the model's outputs among them) name their maker.
        for node in new._inbound_nodes:
            for tensor in node.outputs:
                history = getattr(tensor, "_keras_history", None)
                if history is not None and history.operation is old:
                    tensor._keras_history = history._replace(operation=new)
        # The graph's node keys hold the operation's id.
        prefix = f"{id(old)}_ib-"
        parent._nodes = {
            f"{id(new)}_ib-{key[len(prefix) :]}" if key.startswith(prefix) else key
            for key in parent._nodes
        }


def _convert_in_place(model, attention):
    replacements = {}  # id(old) -> new: a layer shared by two parents stays shared
    for parent in model._flatten_layers(include_self=True, recursive=True):
        for sublayer in list(parent._layers):
            cls = _target_class(sublayer)
            if cls is None:
                continue
            if id(sublayer) not in replacements:
                replacements[id(sublayer)] = _replacement(sublayer, cls, attention)
            _swap(parent, sublayer, replacements[id(sublayer)])


@keras.saving.register_keras_serializable(package="keras_attn")
class Converted(keras.Model):
    """A model whose Keras attention layers are keras_attn's (made by `convert`).

    Calls, trains and saves as the model it wraps (`model`). Its config is the
    wrapped model's and the `attention` arguments, so loading converts again.

    Args:
        model: The Keras model, already converted (or to convert, on loading).
        attention: Keyword arguments of the keras_attn layers (e.g. ``pattern``).
    """

    def __init__(self, model, attention=None, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.attention = dict(attention or {})
        _convert_in_place(model, self.attention)
        self.built = model.built

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def get_config(self):
        return {
            **super().get_config(),
            "model": keras.saving.serialize_keras_object(self.model),
            "attention": _serialize_attention(self.attention),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        return cls(model, **config)


def convert(model, **attention):
    """A copy of `model` whose Keras attention layers are keras_attn layers.

    Every `keras.layers.MultiHeadAttention` and `keras.layers.GroupQueryAttention`,
    at any depth (and KerasHub's `CachedMultiHeadAttention`), becomes
    `keras_attn.MultiHeadAttention` or `keras_attn.GroupedQueryAttention` with the
    same configuration and weights, plus `attention`. `model` itself is not changed.

    Args:
        model: A built Keras model that can be serialized (functional, sequential,
            or a KerasHub backbone or task).
        **attention: Arguments of keras_attn's layers for every replaced layer, e.g.
            ``pattern=keras_attn.patterns.Local(64)``, ``normalizer="sparsemax"``,
            ``score=MyPluginScore()``. None: the outputs are identical.

    Returns:
        A `Converted` model, which calls, trains and saves as `model` does.

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: a subclass of Keras's attention that overrides Keras's code (its
            code would be lost), or no attention layer at all.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "keras_attn.convert takes a Keras model (functional, sequential, or a KerasHub "
            f"backbone or task). Received: model={model!r} of type {type(model).__name__}"
        )
    for layer in model._flatten_layers():
        _target_class(layer)  # a foreign subclass fails before anything is copied
    copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    copy.set_weights(model.get_weights())
    if not any(
        isinstance(layer, (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention))
        for layer in copy._flatten_layers()
    ):
        raise ValueError(
            f"keras_attn.convert found no Keras attention layer in model {model.name!r}."
        )
    return Converted(copy, attention, name=f"{model.name}_keras_attn")


class _CallableModule(types.ModuleType):
    # `keras_attn.convert(model)` is the function even where the submodule was
    # imported first (an import sets the package's attribute to the module).
    def __call__(self, model, **attention):
        return convert(model, **attention)


sys.modules[__name__].__class__ = _CallableModule
