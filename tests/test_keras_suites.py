"""Keras's own attention test files, run on keras_attn's drop-ins.

The files are loaded from the installed keras package at test time (never copied
here), with keras_attn's `MultiHeadAttention` and `GroupedQueryAttention` in place of
Keras's: the test module's `layers` name is swapped for a namespace that is Keras's
`layers` except for those two classes. Every test runs on the current backend.

Every test of those files passes as it is: `EXPECTED_DIFFERENCES` is empty. It is the
one place for a test that keras_attn fails on purpose (where it deliberately differs
from Keras, as listed in the README): the test named there is marked xfail, strict (a
mark that stops failing is noticed), with the reason in one line, and a name that is no
test of the file is an error, so a renamed Keras test cannot leave a mark that marks
nothing.
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

# file name -> {test name -> why keras_attn differs on purpose}; none today.
EXPECTED_DIFFERENCES = {file_name: {} for file_name in SUITES}


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
    tests = {name for name in dir(base) if name.startswith("test")}
    unknown = set(EXPECTED_DIFFERENCES.get(file_name, {})) - tests
    if unknown:
        raise ValueError(
            f"EXPECTED_DIFFERENCES names tests that {file_name} does not have: "
            f"{sorted(unknown)}. Expected names among: {sorted(tests)}"
        )
    marked = {
        name: pytest.mark.xfail(reason=reason, strict=True)(getattr(base, name))
        for name, reason in EXPECTED_DIFFERENCES.get(file_name, {}).items()
    }
    return type(f"TestKeras{class_name}", (base,), marked)


TestKerasMultiHeadAttentionTest = _suite("multi_head_attention_test.py", "MultiHeadAttentionTest")
TestKerasGroupedQueryAttentionTest = _suite(
    "grouped_query_attention_test.py", "GroupedQueryAttentionTest"
)
