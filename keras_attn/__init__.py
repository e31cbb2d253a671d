"""keras_attn: attention layers of every classic type, assembled from pluggable parts.

Layers (`keras_attn.layers`): `Attention` and its presets `SoftAttention`,
`HardAttention`, `GlobalAttention`, `LocalAttention`, `SelfAttention`,
`CrossAttention`, and `MultiHeadAttention` (a drop-in for Keras's).

Components (`keras_attn.components` holds their base classes): `Score`, `ScoreMod`,
`Pattern`, `Normalizer`, each a registry of its own that plugins extend through the
hooks of `keras_attn.hookspecs` (`keras_attn.plugins` is the registry).

The engine: `keras_attn.dispatch` plans and runs an attention on one of its paths
(`keras_attn.kernels` dense and fused, `keras_attn.block_sparse` on a
`keras_attn.block_layout`); `keras_attn.masks` and `keras_attn.kv_cache` prepare its
inputs.

Importing keras_attn imports neither Keras nor a backend: the names below load on
first use, so ``keras-attn --help`` and a conftest that picks the backend stay fast.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from keras_attn.hookspecs import hookimpl as hookimpl

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Attention": "keras_attn.layers",
    "CrossAttention": "keras_attn.layers",
    "GlobalAttention": "keras_attn.layers",
    "HardAttention": "keras_attn.layers",
    "LocalAttention": "keras_attn.layers",
    "MultiHeadAttention": "keras_attn.layers",
    "SelfAttention": "keras_attn.layers",
    "SoftAttention": "keras_attn.layers",
    "Normalizer": "keras_attn.components",
    "Pattern": "keras_attn.components",
    "Score": "keras_attn.components",
    "ScoreMod": "keras_attn.components",
    "Positions": "keras_attn.positions",
    "ComponentKindError": "keras_attn.errors",
    "DuplicateComponentError": "keras_attn.errors",
    "PluginError": "keras_attn.errors",
    "PluginImportError": "keras_attn.errors",
    "UnknownComponentError": "keras_attn.errors",
}
_SUBMODULES = {"plugins", "patterns", "scores", "score_mods", "normalizers", "layers", "testing"}

__all__ = sorted([*_LAZY, "hookimpl", "plugins"])


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"keras_attn.{name}")
    else:
        raise AttributeError(f"module 'keras_attn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


class _LayersAfterKeras(importlib.abc.MetaPathFinder):
    """Imports keras_attn's layers as soon as Keras itself is imported.

    Keras finds a layer class in a ``.keras`` file only if the class was defined
    before; keras_attn's layers must therefore be known whenever Keras is, without
    keras_attn importing Keras (and a backend) itself.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_import_layers(module):
                exec_module(module)
                importlib.import_module("keras_attn.layers")

            spec.loader.exec_module = exec_then_import_layers
        return spec


if "keras" in sys.modules:
    importlib.import_module("keras_attn.layers")
elif not any(isinstance(f, _LayersAfterKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _LayersAfterKeras())
