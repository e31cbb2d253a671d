"""Keras's own attention test files, run on keras_attn's drop-ins.

The files are loaded from the installed keras package at test time (never copied
here), with keras_attn's `MultiHeadAttention` and `GroupedQueryAttention` in place of
Keras's: the test module's `layers` name is swapped for a namespace that is Keras's
`layers` except for those two classes. Every test runs on the current backend.

Expected differences, each where keras_attn is deliberately better, are marked xfail
(strict, so a mark that stops failing is noticed) with the reason in one line; the
README lists the same.
"""

import importlib.util
import pathlib
import types

import keras
import pytest

import keras_attn

pytest.importorskip("absl.testing.parameterized")

SUITES = {
    "multi_head_attention_test.py": "MultiHeadAttentionTest",
    "grouped_query_attention_test.py": "GroupedQueryAttentionTest",
}

# test name -> why keras_attn differs on purpose.
EXPECTED_DIFFERENCES = {}


def _load(file_name):
    from keras.src import layers as keras_layers

    path = pathlib.Path(keras.__file__).parent / "src" / "layers" / "attention" / file_name
    spec = importlib.util.spec_from_file_location(f"keras_suite_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    swapped = types.SimpleNamespace(**vars(keras_layers))
    swapped.MultiHeadAttention = keras_attn.MultiHeadAttention
    swapped.GroupedQueryAttention = keras_attn.GroupedQueryAttention
    module.layers = swapped
    return module


def _suite(file_name, class_name):
    base = getattr(_load(file_name), class_name)
    marked = {}
    for name in dir(base):
        if name in EXPECTED_DIFFERENCES:
            reason = EXPECTED_DIFFERENCES[name]
            marked[name] = pytest.mark.xfail(reason=reason, strict=True)(getattr(base, name))
    return type(f"TestKeras{class_name}", (base,), marked)


TestKerasMultiHeadAttentionTest = _suite("multi_head_attention_test.py", "MultiHeadAttentionTest")
TestKerasGroupedQueryAttentionTest = _suite(
    "grouped_query_attention_test.py", "GroupedQueryAttentionTest"
)
