"""keras_attn's own plugin for its layers, registered through the same hook as a third party's.

The registry (`keras_attn.plugins`) imports this module by name when it is first used,
under the plugin name ``keras_attn.layers``; `keras_attn.layers` itself only gathers
the layer classes.
"""

from keras_attn.hookspecs import hookimpl
from keras_attn.layers.attention import Attention
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
        LuongAttention,
        BahdanauAttention,
    ):
        register(cls)
