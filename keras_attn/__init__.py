"""keras_attn: attention layers of every classic type, assembled from pluggable parts.

Layers: `Attention` and its presets `SoftAttention`, `HardAttention`,
`GlobalAttention`, `LocalAttention`, `SelfAttention`, `CrossAttention` and
`MultiHeadAttention` (a drop-in for `keras.layers.MultiHeadAttention`).

Components, each a registry of its own that plugins extend through the hooks of
`keras_attn.hookspecs`: `Score`, `ScoreMod`, `Pattern`, `Normalizer`.
"""

__version__ = "0.1.0"

from keras_attn import plugins
from keras_attn.errors import ComponentKindError
from keras_attn.errors import DuplicateComponentError
from keras_attn.errors import PluginError
from keras_attn.errors import PluginImportError
from keras_attn.errors import UnknownComponentError
from keras_attn.hookspecs import hookimpl
from keras_attn.layers import Attention
from keras_attn.layers import CrossAttention
from keras_attn.layers import GlobalAttention
from keras_attn.layers import HardAttention
from keras_attn.layers import LocalAttention
from keras_attn.layers import MultiHeadAttention
from keras_attn.layers import SelfAttention
from keras_attn.layers import SoftAttention
from keras_attn.normalizers import Normalizer
from keras_attn.patterns import Pattern
from keras_attn.positions import Positions
from keras_attn.score_mods import ScoreMod
from keras_attn.scores import Score

__all__ = [
    "Attention",
    "ComponentKindError",
    "CrossAttention",
    "DuplicateComponentError",
    "GlobalAttention",
    "HardAttention",
    "LocalAttention",
    "MultiHeadAttention",
    "Normalizer",
    "Pattern",
    "PluginError",
    "PluginImportError",
    "Positions",
    "Score",
    "ScoreMod",
    "SelfAttention",
    "SoftAttention",
    "UnknownComponentError",
    "hookimpl",
    "plugins",
]
