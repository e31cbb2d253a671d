"""BERT: an encoder of unmasked self-attention assembled from keras_attn layers.

- `examples.bert.model`: the encoder, the masked-language-model pretrainer and the
  classifier (`build_bert`).
- `examples.bert.data`: masking, windows and labelled texts.
- ``python -m examples.bert pretrain|finetune|compare`` (`examples.bert.__main__`).
"""

from examples.bert.model import GatherPositions
from examples.bert.model import build_bert
from examples.bert.model import build_bert_classifier
from examples.bert.model import build_bert_encoder
from examples.bert.model import build_bert_pretrainer
from examples.bert.model import compile_bert
from examples.bert.model import encoder_config

__all__ = [
    "GatherPositions",
    "build_bert",
    "build_bert_classifier",
    "build_bert_encoder",
    "build_bert_pretrainer",
    "compile_bert",
    "encoder_config",
]
