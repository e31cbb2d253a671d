"""The attention layers: the engine layer, its presets and the Keras drop-ins.

- `attention`: `Attention`, the engine layer (projections, masks, cache; the path is
  planned and run by `keras_attn.dispatch`).
- `presets`: `SoftAttention`, `HardAttention`, `GlobalAttention`, `LocalAttention`,
  `SelfAttention`, `CrossAttention`.
- `keras_compat`: `MultiHeadAttention` and `GroupedQueryAttention` (also
  `GroupQueryAttention`, Keras's spelling), drop-ins for Keras's.
- `classic`: `LuongAttention` and `BahdanauAttention` (also `AdditiveAttention`),
  drop-ins for `keras.layers.Attention` and `keras.layers.AdditiveAttention`.
- `shapes`: argument checks, projection equations and attention axes.
- `plugin`: keras_attn's own plugin that registers them through the `register_layers`
  hook, as a third-party plugin would.
"""

from keras_attn.layers.attention import Attention
from keras_attn.layers.classic import AdditiveAttention
from keras_attn.layers.classic import BahdanauAttention
from keras_attn.layers.classic import LuongAttention
from keras_attn.layers.keras_compat import GroupedQueryAttention
from keras_attn.layers.keras_compat import MultiHeadAttention
from keras_attn.layers.presets import CrossAttention
from keras_attn.layers.presets import GlobalAttention
from keras_attn.layers.presets import HardAttention
from keras_attn.layers.presets import LocalAttention
from keras_attn.layers.presets import SelfAttention
from keras_attn.layers.presets import SoftAttention

GroupQueryAttention = GroupedQueryAttention  # Keras's spelling

__all__ = [
    "AdditiveAttention",
    "Attention",
    "BahdanauAttention",
    "CrossAttention",
    "GlobalAttention",
    "GroupQueryAttention",
    "GroupedQueryAttention",
    "HardAttention",
    "LocalAttention",
    "LuongAttention",
    "MultiHeadAttention",
    "SelfAttention",
    "SoftAttention",
]
