"""BERT's data: masked-language-model windows and labelled texts, as characters.

Pretraining (`PretrainingData`) cuts a text into ``[CLS]`` + characters windows and
masks them as BERT does; classification (`ClassificationData`) encodes labelled
texts as ``[CLS]`` + characters, cut to the model's maximum length. The embedded
datasets (``pydoc_text``, ``pydoc_order``) are built locally; the others come from
the TFDS catalog.
"""

import os

import keras
import numpy as np

from examples import datasets
from examples.common import text as text_lib
from examples.common.run import RunError
from examples.common.run import latest_checkpoint
from examples.common.training import Data

PRETRAIN_DATASETS = ("pydoc_text", "imdb_reviews", "glue/sst2")
CLASSIFY_DATASETS = ("pydoc_order", "imdb_reviews", "glue/sst2")
DATASETS = ("pydoc_order", "pydoc_text", "imdb_reviews", "glue/sst2")
# (training split, held-out split): glue/sst2's test labels are hidden (-1).
SPLITS = {"glue/sst2": ("train", "validation")}
TEXT_KEYS = {"glue/sst2": "sentence"}

datasets.register_embedded("pydoc_order", "examples.datasets.pydoc_order:PydocOrder")


def load_examples(args, role, allowed):
    """``(texts, labels or None)`` of the ``"train"`` or ``"test"`` role of ``args.dataset``."""
    datasets.check_name(args.dataset, allowed)
    split = SPLITS.get(args.dataset, ("train", "test"))[0 if role == "train" else 1]
    ds = datasets.load(
        args.dataset, split, data_dir=args.data_dir, download=args.download, allowed=allowed
    )
    key = TEXT_KEYS.get(args.dataset, "text")
    texts, labels = [], []
    for example in ds.as_numpy_iterator():
        texts.append(example[key].decode("utf-8"))
        labels.append(int(example["label"]) if "label" in example else -1)
    return texts, (np.asarray(labels, dtype="int32") if "label" in ds.element_spec else None)


def encode_classification(tokenizer, texts, max_length):
    """``[CLS]`` + characters, cut to `max_length` and padded: int32 ``(N, max_length)``.

    Returns:
        ``(token_ids, number of texts that were cut)``.
    """
    token_ids = np.full((len(texts), max_length), tokenizer.pad_id, dtype="int32")
    cut = 0
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)[: max_length - 1]
        cut += len(text) > max_length - 1
        token_ids[i, 0] = tokenizer.cls_id
        token_ids[i, 1 : 1 + len(ids)] = ids
    return token_ids, cut


def mlm_windows(ids, length, cls_id):
    """Cut a token stream into ``[CLS]`` + ``length - 1`` tokens: int32 ``(N, length)``."""
    ids = np.asarray(ids, dtype="int32")
    body = length - 1
    if len(ids) < body:
        raise ValueError(
            f"The text has {len(ids)} tokens, too few for one window of length {length}. "
            f"Received: seq_len={length}"
        )
    count = len(ids) // body
    windows = ids[: count * body].reshape(count, body)
    return np.concatenate([np.full((count, 1), cls_id, dtype="int32"), windows], axis=1)


def mask_tokens(token_ids, rng, tokenizer, rate=0.15, num_predictions=None):
    """BERT's masking: choose `rate` of each row's ordinary tokens to predict.

    Of the chosen tokens 80% become ``[MASK]``, 10% a random ordinary token and
    10% stay as they are; the model must predict the original token at each.
    Special tokens (``[CLS]``, ``[PAD]``, ...) are never chosen.

    Args:
        token_ids: int ``(N, T)``.
        rng: A `numpy.random.Generator`.
        num_predictions: P, the predictions per row (default ``ceil(rate * T)``);
            rows with fewer chosen tokens are padded with weight 0.

    Returns:
        Dict with ``token_ids (N, T)`` (masked), ``mask_positions (N, P)``,
        ``labels (N, P)`` (the original tokens) and ``weights (N, P)`` (1.0 for a
        real prediction, 0.0 for padding).
    """
    token_ids = np.asarray(token_ids, dtype="int32")
    n, length = token_ids.shape
    p = num_predictions or int(np.ceil(rate * length))
    special = np.array(sorted(tokenizer.special_ids), dtype="int32")
    ordinary = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype="int32"), special)
    masked = token_ids.copy()
    positions = np.zeros((n, p), dtype="int32")
    labels = np.zeros((n, p), dtype="int32")
    weights = np.zeros((n, p), dtype="float32")
    for row in range(n):
        candidates = np.flatnonzero(~np.isin(token_ids[row], special))
        count = min(p, max(1, int(round(rate * len(candidates))))) if len(candidates) else 0
        chosen = np.sort(rng.choice(candidates, size=count, replace=False))
        action = rng.random(count)
        replaced = np.where(
            action < 0.8,
            tokenizer.mask_id,
            np.where(action < 0.9, rng.choice(ordinary, size=count), token_ids[row, chosen]),
        )
        masked[row, chosen] = replaced
        positions[row, :count] = chosen
        labels[row, :count] = token_ids[row, chosen]
        weights[row, :count] = 1.0
    return {"token_ids": masked, "mask_positions": positions, "labels": labels, "weights": weights}


def mlm_arrays(windows, tokenizer, seed, dupe_factor=1):
    """Inputs, labels and weights of `dupe_factor` differently masked copies of `windows`."""
    rng = np.random.default_rng(seed)
    parts = [mask_tokens(windows, rng, tokenizer) for _ in range(dupe_factor)]
    masked = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    inputs = {
        "token_ids": masked["token_ids"],
        "segment_ids": np.zeros_like(masked["token_ids"]),
        "mask_positions": masked["mask_positions"],
    }
    return inputs, masked["labels"], masked["weights"]


def make_dataset(inputs, labels, weights=None, batch_size=32, shuffle=True, seed=0, repeat=False):
    """A batched `tf.data.Dataset` of ``(inputs, labels[, weights])``; training
    batches drop the remainder so every step sees `batch_size` examples."""
    import tensorflow as tf

    parts = (inputs, labels) if weights is None else (inputs, labels, weights)
    ds = tf.data.Dataset.from_tensor_slices(parts)
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=shuffle).prefetch(2)


def cls_inputs(token_ids):
    """The encoder's inputs for single-segment `token_ids`."""
    return {"token_ids": token_ids, "segment_ids": np.zeros_like(token_ids)}


def load_tokenizer(folder):
    """The tokenizer of the pretraining run in `folder`."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise RunError(
            f"No finished BERT pretraining run in {folder} (no tokenizer.json). "
            f"Received: pretrained={folder!r}"
        )
    return text_lib.CharTokenizer.load(path)


def load_pretrained_encoder(folder):
    """``(encoder, tokenizer)`` of the finished pretraining run in `folder` (latest checkpoint)."""
    folder = os.path.abspath(os.path.expanduser(folder))
    tokenizer = load_tokenizer(folder)
    path, _ = latest_checkpoint(os.path.join(folder, "checkpoints"))
    if path is None:
        raise RunError(
            f"No checkpoint in {os.path.join(folder, 'checkpoints')}. Received: pretrained={folder!r}"
        )
    pretrainer = keras.models.load_model(path)
    return pretrainer.encoder, tokenizer


class PretrainingData(Data):
    """Masked windows of ``args.dataset``'s text (``--seq-len``, ``--dupe-factor``).

    Attributes:
        tokenizer: Built from the training text.
        train, test: ``(inputs, labels, weights)`` arrays (see `mlm_arrays`).
        test_windows: The held-out windows before masking, int ``(N, seq_len)``.
        baseline: The unigram entropy of the training text (nats per character).
    """

    def __init__(self, args, tokenizer=None):
        self.batch_size = args.batch_size
        train_texts, _ = load_examples(args, "train", PRETRAIN_DATASETS)
        test_texts, _ = load_examples(args, "test", PRETRAIN_DATASETS)
        train_text, test_text = "\n\n".join(train_texts), "\n\n".join(test_texts)
        self.tokenizer = tokenizer or text_lib.CharTokenizer.from_texts([train_text])
        train_ids = self.tokenizer.encode(train_text)
        windows = mlm_windows(train_ids, args.seq_len, self.tokenizer.cls_id)
        self.train = mlm_arrays(windows, self.tokenizer, args.seed, args.dupe_factor)
        self.test_windows = mlm_windows(
            self.tokenizer.encode(test_text), args.seq_len, self.tokenizer.cls_id
        )
        self.test = mlm_arrays(self.test_windows, self.tokenizer, args.seed + 1)
        self.baseline = text_lib.unigram_entropy(train_ids, self.tokenizer.vocab_size)
        self.facts = {
            "unigram_entropy": self.baseline,
            "vocab_size": self.tokenizer.vocab_size,
            "train_windows": len(self.train[1]),
            "test_windows": len(self.test[1]),
        }

    def train_dataset(self, seed, repeat):
        return make_dataset(*self.train, batch_size=self.batch_size, seed=seed, repeat=repeat)

    def test_dataset(self):
        return make_dataset(*self.test, batch_size=self.batch_size, shuffle=False)

    def steps_per_epoch(self):
        return len(self.train[1]) // self.batch_size


class ClassificationData(Data):
    """Labelled texts of ``args.dataset``, cut to ``args.max_length``; validated every epoch.

    Attributes:
        tokenizer: Built from the training texts, unless given (a pretrained run's).
        train, test: ``(inputs, labels)``.
        facts: Classes, sizes, texts cut and the majority-class accuracy.
    """

    validate = True

    def __init__(self, args, tokenizer=None):
        self.batch_size = args.batch_size
        train_texts, train_labels = load_examples(args, "train", CLASSIFY_DATASETS)
        test_texts, test_labels = load_examples(args, "test", CLASSIFY_DATASETS)
        self.tokenizer = tokenizer or text_lib.CharTokenizer.from_texts(train_texts)
        train_ids, train_cut = encode_classification(self.tokenizer, train_texts, args.max_length)
        test_ids, test_cut = encode_classification(self.tokenizer, test_texts, args.max_length)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        majority = float(np.bincount(test_labels, minlength=num_classes).max() / len(test_labels))
        self.facts = {
            "num_classes": num_classes,
            "train_examples": len(train_texts),
            "test_examples": len(test_texts),
            "texts_cut_to_max_length": int(train_cut + test_cut),
            "majority_class_test_accuracy": majority,
        }
        self.train = (cls_inputs(train_ids), train_labels)
        self.test = (cls_inputs(test_ids), test_labels)

    def train_dataset(self, seed, repeat):
        return make_dataset(*self.train, batch_size=self.batch_size, seed=seed, repeat=repeat)

    def test_dataset(self):
        return make_dataset(*self.test, batch_size=self.batch_size, shuffle=False)

    def steps_per_epoch(self):
        return len(self.train[1]) // self.batch_size
