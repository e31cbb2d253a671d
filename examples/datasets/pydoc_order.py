"""`pydoc_order`: is this passage of the Python docs in its original word order?

A labelled text-classification task built from real English on the machine, for
the BERT example's offline fine-tuning. The prose of the Python documentation
topics in `pydoc_data` (code and grammar blocks, which pydoc indents, are left
out) is cut into passages of consecutive words, at most `MAX_CHARS` characters
and at least `MIN_WORDS` words. Each passage appears once: as written (label
``original``) or with its words shuffled into another order (label ``shuffled``),
chosen at random with a fixed seed, about half each. Both versions have the same
characters, so a model that ignores order scores 50%; telling them apart needs
word order (capitals, punctuation and phrases in the wrong places).

Splits: every `TEST_EVERY`-th passage goes to ``test`` (about 420), the rest to
``train`` (about 1,680). Test passages are text never trained on, but come from
the same topics as the training passages.

Features: ``text``, ``label`` (``shuffled`` = 0, ``original`` = 1), ``topic``.
"""

import re

import numpy as np
import tensorflow_datasets as tfds

NAME = "pydoc_order"
MAX_CHARS = 120
MIN_WORDS = 6
TEST_EVERY = 5
SEED = 0
LABELS = ("shuffled", "original")


def prose_passages(topics, max_chars=MAX_CHARS, min_words=MIN_WORDS):
    """``(topic, passage)`` pairs of the prose of `topics` (``{name: text}``), in order.

    Paragraphs with an indented line (code, grammar, tables) are skipped; the
    words of the rest are packed greedily into passages of at most `max_chars`.
    """
    passages = []
    for topic, text in sorted(topics.items()):
        for paragraph in re.split(r"\n\s*\n", text):
            lines = paragraph.split("\n")
            if any(line.startswith(" ") for line in lines):
                continue
            words = " ".join(line.strip() for line in lines).split()
            current = []
            for word in words:
                if current and len(" ".join([*current, word])) > max_chars:
                    if len(current) >= min_words:
                        passages.append((topic, " ".join(current)))
                    current = []
                current.append(word)
            if len(current) >= min_words and len(" ".join(current)) <= max_chars:
                passages.append((topic, " ".join(current)))
    return passages


def shuffle_words(passage, rng):
    """`passage` with its words in a different order (never the original one)."""
    words = passage.split()
    if len(set(words)) < 2:
        raise ValueError(f"Cannot reorder a passage of one repeated word. Received: {passage!r}")
    while True:
        order = rng.permutation(len(words))
        shuffled = [words[i] for i in order]
        if shuffled != words:
            return " ".join(shuffled)


def examples(topics, seed=SEED):
    """Every example as ``(split, topic, text, label)``, deterministic for a given `seed`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (topic, passage) in enumerate(prose_passages(topics)):
        label = int(rng.integers(2))
        text = passage if LABELS[label] == "original" else shuffle_words(passage, rng)
        split = "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"
        rows.append((split, topic, text, label))
    return rows


class PydocOrder(tfds.core.GeneratorBasedBuilder):
    """Original vs word-shuffled passages of the Python documentation (`pydoc_data`)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Passages of <= 120 characters; every fifth one in test."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(LABELS)),
                    "topic": tfds.features.Text(),
                }
            ),
            supervised_keys=("text", "label"),
            homepage="https://docs.python.org/3/library/pydoc.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        from pydoc_data.topics import topics

        rows = examples(topics)
        return {split: self._generate_examples(rows, split) for split in ("train", "test")}

    def _generate_examples(self, rows, split):
        for i, (row_split, topic, text, label) in enumerate(rows):
            if row_split == split:
                yield i, {"text": text, "label": label, "topic": topic}
