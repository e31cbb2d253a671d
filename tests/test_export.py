"""Models of keras_attn layers exported with `model.export` give Keras's numbers where served.

Each model is exported to each format Keras exports from the current backend,
reloaded in the runtime that serves that format (``tf.saved_model.load``,
onnxruntime, the LiteRT interpreter of ai-edge-litert) and run there; its outputs
must equal ``model.predict``'s to float32 rounding, and, where Keras has the layer
(``keras.layers.MultiHeadAttention``, the GPT example on it), Keras's own model's.
A combination Keras does not export is skipped with Keras's reason. The export
packages come with the ``tests`` extra (``make test`` installs them).
"""

import functools
import importlib.util
import pathlib
import sys

import keras
import numpy as np
import pytest

import keras_attn

# examples/ is a folder of the repository, not an installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples import gpt  # noqa: E402

B, T, DIM = 2, 16, 32
BACKEND = keras.backend.backend()
FORMATS = ("tf_saved_model", "onnx", "litert")
ATOL = 1e-5


def keras_does_not_export(fmt):
    """Why Keras 3 exports no `fmt` from this backend (None where it does)."""
    if fmt == "litert" and BACKEND == "jax":
        return "Keras exports LiteRT from TensorFlow and PyTorch only (model.export raises on JAX)"
    if fmt == "tf_saved_model" and BACKEND == "torch" and not importlib.util.find_spec("torch_xla"):
        return (
            "Keras exports a SavedModel from PyTorch through torch_xla, which has no build "
            "for this torch"
        )
    if fmt == "litert" and BACKEND == "torch" and not importlib.util.find_spec("litert_torch"):
        return (
            "Keras exports LiteRT from PyTorch through litert-torch, which is not in the "
            "tests extra (its xdsl pins typing-extensions<4.13, below selenium's and chex's)"
        )
    return None


# -- the models ----------------------------------------------------------------------


def _inputs(seed=0):
    return np.random.default_rng(seed).normal(size=(B, T, DIM)).astype("float32")


def _self_attention_model(layer, **call_kwargs):
    x = keras.Input((T, DIM), name="x")
    return keras.Model(x, layer(x, x, **call_kwargs))


def _keras_mha():
    layer = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8, name="mha")
    return _self_attention_model(layer, use_causal_mask=True)


def mha_causal():
    """The MultiHeadAttention drop-in, causal; Keras's layer holds the same weights."""
    model = _self_attention_model(
        keras_attn.MultiHeadAttention(num_heads=4, key_dim=8, name="mha"), use_causal_mask=True
    )
    reference = _keras_mha()
    reference.set_weights(model.get_weights())
    return model, _inputs(), reference, None


def local_block_sparse():
    """A two-sided sliding window on the block-sparse path."""
    layer = keras_attn.LocalAttention(
        window=3, num_heads=4, key_dim=8, block_sparse=True, block_size=4, name="local"
    )
    return _self_attention_model(layer), _inputs(), None, (layer, "block_sparse")


def plugin_bigbird():
    """The bigbird plugin's pattern (window, global and random blocks), block-sparse."""
    bigbird = pytest.importorskip("keras_attn_bigbird")
    pattern = bigbird.BigBird(
        block_size=4, num_window_blocks=1, num_global_blocks=1, num_random_blocks=1, seed=3
    )
    layer = keras_attn.Attention(
        num_heads=4, key_dim=8, pattern=pattern, block_sparse=True, block_size=4, name="bigbird"
    )
    return _self_attention_model(layer), _inputs(), None, (layer, "block_sparse")


def rope_gqa():
    """Self-attention with rotary positions and grouped-query heads (4 query, 2 key/value)."""
    layer = keras_attn.SelfAttention(
        num_heads=4, num_key_value_heads=2, key_dim=8, position_encoding="rope", name="rope"
    )
    x = keras.Input((T, DIM), name="x")
    return keras.Model(x, layer(x, use_causal_mask=True)), _inputs(), None, None


def segment_ids():
    """Packed rows: segment ids as a second (int) input, positions restarting per segment."""
    layer = keras_attn.SelfAttention(
        num_heads=4, key_dim=8, position_encoding="rope", reset_positions=True, name="packed"
    )
    x = keras.Input((T, DIM), name="x")
    ids = keras.Input((T,), dtype="int32", name="segment_ids")
    model = keras.Model([x, ids], layer(x, use_causal_mask=True, segment_ids=ids))
    packed = np.repeat(np.array([[0, 0, 1, 1], [0, 1, 2, 2]], "int32"), T // 4, axis=1)
    return model, [_inputs(), packed], None, None


def gpt_example():
    """The GPT example's model (tiny), and the same model on Keras's MultiHeadAttention."""
    sizes = dict(num_layers=2, num_heads=2, hidden_dim=DIM, name="gpt")
    model = gpt.build_gpt(64, T, **sizes)
    reference = gpt.build_gpt(64, T, attention={"layer": "keras"}, **sizes)
    reference.set_weights(model.get_weights())
    ids = np.random.default_rng(1).integers(0, 64, size=(B, T)).astype("int32")
    return model, ids, reference, None


CASES = {
    f.__name__: f
    for f in (mha_causal, local_block_sparse, plugin_bigbird, rope_gqa, segment_ids, gpt_example)
}


@functools.cache
def prepared(case):
    """``(model, inputs, expected, keras_expected)`` of a case, built once per module."""
    keras.utils.set_random_seed(0)
    model, inputs, reference, path = CASES[case]()
    expected = model.predict(inputs, verbose=0)
    if path is not None:
        layer, name = path
        assert layer.last_path == name, (case, layer.last_path)
    keras_expected = None if reference is None else reference.predict(inputs, verbose=0)
    return model, inputs, expected, keras_expected


# -- export and serve ----------------------------------------------------------------


def _input_signature(inputs):
    # PyTorch's ONNX exporter takes fixed shapes (Keras's docs); elsewhere the batch
    # stays free, as a served model's is.
    batch = B if BACKEND == "torch" else None
    specs = [
        keras.InputSpec(shape=(batch, *x.shape[1:]), dtype=str(x.dtype))
        for x in (inputs if isinstance(inputs, list) else [inputs])
    ]
    return [specs] if isinstance(inputs, list) else specs


def export(model, inputs, fmt, directory):
    path = (
        directory / {"tf_saved_model": "model", "onnx": "model.onnx", "litert": "model.tflite"}[fmt]
    )
    model.export(str(path), format=fmt, input_signature=_input_signature(inputs), verbose=False)
    return path


def serve(path, fmt, inputs):
    """Run the exported artifact in its own runtime on `inputs` (an array or a list)."""
    flat = inputs if isinstance(inputs, list) else [inputs]
    if fmt == "tf_saved_model":
        import tensorflow as tf

        artifact = tf.saved_model.load(str(path))
        return np.asarray(artifact.serve(inputs if isinstance(inputs, list) else inputs))
    if fmt == "onnx":
        onnxruntime = pytest.importorskip("onnxruntime")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        assert len(names) == len(flat), names
        return session.run(None, dict(zip(names, flat, strict=True)))[0]
    interpreter = pytest.importorskip("ai_edge_litert.interpreter")
    runner = interpreter.Interpreter(model_path=str(path)).get_signature_runner()
    names = list(runner.get_input_details())
    assert len(names) == len(flat), names
    outputs = runner(**dict(zip(names, flat, strict=True)))
    (output,) = outputs.values()
    return output


# Failures of Keras's own exporters, each recognised by its error and shown on a model
# of Keras's layers alone (its witness): once the witness exports, the case must too.
KERAS_EXPORT_BUGS = (
    (
        "tensorflow",
        "onnx",
        "No Op registered for Erfc",
        "tf2onnx converts no Erfc, which TensorFlow's exact gelu (keras.activations.gelu, "
        "the GPT example's MLP) uses: Keras's own Dense(activation='gelu') fails alike",
        lambda: keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(4, activation="gelu")]),
        np.ones((B, DIM), "float32"),
    ),
)


def keras_bug_behind(error, fmt, tmp_path):
    """The reason of the `KERAS_EXPORT_BUGS` entry `error` comes from, if its witness fails."""
    for backend, bug_fmt, message, reason, witness, inputs in KERAS_EXPORT_BUGS:
        if (backend, bug_fmt) != (BACKEND, fmt) or message not in str(error):
            continue
        directory = tmp_path / "witness"
        directory.mkdir()
        try:
            serve(export(witness(), inputs, fmt, directory), fmt, inputs)
        except Exception as witness_error:
            if message in str(witness_error):
                return reason
    return None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_export_serves_keras_numbers(case, fmt, tmp_path):
    reason = keras_does_not_export(fmt)
    if reason:
        pytest.skip(reason)
    model, inputs, expected, keras_expected = prepared(case)
    try:
        served = serve(export(model, inputs, fmt, tmp_path), fmt, inputs)
    except Exception as error:
        reason = keras_bug_behind(error, fmt, tmp_path)
        if reason is None:
            raise
        pytest.skip(reason)
    np.testing.assert_allclose(served, expected, atol=ATOL, rtol=ATOL)
    if keras_expected is not None:
        np.testing.assert_allclose(served, keras_expected, atol=ATOL, rtol=ATOL)
