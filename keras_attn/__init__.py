"""keras_attn: attention layers of every classic type, assembled from pluggable parts.

Layers (`keras_attn.layers`): `Attention` and its presets `SoftAttention`,
`HardAttention`, `GlobalAttention`, `LocalAttention`, `SelfAttention`,
`CrossAttention`, and drop-ins for Keras's: `MultiHeadAttention`,
`GroupedQueryAttention` (also `GroupQueryAttention`), `LuongAttention` (for
`keras.layers.Attention`) and `BahdanauAttention` (also `AdditiveAttention`).

Components (`keras_attn.components` holds their base classes): `Score`, `ScoreMod`,
`Pattern`, `Normalizer`, `PositionEncoding`, each a registry of its own that plugins extend through the
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
    "AdditiveAttention": "keras_attn.layers",
    "Attention": "keras_attn.layers",
    "BahdanauAttention": "keras_attn.layers",
    "ContextParallel": "keras_attn.context_parallel",
    "Converted": "keras_attn.conversion",
    "convert": "keras_attn.conversion",
    "CrossAttention": "keras_attn.layers",
    "GlobalAttention": "keras_attn.layers",
    "GroupQueryAttention": "keras_attn.layers",
    "GroupedQueryAttention": "keras_attn.layers",
    "HardAttention": "keras_attn.layers",
    "LocalAttention": "keras_attn.layers",
    "LuongAttention": "keras_attn.layers",
    "MultiHeadAttention": "keras_attn.layers",
    "SelfAttention": "keras_attn.layers",
    "SoftAttention": "keras_attn.layers",
    "Normalizer": "keras_attn.components",
    "Pattern": "keras_attn.components",
    "PositionEncoding": "keras_attn.components",
    "Score": "keras_attn.components",
    "ScoreMod": "keras_attn.components",
    "Positions": "keras_attn.positions",
    "ComponentKindError": "keras_attn.errors",
    "DuplicateComponentError": "keras_attn.errors",
    "MissingComponentsError": "keras_attn.errors",
    "PluginError": "keras_attn.errors",
    "PluginImportError": "keras_attn.errors",
    "UnknownComponentError": "keras_attn.errors",
    "check_file": "keras_attn.saving",
    "layout_map": "keras_attn.layouts",
}
_SUBMODULES = {
    "plugins",
    "patterns",
    "scores",
    "score_mods",
    "normalizers",
    "position_encodings",
    "qk_norm",
    "context_parallel",
    "layers",
    "saving",
    "testing",
    "layouts",
    "viz",
}

__all__ = sorted([*_LAZY, "hookimpl", "plugins"])


def __getattr__(name):
    if name in _LAZY:
        if "keras" in sys.modules and not _initializing():
            _import_keras_objects()  # Keras can load .keras files
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"keras_attn.{name}")
    else:
        raise AttributeError(f"module 'keras_attn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


def _import_keras_objects():
    """What Keras must know to load a ``.keras`` file: the layers and converted models."""
    importlib.import_module("keras_attn.layers")
    importlib.import_module("keras_attn.conversion")


def _initializing():
    """Whether a keras_attn module is being imported right now (its body has not finished)."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith("keras_attn.")
    )


class _LayersWithKeras(importlib.abc.MetaPathFinder):
    """Imports keras_attn's layers as soon as Keras is imported, and it is safe to.

    Keras finds a layer class in a ``.keras`` file only if the class was defined
    before, so keras_attn's layers must be known whenever Keras is, without
    ``import keras_attn`` importing Keras (and a backend) itself. When Keras is
    imported by one of keras_attn's own modules, the layers cannot be imported
    before that module has finished; the finder then waits for the next import
    that happens once it has (it sees every import) to do it.
    """

    def __init__(self):
        self.keras_imported = False
        self.finding = False

    def find_spec(self, name, path=None, target=None):
        if self.finding:
            return None
        if self.keras_imported:
            if not _initializing():
                self._import_layers()
            return None
        if name != "keras":
            return None
        self.finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.finding = False
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_import_layers(module):
                exec_module(module)
                self.keras_imported = True
                if not _initializing():
                    self._import_layers()

            spec.loader.exec_module = exec_then_import_layers
        return spec

    def _import_layers(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)
            _import_keras_objects()


if "keras" in sys.modules:
    if not _initializing():
        _import_keras_objects()
elif not any(isinstance(f, _LayersWithKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _LayersWithKeras())
