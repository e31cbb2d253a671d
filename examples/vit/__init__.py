"""ViT: a Vision Transformer assembled from keras_attn layers.

- `examples.vit.model`: `ClassToken` and `build_vit`, on the encoder blocks of
  `examples.common.layers`.
- `examples.vit.data`: the image datasets, with augmentation.
- ``python -m examples.vit train|compare`` (`examples.vit.__main__`).
"""

from examples.vit.model import ClassToken
from examples.vit.model import build_vit
from examples.vit.model import compile_vit

__all__ = ["ClassToken", "build_vit", "compile_vit"]
