"""ViT: a Vision Transformer assembled from keras_attn layers.

- `examples.vit.model`: `ClassToken` and `ViT` / `build_vit`, on the blocks of
  `examples.common.blocks`.
- `examples.vit.data`: the image datasets, with augmentation.
- ``python -m examples.vit train|compare`` (`examples.vit.__main__`).
"""

from examples.vit.model import ClassToken
from examples.vit.model import ViT
from examples.vit.model import build_vit
from examples.vit.model import compile_vit

__all__ = ["ClassToken", "ViT", "build_vit", "compile_vit"]
