"""The attention layers: the engine layer, its presets and the Keras drop-ins.

- `attention`: `Attention`, the engine layer (projections, masks, cache; the path is
  planned and run by `keras_attn.dispatch`).
- `presets`: `SoftAttention`, `HardAttention`, `GlobalAttention`, `LocalAttention`,
  `SelfAttention`, `CrossAttention`.
- `keras_compat`: `MultiHeadAttention` and `GroupedQueryAttention`, drop-ins for Keras's.
- `shapes`: argument checks, projection equations and attention axes.

keras_attn registers them through its own `register_layers` hook, as a plugin would.
"""

from keras_attn.hookspecs import hookimpl
from keras_attn.layers.attention import Attention
from keras_attn.layers.keras_compat import GroupedQueryAttention
from keras_attn.layers.keras_compat import MultiHeadAttention
from keras_attn.layers.presets import CrossAttention
from keras_attn.layers.presets import GlobalAttention
from keras_attn.layers.presets import HardAttention
from keras_attn.layers.presets import LocalAttention
from keras_attn.layers.presets import SelfAttention
from keras_attn.layers.presets import SoftAttention

__all__ = [
    "Attention",
    "CrossAttention",
    "GlobalAttention",
    "GroupedQueryAttention",
    "HardAttention",
    "LocalAttention",
    "MultiHeadAttention",
    "SelfAttention",
    "SoftAttention",
]


@hookimpl
def register_layers(register):
    for cls in (
        Attention,
        SoftAttention,
        HardAttention,
        GlobalAttention,
        LocalAttention,
        SelfAttention,
        CrossAttention,
        MultiHeadAttention,
        GroupedQueryAttention,
    ):
        register(cls)
