"""GPT: a decoder-only language model assembled from keras_attn layers.

- `examples.gpt.model`: `GPT` / `build_gpt` (token ids ``(B, T)`` to logits), on the
  blocks of `examples.common.blocks`.
- `examples.gpt.generation`: `Generator` and `generate` with a key/value cache,
  `generate_text`.
- `examples.gpt.data`: the text datasets as next-token windows.
- ``python -m examples.gpt train|demo|generate|compare`` (`examples.gpt.__main__`).
"""

from examples.gpt.generation import Generator
from examples.gpt.generation import generate
from examples.gpt.generation import generate_text
from examples.gpt.model import GPT
from examples.gpt.model import TokenAndPositionEmbedding
from examples.gpt.model import build_gpt
from examples.gpt.model import compile_gpt

__all__ = [
    "GPT",
    "Generator",
    "TokenAndPositionEmbedding",
    "build_gpt",
    "compile_gpt",
    "generate",
    "generate_text",
]
