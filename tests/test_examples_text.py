"""The text pipeline of the examples (examples/common/text.py)."""

import pathlib
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

# examples/ is a folder of the repository, not an installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples.common import text  # noqa: E402

CORPUS = ["The quick brown fox.", "Jumps over the lazy dog!\n"]


def test_vocabulary_is_specials_then_sorted_characters():
    tok = text.CharTokenizer.from_texts(CORPUS)
    chars = sorted(set("".join(CORPUS)))
    assert tok.vocabulary == list(text.SPECIAL_TOKENS) + chars
    assert tok.pad_id == 0 and tok.unk_id == 1 and tok.mask_id == 2
    assert tok.vocab_size == len(text.SPECIAL_TOKENS) + len(chars)


@given(st.text(alphabet="The quickbrownfx.Jmpsvlazydg!\n", max_size=40))
def test_encode_decode_round_trip(s):
    tok = text.CharTokenizer.from_texts(CORPUS)
    ids = tok.encode(s)
    assert ids.dtype == np.int32 and ids.shape == (len(s),)
    assert tok.decode(ids) == s
    assert [tok.vocabulary[i] for i in ids] == list(s)


def test_unknown_characters_map_to_unk_and_specials_are_skipped():
    tok = text.CharTokenizer.from_texts(CORPUS)
    ids = tok.encode("fox€😀")
    assert list(ids[-2:]) == [tok.unk_id, tok.unk_id]
    assert tok.decode(ids) == "fox"
    assert tok.decode(ids, skip_special=False) == "fox[UNK][UNK]"


def test_min_count_and_save_load(tmp_path):
    tok = text.CharTokenizer.from_texts(["aaab"], min_count=2)
    assert "b" not in tok.vocabulary and "a" in tok.vocabulary
    path = tmp_path / "tok.json"
    tok.save(path)
    assert text.CharTokenizer.load(path).vocabulary == tok.vocabulary


def test_lm_windows_are_shifted_by_one():
    ids = np.arange(11, dtype="int32")
    x, y = text.lm_windows(ids, 4)
    np.testing.assert_array_equal(x, [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(y, [[1, 2, 3, 4], [5, 6, 7, 8]])
    x, y = text.lm_windows(ids, 4, stride=3)
    np.testing.assert_array_equal(x[:, 0], [0, 3, 6])
    with pytest.raises(ValueError, match="too few"):
        text.lm_windows(ids[:4], 4)


def test_lm_dataset_batches_and_rejects_too_little_text():
    ds = text.lm_dataset(np.arange(50, dtype="int32"), 4, 3, shuffle=False)
    x, y = next(iter(ds))
    np.testing.assert_array_equal(x.numpy()[1], [4, 5, 6, 7])
    np.testing.assert_array_equal(y.numpy() - x.numpy(), np.ones((3, 4)))
    with pytest.raises(ValueError, match="fewer than one batch"):
        text.lm_dataset(np.arange(10, dtype="int32"), 4, 3)


def test_unigram_entropy_matches_a_hand_computation():
    ids = np.array([0, 0, 1, 2])  # p = 1/2, 1/4, 1/4
    expected = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
    assert text.unigram_entropy(ids, 5) == pytest.approx(expected)
    assert text.unigram_entropy(np.zeros(7, "int32"), 3) == 0.0
