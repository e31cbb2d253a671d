"""Text pipeline shared by the text examples (GPT, BERT): a character tokenizer and LM windows.

`CharTokenizer` maps each character of the training text to an id. Its vocabulary
is built from the data (`CharTokenizer.from_texts`), starts with special tokens,
and is saved next to a model as JSON (`save` / `load`) so generation decodes with
the vocabulary the model was trained on. Characters not in the vocabulary map to
``[UNK]``.

    tok = CharTokenizer.from_texts(texts)                  # ids 0..3: [PAD] [UNK] [MASK] [CLS]...
    ids = tok.encode("def f(x):")                          # np.int32 (T,)
    tok.decode(ids) == "def f(x):"

`read_texts(ds, key="text")` pulls a TFDS split into Python strings (sorted by
topic where there is one, so runs are reproducible); `lm_windows` and
`lm_dataset` cut a token stream into next-token-prediction pairs.
"""

import json

import numpy as np

PAD, UNK, MASK, CLS, SEP = "[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = (PAD, UNK, MASK, CLS, SEP)


class CharTokenizer:
    """Character-level tokenizer with special tokens first.

    Args:
        vocabulary: Sequence of tokens; the special tokens (strings in brackets)
            come first, then single characters. Id of a token = its index.

    Attributes:
        vocab_size: Number of tokens.
        pad_id, unk_id, mask_id, cls_id, sep_id: Ids of the special tokens
            (``None`` where the vocabulary lacks one).
    """

    def __init__(self, vocabulary):
        vocabulary = list(vocabulary)
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError(
                "The vocabulary has duplicate tokens. Received: vocabulary with duplicates"
            )
        if UNK not in vocabulary:
            raise ValueError(f"The vocabulary must contain {UNK}. Received: {vocabulary[:8]}...")
        self.vocabulary = vocabulary
        self._ids = {t: i for i, t in enumerate(vocabulary)}
        self.pad_id = self._ids.get(PAD)
        self.unk_id = self._ids[UNK]
        self.mask_id = self._ids.get(MASK)
        self.cls_id = self._ids.get(CLS)
        self.sep_id = self._ids.get(SEP)
        self.special_ids = frozenset(self._ids[t] for t in vocabulary if t in SPECIAL_TOKENS)
        lookup = np.full(max(map(ord, vocabulary_chars(vocabulary)), default=0) + 1, self.unk_id)
        for t, i in self._ids.items():
            if t not in SPECIAL_TOKENS:
                lookup[ord(t)] = i
        self._lookup = lookup.astype("int32")

    @classmethod
    def from_texts(cls, texts, special_tokens=SPECIAL_TOKENS, min_count=1):
        """Build the vocabulary from the characters of `texts` (sorted, for determinism).

        Args:
            texts: Iterable of strings.
            special_tokens: Tokens placed first (``[PAD]`` gets id 0).
            min_count: Characters seen fewer times map to ``[UNK]``.
        """
        counts = {}
        for text in texts:
            for ch in text:
                counts[ch] = counts.get(ch, 0) + 1
        chars = sorted(ch for ch, n in counts.items() if n >= min_count)
        specials = list(special_tokens)
        if UNK not in specials:
            specials.append(UNK)
        return cls(specials + chars)

    @property
    def vocab_size(self):
        return len(self.vocabulary)

    def encode(self, text):
        """`text` as ids, ``np.int32 (T,)``."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype("int64")
        ids = np.full(codes.shape, self.unk_id, dtype="int32")
        known = codes < len(self._lookup)
        ids[known] = self._lookup[codes[known]]
        return ids

    def decode(self, ids, skip_special=True):
        """Ids back to text; special tokens are dropped unless `skip_special` is False."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if skip_special and i in self.special_ids:
                continue
            out.append(
                self.vocabulary[i]
                if 0 <= i < len(self.vocabulary)
                else self.vocabulary[self.unk_id]
            )
        return "".join(out)

    def tokens(self, ids):
        """One printable string per id (for heatmap axes)."""
        names = {"\n": "\\n", " ": "␣", "\t": "\\t"}
        return [names.get(self.vocabulary[i], self.vocabulary[i]) for i in np.asarray(ids).tolist()]

    def get_config(self):
        return {"vocabulary": self.vocabulary}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.get_config(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_config(json.load(f))


def vocabulary_chars(vocabulary):
    return [t for t in vocabulary if t not in SPECIAL_TOKENS and len(t) == 1]


def read_texts(ds, key="text", order_key="topic"):
    """The strings of feature `key` of a TFDS dataset, sorted by `order_key` if present."""
    rows = []
    for example in ds.as_numpy_iterator():
        text = example[key].decode("utf-8")
        order = example[order_key].decode("utf-8") if order_key in example else len(rows)
        rows.append((order, text))
    if rows and all(isinstance(o, str) for o, _ in rows):
        rows.sort()
    return [text for _, text in rows]


def unigram_entropy(ids, vocab_size):
    """Entropy (nats per token) of the token frequencies of `ids`: the loss of a
    model that ignores context, the baseline a language model must beat."""
    counts = np.bincount(np.asarray(ids).reshape(-1), minlength=vocab_size).astype("float64")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def lm_windows(ids, length, stride=None):
    """Cut a token stream into ``(inputs, targets)`` of shape ``(N, length)``;
    targets are inputs shifted by one token. Windows start every `stride` tokens
    (default `length`, no overlap)."""
    ids = np.asarray(ids, dtype="int32")
    stride = stride or length
    if len(ids) < length + 1:
        raise ValueError(
            f"The text has {len(ids)} tokens, too few for one window of length {length}. "
            f"Received: length={length}"
        )
    starts = np.arange(0, len(ids) - length, stride)
    index = starts[:, None] + np.arange(length + 1)[None, :]  # (N, length + 1)
    windows = ids[index]
    return windows[:, :-1], windows[:, 1:]


def lm_dataset(ids, length, batch_size, shuffle=True, seed=0, stride=None, repeat=False):
    """A `tf.data.Dataset` of ``(inputs, targets)`` batches (int32 ``(B, length)``),
    last partial batch dropped so every step sees `batch_size` sequences."""
    import tensorflow as tf

    x, y = lm_windows(ids, length, stride)
    if len(x) < batch_size:
        raise ValueError(
            f"The text makes {len(x)} windows of length {length}, fewer than one batch. "
            f"Use a smaller --batch-size or --seq-len. Received: batch_size={batch_size}"
        )
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)
