"""Datasets of the examples (examples/datasets): names, data dirs, the embedded pydoc_text."""

import pathlib
import sys

import pytest
import tensorflow_datasets as tfds

# examples/ is a folder of the repository, not an installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples import datasets  # noqa: E402
from examples.datasets import pydoc_text  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def texts(ds):
    return {x["topic"].decode(): x["text"].decode() for x in ds.as_numpy_iterator()}


def test_pydoc_text_holds_the_python_docs_split_by_topic(data_dir):
    from pydoc_data.topics import topics

    train = texts(datasets.load("pydoc_text", "train", data_dir=data_dir, download=False))
    test = texts(datasets.load("pydoc_text", "test", data_dir=data_dir))
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(topics)
    assert all(text == topics[name] for name, text in {**train, **test}.items())
    names = sorted(topics)
    assert sorted(test) == [n for i, n in enumerate(names) if i % 10 == 9]
    assert "assert" in train and "statement" in train["assert"]


def test_unknown_names_list_the_choices():
    with pytest.raises(datasets.DatasetError, match="'pydoc_text', 'tiny_shakespeare'"):
        datasets.load("shakespeare_typo", "train", allowed=("pydoc_text", "tiny_shakespeare"))


def test_a_data_dir_without_the_data_is_a_clear_error(tmp_path):
    with pytest.raises(datasets.DatasetError, match="No data for dataset 'tiny_shakespeare'"):
        datasets.load("tiny_shakespeare", "train", data_dir=str(tmp_path), download=False)


def test_catalog_datasets_load_through_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=3):
        ds = datasets.load("tiny_shakespeare", "train", data_dir=str(tmp_path), download=False)
        examples = list(ds.as_numpy_iterator())
    assert len(examples) == 3 and all(isinstance(x["text"], bytes) for x in examples)


def test_split_of():
    assert [pydoc_text.split_of(i) for i in (0, 8, 9, 19)] == ["train", "train", "test", "test"]
