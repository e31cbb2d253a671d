"""keras-attn-alibi: the ALiBi score_mod for keras_attn, registered as "alibi"."""

__version__ = "0.1.0"

from keras_attn_alibi.score_mods import Alibi
from keras_attn_alibi.score_mods import alibi_slopes

__all__ = ["Alibi", "alibi_slopes"]
