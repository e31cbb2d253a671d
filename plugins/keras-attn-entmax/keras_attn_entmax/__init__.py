"""keras-attn-entmax: the entmax-1.5 normalizer for keras_attn, registered as "entmax15"."""

__version__ = "0.1.0"

from keras_attn_entmax.normalizers import Entmax15
from keras_attn_entmax.normalizers import entmax15

__all__ = ["Entmax15", "entmax15"]
