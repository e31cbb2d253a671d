"""keras-attn-bigbird: the "bigbird" and "longformer" sparsity patterns for keras_attn."""

__version__ = "0.1.0"

from keras_attn_bigbird.patterns import BigBird
from keras_attn_bigbird.patterns import Longformer

__all__ = ["BigBird", "Longformer"]
