"""BERT: an encoder of unmasked self-attention assembled from keras_attn layers.

- `examples.bert.model`: the encoder (`BertEncoder`), the masked-language-model
  pretrainer (`BertPretrainer`) and the classifier (`BertClassifier`); `build_bert`.
- `examples.bert.data`: masking, windows and labelled texts.
- ``python -m examples.bert pretrain|finetune|compare`` (`examples.bert.__main__`).
"""

from examples.bert.model import BertClassifier
from examples.bert.model import BertEncoder
from examples.bert.model import BertPretrainer
from examples.bert.model import GatherPositions
from examples.bert.model import build_bert
from examples.bert.model import build_bert_classifier
from examples.bert.model import build_bert_encoder
from examples.bert.model import build_bert_pretrainer
from examples.bert.model import compile_bert
from examples.bert.model import encoder_config

__all__ = [
    "BertClassifier",
    "BertEncoder",
    "BertPretrainer",
    "GatherPositions",
    "build_bert",
    "build_bert_classifier",
    "build_bert_encoder",
    "build_bert_pretrainer",
    "compile_bert",
    "encoder_config",
]
