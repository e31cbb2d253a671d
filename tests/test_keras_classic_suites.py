"""Keras's own Attention and AdditiveAttention test files, run on keras_attn's drop-ins.

The files are loaded from the installed keras package at test time (never copied
here), with `keras_attn.LuongAttention` in place of `keras.layers.Attention` and
`keras_attn.AdditiveAttention` (`BahdanauAttention`) in place of
`keras.layers.AdditiveAttention`: the test module's `layers` name is swapped for a
namespace that is Keras's `layers` except for those two classes. Every test runs on the
current backend. `test_the_suites_test_keras_attn` checks that the swap took.
"""

import importlib.util
import pathlib
import types

import keras
import pytest

import keras_attn

pytest.importorskip("absl.testing.parameterized")

SWAPS = {"Attention": keras_attn.LuongAttention, "AdditiveAttention": keras_attn.AdditiveAttention}


def _load(file_name):
    from keras.src import layers as keras_layers

    path = pathlib.Path(keras.__file__).parent / "src" / "layers" / "attention" / file_name
    spec = importlib.util.spec_from_file_location(f"keras_classic_suite_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.layers = types.SimpleNamespace(**{**vars(keras_layers), **SWAPS})
    return module


_attention_suite = _load("attention_test.py")
_additive_suite = _load("additive_attention_test.py")


class TestKerasAttentionTest(_attention_suite.AttentionTest):
    pass


class TestKerasAdditiveAttentionTest(_additive_suite.AdditiveAttentionTest):
    pass


@pytest.mark.parametrize(
    ("suite", "name", "ours"),
    [
        (_attention_suite, "Attention", keras_attn.LuongAttention),
        (_additive_suite, "AdditiveAttention", keras_attn.BahdanauAttention),
    ],
)
def test_the_suites_test_keras_attn(suite, name, ours):
    # The class the loaded test file builds is keras_attn's, not Keras's.
    assert getattr(suite.layers, name) is ours
    assert not issubclass(ours, keras.layers.Attention)
