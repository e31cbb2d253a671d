"""`pydoc_text`: the English text of the Python documentation, as a local TFDS dataset.

Every CPython installation ships the text of the language reference's topics in
`pydoc_data.topics.topics` (what ``help("assert")`` prints). This builder turns
it into a TensorFlow Datasets dataset that needs no network, so the text
examples (GPT, BERT) train on real English out of the box.

Features: ``topic`` (the pydoc topic name, text) and ``text`` (its English text).
Splits: ``train`` (72 of the 79 topics of CPython 3.11) and ``test`` (every tenth
topic in name order, 7); the split is fixed, so test text is never trained on.

Importing this module registers the builder with TFDS, so
``tfds.load("pydoc_text", data_dir=...)`` works like any catalog dataset; the
first load builds it in `data_dir` (a second or so, all local).
"""

import tensorflow_datasets as tfds

TEST_EVERY = 10  # topic i goes to the test split when i % TEST_EVERY == TEST_EVERY - 1


def _topics():
    from pydoc_data.topics import topics

    return sorted(topics.items())


def split_of(index):
    """The split (``"train"`` or ``"test"``) of the topic at sorted position `index`."""
    return "test" if index % TEST_EVERY == TEST_EVERY - 1 else "train"


class PydocText(tfds.core.GeneratorBasedBuilder):
    """The Python documentation topics (`pydoc_data`) as an English text corpus."""

    name = "pydoc_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Topics of pydoc_data, one example per topic."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {"topic": tfds.features.Text(), "text": tfds.features.Text()}
            ),
            supervised_keys=None,
            homepage="https://docs.python.org/3/library/pydoc.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split):
        for index, (topic, text) in enumerate(_topics()):
            if split_of(index) == split:
                yield topic, {"topic": topic, "text": text}
