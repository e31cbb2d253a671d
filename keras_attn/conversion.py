"""`convert`: put keras_attn's attention into any Keras model, weights and all.

`convert(model, **attention)` copies `model` and replaces, at any depth, every Keras
attention layer of `KERAS_ATTENTION_CLASSES` (and KerasHub's `CachedMultiHeadAttention`,
whose calls keras_attn's layers take as they are) with keras_attn's drop-in holding the
same weights, LoRA factors included. A layer shared by two parents, or a model nested
twice, is converted once and stays shared. With no `attention` arguments the converted
model computes what the original did; with them (a pattern, a normalizer, a score, ...)
every replaced layer (or those `apply_to` chooses) uses that attention, e.g. to
fine-tune a pretrained model with local attention. Other attention layers (subclasses
with code of their own, a model's own attention class) stay as they are, and `convert`
says so (`unconverted`).

The copy is made through Keras's own saving (so a KerasHub task keeps its tokenizer's
vocabulary), then given the original's exact weights, trainable flags and compile
settings. It keeps its class with `Converted` mixed in: a converted `GPT2CausalLM` is a
`GPT2CausalLM` and generates. Its config records the original class's config and the
attention arguments, so a saved ``.keras`` file loads back converted wherever keras_attn
is installed: the layers a KerasHub layer builds from its own config know nothing of
keras_attn, and are converted again on loading.
"""

import contextlib
import inspect
import os
import tempfile
import warnings

import keras

from keras_attn import plugins
from keras_attn.layers import BahdanauAttention
from keras_attn.layers import GroupedQueryAttention
from keras_attn.layers import LuongAttention
from keras_attn.layers import MultiHeadAttention

__all__ = ["KERAS_ATTENTION_CLASSES", "Converted", "convert"]

# Keras's attention layers and keras_attn's drop-in for each.
KERAS_ATTENTION_CLASSES = {
    keras.layers.MultiHeadAttention: MultiHeadAttention,
    keras.layers.GroupQueryAttention: GroupedQueryAttention,
    keras.layers.AdditiveAttention: BahdanauAttention,
    keras.layers.Attention: LuongAttention,
}

# Subclasses of Keras's attention whose own code keras_attn's layers replace as is:
# their call arguments and results are a subset of keras_attn's (KerasHub's cache
# layout is keras_attn's).
COMPATIBLE_SUBCLASSES = {
    "keras_hub.src.layers.modeling.cached_multi_head_attention.CachedMultiHeadAttention",
}

# Keras's projections, in Keras's weight order. A layer without them (Keras's
# dot-product and additive attention) gives its weights as a whole.
_OURS = tuple(KERAS_ATTENTION_CLASSES.values())

_PROJECTIONS = ("_query_dense", "_key_dense", "_gate_dense", "_value_dense", "_output_dense")


def _qualified_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _target_class(layer):
    """keras_attn's class for `layer`, or None to keep it (keras_attn's own, not Keras's
    attention, or a subclass of Keras's with code of its own)."""
    if isinstance(layer, _OURS):
        return None
    cls = type(layer)
    if cls in KERAS_ATTENTION_CLASSES:
        return KERAS_ATTENTION_CLASSES[cls]
    if _qualified_name(cls) in COMPATIBLE_SUBCLASSES:
        return next(
            ours
            for keras_class, ours in KERAS_ATTENTION_CLASSES.items()
            if isinstance(layer, keras_class)
        )
    return None


def _attention_like(layer):
    """Whether `layer` is an attention layer: Keras's (or a subclass), keras_attn's, or a
    class named so (KerasHub's `Qwen3Attention`, ...; not a mask maker)."""
    if isinstance(layer, (*KERAS_ATTENTION_CLASSES, *_OURS)):
        return True
    name = type(layer).__name__.lower()
    return "attention" in name and "mask" not in name


def _targets(model):
    """The layers `convert` replaces, once each, in the order it meets them."""
    found = {}
    for parent in model._flatten_layers(include_self=True, recursive=True):
        for sublayer in parent._layers:
            if _target_class(sublayer) is not None:
                found.setdefault(id(sublayer), sublayer)
    return list(found.values())


def _unconverted(model):
    """The attention layers of `model` that `convert` leaves as they are, innermost only
    (a block holding an attention layer is not one)."""
    inside_ours = {
        id(inner)
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, _OURS)
        for inner in layer._flatten_layers(include_self=False)
    }
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if _attention_like(layer)
        and _target_class(layer) is None
        and not isinstance(layer, _OURS)
        and id(layer) not in inside_ours
        and not any(_attention_like(inner) for inner in layer._flatten_layers(include_self=False))
    ]


def _describe_layers(layers):
    return ", ".join(
        f"{layer.path or layer.name!r} ({_qualified_name(type(layer))})" for layer in layers
    )


_WHAT_IT_CONVERTS = (
    "keras_attn.convert converts Keras's MultiHeadAttention, GroupQueryAttention, "
    "Attention and AdditiveAttention and KerasHub's CachedMultiHeadAttention; not a "
    "subclass of Keras's attention with code of its own (e.g. KerasHub's Whisper, "
    "Moonshine and XLNet attention) nor a model's own attention class (e.g. KerasHub's "
    "Llama, Qwen3 or Gemma 3 attention, whose QK-norm and rope it does not map)"
)


def _report_unconverted(model, layers, unconverted):
    if not layers or unconverted == "ignore":
        return
    message = (
        f"keras_attn.convert leaves {len(layers)} attention layer(s) of model "
        f"{model.name!r} as they are, with their own code and without the attention "
        f"arguments: {_describe_layers(layers)}. {_WHAT_IT_CONVERTS}."
    )
    if unconverted == "raise":
        raise ValueError(f"{message} Received: unconverted='raise'.")
    warnings.warn(
        f"{message} Pass unconverted='ignore' to convert the rest without this warning, "
        "or unconverted='raise' to make it an error.",
        stacklevel=3,
    )


def _serialize_attention(attention):
    return {
        k: plugins.serialize(v) if plugins.kind_of(v) is not None else v
        for k, v in attention.items()
    }


def _describe(layer):
    return ", ".join(f"{v.name} {tuple(v.shape)}" for v in layer.weights) or "no weights"


def _copy_weights(old, new):
    """Give `new` the weights of `old`, projection by projection, LoRA factors included."""
    pairs = [
        (name, getattr(old, name), getattr(new, name, None))
        for name in _PROJECTIONS
        if getattr(old, name, None) is not None
    ]
    for name, old_sublayer, new_sublayer in pairs or [("", old, new)]:
        where = f"its projection {name.strip('_')!r}" if name else "it"
        if new_sublayer is None:
            raise ValueError(
                f"keras_attn.convert cannot convert layer {old.name!r}: keras_attn's "
                f"{type(new).__name__} has no {name.strip('_')!r} projection to hold its "
                "weights."
            )
        if getattr(old_sublayer, "lora_enabled", False) and not new_sublayer.lora_enabled:
            new_sublayer.enable_lora(old_sublayer.lora_rank, lora_alpha=old_sublayer.lora_alpha)
        shapes = [tuple(v.shape) for v in old_sublayer.weights]
        if shapes != [tuple(v.shape) for v in new_sublayer.weights]:
            raise ValueError(
                f"keras_attn.convert cannot convert layer {old.name!r}: {where} holds "
                f"{_describe(old_sublayer)}, and keras_attn's {type(new).__name__} made "
                f"from its config holds {_describe(new_sublayer)}. The attention arguments "
                "must keep the projections' shapes, and a projection's weights (LoRA "
                "included) must be those of a Keras EinsumDense."
            )
        new_sublayer.set_weights(old_sublayer.get_weights())
        new_sublayer.trainable = old_sublayer.trainable
        for old_variable, new_variable in zip(
            old_sublayer.weights, new_sublayer.weights, strict=True
        ):
            new_variable.trainable = old_variable.trainable


def _replacement(layer, cls, attention):
    config = layer.get_config()
    config.update(attention)
    if "pattern" in attention and config.get("sliding_window") is not None:
        raise ValueError(
            f"Layer {layer.name!r} has a sliding window; pass no `pattern` to convert it. "
            f"Received: pattern={attention['pattern']!r}"
        )
    new = cls.from_config(config)
    new.trainable = layer.trainable
    if layer.built:
        with _name_scope_of(layer):
            new.build(**layer._build_shapes_dict)
        _copy_weights(layer, new)
    return new


@contextlib.contextmanager
def _name_scope_of(layer):
    """The name scope `layer` was built in: the new layer's weights get the same paths
    (which a `keras.distribution.LayoutMap` matches)."""
    with contextlib.ExitStack() as stack:
        for name in (layer.path or "").split("/")[:-1]:
            stack.enter_context(keras.name_scope(name))
        yield


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


def _convert_in_place(model, attention, selected=None):
    """Replace `model`'s targets; those whose index is in `selected` (all if None) get
    `attention`, the others none."""
    replacements = {}  # id(old) -> new: a layer shared by two parents stays shared
    for index, layer in enumerate(_targets(model)):
        chosen = attention if selected is None or index in selected else {}
        replacements[id(layer)] = _replacement(layer, _target_class(layer), chosen)
    for parent in model._flatten_layers(include_self=True, recursive=True):
        for sublayer in list(parent._layers):
            if id(sublayer) in replacements:
                _swap(parent, sublayer, replacements[id(sublayer)])
    # KerasHub's backbones count their LoRA layers by position, which converting shifts.
    for layer in model._flatten_layers(include_self=True):
        if getattr(layer, "_lora_enabled_layers", None):
            weighted = [lyr for lyr in layer._flatten_layers(include_self=False) if lyr.weights]
            layer._lora_enabled_layers = [
                i for i, lyr in enumerate(weighted) if getattr(lyr, "lora_enabled", False)
            ]


def _finish(model, attention, selected=None):
    """Convert `model` in place and make it a `Converted` of its class."""
    _convert_in_place(model, attention, selected)
    object.__setattr__(model, "__class__", _converted_class(type(model)))
    object.__setattr__(model, "_keras_attn_attention", attention)
    object.__setattr__(model, "_keras_attn_selected", selected)
    return model


def _with_sampler(model, config):
    """`model`'s compile `config`, with the sampler of a KerasHub generative task."""
    if not config:
        return config
    sampler = getattr(model, "sampler", None)
    if sampler is not None and "sampler" in inspect.signature(model.compile).parameters:
        config = {**config, "sampler": keras.saving.serialize_keras_object(sampler)}
    return config


@keras.saving.register_keras_serializable(package="keras_attn")
class Converted:
    """Mixed into the class of every model made by `convert`.

    A converted model is an instance of its original class (a converted
    `GPT2CausalLM` is a `GPT2CausalLM`) and of `Converted`. It calls, trains,
    generates and saves as the original does; its config is the original class's
    config and the attention arguments, so a saved ``.keras`` file loads back
    converted after ``import keras_attn``, in any process. A KerasHub generative
    task's compile config also records its sampler.
    """

    def get_config(self):
        base = type(self)._keras_attn_base
        return {
            "model": {
                "module": base.__module__,
                "class_name": base.__name__,
                "registered_name": keras.saving.get_registered_name(base),
                "config": super().get_config(),
            },
            "attention": self._keras_attn_attention,
            # The indices (in `convert`'s order) of the layers given `attention`.
            "apply_to": None
            if self._keras_attn_selected is None
            else sorted(self._keras_attn_selected),
        }

    @classmethod
    def from_config(cls, config):
        model = keras.saving.deserialize_keras_object(config["model"])
        selected = config.get("apply_to")
        return _finish(
            model, config.get("attention") or {}, None if selected is None else set(selected)
        )

    def get_compile_config(self):
        return _with_sampler(self, super().get_compile_config())

    def compile_from_config(self, config):
        if "sampler" not in config:
            return super().compile_from_config(config)
        # A KerasHub generative task: its own `compile` takes Keras's arguments and
        # the sampler (Keras skips a custom `compile` when it loads a model).
        self.compile(**keras.saving.deserialize_keras_object(config))


_CONVERTED_CLASSES = {}


def _converted_class(base):
    """`base` with `Converted` mixed in (one class per base)."""
    if base not in _CONVERTED_CLASSES:
        cls = type(
            base.__name__,
            (Converted, base),
            {"__module__": __name__, "__qualname__": base.__qualname__, "_keras_attn_base": base},
        )
        # Keras saves an object under its class's registered name: every converted
        # class is saved under `Converted`'s, whose `from_config` rebuilds the original
        # class and converts it.
        keras.saving.register_keras_serializable("keras_attn", "Converted")(cls)
        keras.saving.register_keras_serializable("keras_attn", "Converted")(Converted)
        _CONVERTED_CLASSES[base] = cls
    return _CONVERTED_CLASSES[base]


def _copy(model):
    """A copy of `model` made through Keras's saving: config, assets and exact state."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save(path)
                # Our own file, of a model already in memory.
                copy = keras.saving.load_model(path, compile=False, safe_mode=False)
        except Exception as error:
            raise ValueError(
                "keras_attn.convert copies the model through Keras's saving, and model "
                f"{model.name!r} does not save and load: {type(error).__name__}: {error}. "
                "Register custom classes with keras.saving.register_keras_serializable "
                "and give them a get_config that records every constructor argument."
            ) from error
    # Layers that hold weights pair up (a preprocessor may build weightless layers late).
    originals = [layer for layer in model._flatten_layers(include_self=True) if layer.weights]
    copies = [layer for layer in copy._flatten_layers(include_self=True) if layer.weights]
    if [type(layer) for layer in originals] != [type(layer) for layer in copies]:
        raise ValueError(
            f"keras_attn.convert cannot copy model {model.name!r}: its layers "
            f"{[type(layer).__name__ for layer in originals]} come back from its config "
            f"as {[type(layer).__name__ for layer in copies]}; every get_config must "
            "record how its layers are made."
        )
    for old, new in zip(originals, copies, strict=True):
        # A layer's LoRA factors are not in its parent's config (Keras's attention
        # builds its projections itself).
        if getattr(old, "lora_enabled", False) and not new.lora_enabled:
            new.enable_lora(old.lora_rank, lora_alpha=old.lora_alpha)
        new.trainable = old.trainable  # parents come first: a child keeps its own
        if hasattr(old, "_lora_rank"):  # KerasHub's backbone.enable_lora
            new._lora_rank = old._lora_rank
            new._lora_enabled_layers = list(old._lora_enabled_layers)
    old_weights, new_weights = model.weights, copy.weights
    old_shapes = [(v.path, tuple(v.shape)) for v in old_weights]
    new_shapes = [(v.path, tuple(v.shape)) for v in new_weights]
    if [shape for _, shape in old_shapes] != [shape for _, shape in new_shapes]:
        raise ValueError(
            f"keras_attn.convert cannot copy model {model.name!r}: its copy holds the "
            f"weights {new_shapes} where it holds {old_shapes}; a layer's state is not "
            "all in its config."
        )
    copy.set_weights(model.get_weights())
    for old_variable, new_variable in zip(old_weights, new_weights, strict=True):
        new_variable.trainable = old_variable.trainable
    return copy


def _compile_like(copy, model):
    if not getattr(model, "compiled", False):
        return
    config = _with_sampler(model, model.get_compile_config())
    if not config:
        return
    try:
        copy.compile(**keras.saving.deserialize_keras_object(config))
    except TypeError as error:
        warnings.warn(
            f"keras_attn.convert could not compile the converted copy of {model.name!r} "
            f"as the model was compiled ({error}); call its compile() again.",
            stacklevel=3,
        )


def convert(model, apply_to=None, unconverted="warn", **attention):
    """A copy of `model` whose Keras attention layers are keras_attn layers.

    Every `keras.layers.MultiHeadAttention`, `keras.layers.GroupQueryAttention`,
    `keras.layers.Attention` and `keras.layers.AdditiveAttention`, at any depth (and
    KerasHub's `CachedMultiHeadAttention`), becomes keras_attn's drop-in
    (`MultiHeadAttention`, `GroupedQueryAttention`, `LuongAttention`,
    `BahdanauAttention`) with the same configuration and weights (LoRA factors too,
    with the same rank), plus `attention`. A layer used in two places is converted
    once and stays shared. `model` itself is not changed.

    Other attention layers are left as they are, with their own code: subclasses of
    Keras's attention with code of their own (KerasHub's Whisper, Moonshine, XLNet
    attention) and models' own attention classes (KerasHub's Llama, Qwen3, Gemma 3
    attention: their QK-norm and rope are not mapped). `unconverted` says what
    `convert` does about them.

    The copy is an instance of `model`'s class and of `keras_attn.Converted`: it
    keeps the original's trainable flags, compile settings (a KerasHub task's sampler
    included), preprocessor and tokenizer, and it saves as ``.keras`` and loads back
    converted in any process that imports keras_attn (LoRA factors are then merged
    into the kernels, as Keras saves them).

    Args:
        model: A built Keras model that saves and loads with Keras (functional,
            sequential, a registered subclass, or a KerasHub backbone or task).
        apply_to: None (every converted layer takes `attention`), or a callable
            ``layer -> bool`` called with each Keras attention layer of `model` that
            is converted; the layers it rejects are converted without `attention`
            (they compute what they did). E.g. position-dependent components on
            self-attention only: ``apply_to=lambda layer: "cross" not in layer.name``
            (KerasHub's cached cross-attention does not know its queries'
            positions).
        unconverted: What to do about attention layers left as they are: ``"warn"``
            (default: one warning naming each layer's path and class), ``"raise"``
            (a ValueError naming them), or ``"ignore"``.
        **attention: Arguments of keras_attn's layers for every replaced layer, e.g.
            ``pattern=keras_attn.patterns.Local(64)``, ``normalizer="sparsemax"``,
            ``score=MyPluginScore()`` (each layer gets its own copy). None: the
            outputs are identical.

    Returns:
        The converted copy.

    Raises:
        TypeError: `model` is not a Keras model; `apply_to` is not callable.
        ValueError: no attention layer that `convert` converts (or an already
            converted model; the error names the attention layers it does not
            convert); with ``unconverted="raise"``, attention layers it does not
            convert; `apply_to` rejecting every layer while `attention` is given; an
            `unconverted` other than the three; a model that does not save and load
            with Keras; weights that keras_attn's layer made with `attention` cannot
            hold (the error names the layer, its weights and keras_attn's).

    Warns:
        UserWarning: with ``unconverted="warn"``, naming the attention layers left
            as they are.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "keras_attn.convert takes a Keras model (functional, sequential, or a KerasHub "
            f"backbone or task). Received: model={model!r} of type {type(model).__name__}"
        )
    if unconverted not in ("warn", "raise", "ignore"):
        raise ValueError(
            f"Expected unconverted='warn', 'raise' or 'ignore'. Received: unconverted={unconverted!r}"
        )
    if apply_to is not None and not callable(apply_to):
        raise TypeError(
            "Expected apply_to=None or a callable layer -> bool. "
            f"Received: apply_to={apply_to!r} of type {type(apply_to).__name__}"
        )
    targets = _targets(model)
    left = _unconverted(model)
    if not targets:
        converted = " (it is already converted)" if isinstance(model, Converted) else ""
        others = (
            f" It has these, which it does not convert: {_describe_layers(left)}." if left else ""
        )
        raise ValueError(
            f"keras_attn.convert found no attention layer that it converts in model "
            f"{model.name!r}{converted}.{others} {_WHAT_IT_CONVERTS}."
        )
    _report_unconverted(model, left, unconverted)
    selected = None
    if apply_to is not None:
        selected = {i for i, layer in enumerate(targets) if apply_to(layer)}
        if attention and not selected:
            raise ValueError(
                f"apply_to chose none of the attention layers of model {model.name!r} "
                f"({_describe_layers(targets)}), so no layer would take {sorted(attention)}."
            )
    copy = _copy(model)
    copied = _targets(copy)
    if [type(layer) for layer in targets] != [type(layer) for layer in copied]:
        raise ValueError(  # _copy checks the layers that hold weights; this, the rest
            f"keras_attn.convert cannot copy model {model.name!r}: its attention layers "
            f"{_describe_layers(targets)} come back from its config as "
            f"{_describe_layers(copied)}."
        )
    _compile_like(copy, model)
    return _finish(copy, _serialize_attention(attention), selected)
