"""GPT's data: a text dataset as character ids, cut into next-token windows.

``pydoc_text`` (the default) is built locally from the Python documentation;
``tiny_shakespeare`` comes from the TFDS catalog. The tokenizer is built from
the training split and saved with the run, so generation decodes with it.
"""

from examples import datasets
from examples.common import text as text_lib
from examples.common.training import Data

DATASETS = ("pydoc_text", "tiny_shakespeare")


def load_text(args, split):
    """The text of split `split` of ``args.dataset``, its documents joined by blank lines."""
    ds = datasets.load(
        args.dataset, split, data_dir=args.data_dir, download=args.download, allowed=DATASETS
    )
    return "\n\n".join(text_lib.read_texts(ds))


class TextData(Data):
    """A dataset's text as token ids, with the tokenizer built from its training split.

    Attributes:
        tokenizer: The `CharTokenizer` of the training text.
        train_ids, eval_ids: The training and held-out text as ids.
        baseline: The unigram entropy of the training text (nats per character),
            the loss of a model that ignores context.
    """

    def __init__(self, args):
        self.seq_len, self.batch_size = args.seq_len, args.batch_size
        train_text, eval_text = load_text(args, "train"), load_text(args, "test")
        self.tokenizer = text_lib.CharTokenizer.from_texts([train_text])
        self.train_ids = self.tokenizer.encode(train_text)
        self.eval_ids = self.tokenizer.encode(eval_text)
        self.baseline = text_lib.unigram_entropy(self.train_ids, self.tokenizer.vocab_size)
        self.facts = {
            "unigram_entropy": self.baseline,
            "vocab_size": self.tokenizer.vocab_size,
            "train_tokens": len(self.train_ids),
            "test_tokens": len(self.eval_ids),
        }

    def train_dataset(self, seed, repeat):
        return text_lib.lm_dataset(
            self.train_ids, self.seq_len, self.batch_size, seed=seed, repeat=repeat
        )

    def test_dataset(self):
        return text_lib.lm_dataset(self.eval_ids, self.seq_len, self.batch_size, shuffle=False)

    def steps_per_epoch(self):
        return (len(self.train_ids) - 1) // self.seq_len // self.batch_size
