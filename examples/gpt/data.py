"""GPT's data: a text dataset as character ids, cut into next-token windows or packed rows.

``pydoc_text`` (the default) is built locally from the Python documentation;
``tiny_shakespeare`` comes from the TFDS catalog. The tokenizer is built from
the training split and saved with the run, so generation decodes with it.

A *document* is one TFDS example of the split: one topic of ``pydoc_text``, the
whole text of a ``tiny_shakespeare`` split (that catalog dataset has one example
per split). By default the documents are joined by blank lines into one stream cut
into windows. With ``--pack`` (`pack_documents`) they are packed into full rows of
``--seq-len`` tokens without padding, each token with the segment id of its
document in the row, and the next-token targets that would cross from one document
into the next get weight 0.
"""

import numpy as np

from examples import datasets
from examples.common import text as text_lib
from examples.common.training import Data

DATASETS = ("pydoc_text", "tiny_shakespeare")


def load_documents(args, split):
    """The documents (strings) of split `split` of ``args.dataset``, one per TFDS example."""
    ds = datasets.load(
        args.dataset, split, data_dir=args.data_dir, download=args.download, allowed=DATASETS
    )
    return text_lib.read_texts(ds)


def pack_documents(documents, length):
    """Pack documents of token ids into rows of `length` next-token pairs, without padding.

    The documents are laid end to end and cut into rows; a document longer than
    what is left of a row continues at the start of the next one. The tail too
    short for a whole row is left out.

    Args:
        documents: Sequence of int token-id arrays (empty ones are skipped).
        length: Tokens per row.

    Returns:
        Dict of ``(N, length)`` arrays: ``token_ids`` and ``targets`` (int32; the
        target of a token is the token after it in the stream), ``segment_ids``
        (int32: 0 for the first document of the row, 1 for the next, ...) and
        ``weights`` (float32: 0 where the target is the first token of the next
        document, so no target crosses a document boundary; 1 elsewhere).
    """
    documents = [np.asarray(d, "int32") for d in documents if len(d)]
    ids = np.concatenate(documents) if documents else np.zeros((0,), "int32")
    document = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
    rows = (len(ids) - 1) // length
    if rows < 1:
        raise ValueError(
            f"The documents hold {len(ids)} tokens, too few for one packed row of "
            f"{length} tokens and their targets. Received: length={length}"
        )
    size = rows * length
    inputs_document = document[:size].reshape(rows, length)
    targets_document = document[1 : size + 1].reshape(rows, length)
    return {
        "token_ids": ids[:size].reshape(rows, length),
        "targets": ids[1 : size + 1].reshape(rows, length),
        "segment_ids": (inputs_document - inputs_document[:, :1]).astype("int32"),
        "weights": (inputs_document == targets_document).astype("float32"),
    }


def packed_dataset(packed, batch_size, shuffle=True, seed=0, repeat=False):
    """A `tf.data.Dataset` of ``({"token_ids", "segment_ids"}, targets, weights)`` batches
    from `pack_documents`' rows, last partial batch dropped."""
    import tensorflow as tf

    rows = len(packed["token_ids"])
    if rows < batch_size:
        raise ValueError(
            f"The documents pack into {rows} rows, fewer than one batch. Use a smaller "
            f"--batch-size or --seq-len. Received: batch_size={batch_size}"
        )
    inputs = {"token_ids": packed["token_ids"], "segment_ids": packed["segment_ids"]}
    ds = tf.data.Dataset.from_tensor_slices((inputs, packed["targets"], packed["weights"]))
    if shuffle:
        ds = ds.shuffle(rows, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)


class TextData(Data):
    """A dataset's text as token ids, with the tokenizer built from its training split.

    Attributes:
        tokenizer: The `CharTokenizer` of the training text.
        train_ids, eval_ids: The training and held-out text as ids (the documents
            joined by blank lines; laid end to end with ``pack``).
        baseline: The unigram entropy of the training text (nats per character),
            the loss of a model that ignores context.
        pack: Whether the batches are packed rows (`pack_documents`).
        tokens_per_step: Tokens in one training batch.
    """

    def __init__(self, args):
        self.seq_len, self.batch_size = args.seq_len, args.batch_size
        self.pack = bool(getattr(args, "pack", False))
        train_docs, eval_docs = load_documents(args, "train"), load_documents(args, "test")
        train_text = "\n\n".join(train_docs)
        self.tokenizer = text_lib.CharTokenizer.from_texts([train_text])
        if self.pack:
            train = [self.tokenizer.encode(d) for d in train_docs]
            test = [self.tokenizer.encode(d) for d in eval_docs]
            self.train_ids, self.eval_ids = np.concatenate(train), np.concatenate(test)
            self.train_rows = pack_documents(train, self.seq_len)
            self.eval_rows = pack_documents(test, self.seq_len)
        else:
            self.train_ids = self.tokenizer.encode(train_text)
            self.eval_ids = self.tokenizer.encode("\n\n".join(eval_docs))
        self.baseline = text_lib.unigram_entropy(self.train_ids, self.tokenizer.vocab_size)
        self.tokens_per_step = self.seq_len * self.batch_size
        self.facts = {
            "unigram_entropy": self.baseline,
            "vocab_size": self.tokenizer.vocab_size,
            "train_tokens": len(self.train_ids),
            "test_tokens": len(self.eval_ids),
            "train_documents": len(train_docs),
            "test_documents": len(eval_docs),
            "pack": self.pack,
        }
        if self.pack:
            self.facts.update(
                train_rows=len(self.train_rows["token_ids"]),
                # Targets left out of the loss: the first token of the next document.
                train_masked_targets=int((self.train_rows["weights"] == 0).sum()),
                test_rows=len(self.eval_rows["token_ids"]),
                test_masked_targets=int((self.eval_rows["weights"] == 0).sum()),
            )

    def train_dataset(self, seed, repeat):
        if self.pack:
            return packed_dataset(self.train_rows, self.batch_size, seed=seed, repeat=repeat)
        return text_lib.lm_dataset(
            self.train_ids, self.seq_len, self.batch_size, seed=seed, repeat=repeat
        )

    def test_dataset(self):
        if self.pack:
            return packed_dataset(self.eval_rows, self.batch_size, shuffle=False)
        return text_lib.lm_dataset(self.eval_ids, self.seq_len, self.batch_size, shuffle=False)

    def steps_per_epoch(self):
        if self.pack:
            return len(self.train_rows["token_ids"]) // self.batch_size
        return (len(self.train_ids) - 1) // self.seq_len // self.batch_size
