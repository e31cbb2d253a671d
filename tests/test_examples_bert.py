"""The BERT example: models, masking, data, the command line and its errors."""

import json
import os
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given
from hypothesis import strategies as st

import keras_attn

# The examples are not an installed package: import them from the checkout.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples import bert  # noqa: E402
from examples import datasets  # noqa: E402
from examples.bert import __main__ as bert_cli  # noqa: E402
from examples.bert import data as bert_data  # noqa: E402
from examples.common import text as text_lib  # noqa: E402
from examples.datasets import pydoc_order  # noqa: E402

TINY = dict(num_layers=2, num_heads=2, hidden_dim=16)
TINY_FLAGS = ["--num-layers", "1", "--num-heads", "2", "--hidden-dim", "16", "--verbose", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data dir holding the embedded text datasets, built locally from pydoc_data."""
    path = str(tmp_path_factory.mktemp("tfds"))
    for name in ("pydoc_text", "pydoc_order"):
        datasets.load(name, "test", data_dir=path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from pydoc_data.topics import topics

    return text_lib.CharTokenizer.from_texts(topics.values())


def _tokens(vocab_size, shape, seed=0, pad_from=None):
    ids = np.random.default_rng(seed).integers(5, vocab_size, shape).astype("int32")
    if pad_from is not None:
        ids[-1, pad_from:] = 0
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids)}


def _outputs(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs, training=False))


# -- models -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attention, cls",
    [
        (None, keras_attn.Attention),
        ({"layer": "hard"}, keras_attn.HardAttention),
        ({"layer": "self", "score": "cosine"}, keras_attn.SelfAttention),
    ],
)
def test_classifier_saves_and_loads_with_identical_outputs(tmp_path, attention, cls):
    model = bert.build_bert(40, 12, num_classes=3, attention=attention, **TINY)
    inputs = _tokens(40, (3, 10), pad_from=6)
    path = str(tmp_path / "bert.keras")
    model.save(path)
    assert os.path.getsize(path) > 0
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(_outputs(loaded, inputs), _outputs(model, inputs))
    assert type(loaded) is bert.BertClassifier and type(loaded.encoder) is bert.BertEncoder
    assert type(loaded.encoder.blocks[0].attention) is cls


def test_pretrainer_saves_and_loads_with_identical_outputs(tmp_path):
    model = bert.build_bert(40, 12, **TINY)
    inputs = {**_tokens(40, (2, 12)), "mask_positions": np.array([[1, 5], [2, 0]], "int32")}
    assert _outputs(model, inputs).shape == (2, 2, 40)
    model.save(tmp_path / "mlm.keras")
    loaded = keras.models.load_model(tmp_path / "mlm.keras")
    np.testing.assert_array_equal(_outputs(loaded, inputs), _outputs(model, inputs))


@pytest.mark.parametrize("num_classes", [None, 3])
def test_matches_keras_multi_head_attention_with_the_same_weights(num_classes):
    """keras.layers.MultiHeadAttention, an independent implementation, is the reference."""
    reference = bert.build_bert(
        40, 12, num_classes=num_classes, attention={"layer": "keras"}, **TINY
    )
    ours = bert.build_bert(40, 12, num_classes=num_classes, **TINY)
    ours.set_weights(reference.get_weights())
    inputs = _tokens(40, (3, 12), pad_from=5)
    if num_classes is None:
        inputs["mask_positions"] = np.array([[1, 2], [3, 4], [0, 4]], "int32")
    np.testing.assert_allclose(_outputs(ours, inputs), _outputs(reference, inputs), atol=1e-5)


def test_padding_keys_get_no_attention():
    """Appending padding changes nothing at the real positions."""
    encoder = bert.build_bert_encoder(40, 16, **TINY)
    short = _tokens(40, (2, 7), seed=3)
    padded = {k: np.pad(v, ((0, 0), (0, 5))) for k, v in short.items()}
    np.testing.assert_allclose(
        _outputs(encoder, padded)[:, :7], _outputs(encoder, short), rtol=1e-5, atol=1e-5
    )
    # ...while a real token in those places does change them.
    other = {k: v.copy() for k, v in padded.items()}
    other["token_ids"][:, 7:] = 9
    assert np.abs(_outputs(encoder, other)[:, :7] - _outputs(encoder, short)).max() > 1e-3


def test_classifier_reuses_the_pretrained_encoder_weights():
    encoder = bert.build_bert_encoder(40, 12, **TINY)
    pretrainer = bert.build_bert_pretrainer(encoder)
    classifier = bert.build_bert_classifier(encoder, 2)
    assert classifier.encoder is pretrainer.encoder is encoder
    assert classifier.encoder.blocks[0] is encoder.blocks[0]


def test_sequence_longer_than_max_length_is_a_clear_error():
    model = bert.build_bert(40, 8, num_classes=2, **TINY)
    with pytest.raises(ValueError, match="max_length=8"):
        model(_tokens(40, (1, 9)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_layers=0), "num_layers=0"),
        (dict(hidden_dim=10, num_heads=4), "divisible by `num_heads`"),
        (dict(attention={"layer": "no_such_layer"}), "no_such_layer"),
        (dict(attention={"normalizer": "no_such_normalizer"}), "Registered normalizers"),
    ],
)
def test_bad_model_arguments_fail_early(kwargs, match):
    with pytest.raises((ValueError, keras_attn.PluginError), match=match):
        bert.build_bert(40, 8, **{**TINY, **kwargs})


# -- masking and encoding -----------------------------------------------------------------


@given(
    rows=st.integers(1, 4),
    length=st.integers(2, 40),
    seed=st.integers(0, 2**16),
)
def test_mask_tokens_follows_bert_recipe(tokenizer, rows, length, seed):
    ids = bert_data.mlm_windows(np.arange(rows * (length - 1)) % 50 + 5, length, tokenizer.cls_id)
    out = bert_data.mask_tokens(ids, np.random.default_rng(seed), tokenizer)
    p = int(np.ceil(0.15 * length))
    assert out["mask_positions"].shape == out["labels"].shape == (rows, p)
    for row in range(rows):
        count = int(out["weights"][row].sum())
        chosen = out["mask_positions"][row, :count]
        assert count == min(p, max(1, round(0.15 * (length - 1))))
        assert np.all(np.diff(chosen) > 0) and np.all(chosen >= 1)  # never [CLS]
        np.testing.assert_array_equal(out["labels"][row, :count], ids[row, chosen])
        untouched = np.setdiff1d(np.arange(length), chosen)
        np.testing.assert_array_equal(out["token_ids"][row, untouched], ids[row, untouched])
        assert not np.any(out["weights"][row, count:])


def test_mask_tokens_replacement_rates(tokenizer):
    ids = bert_data.mlm_windows(np.arange(400 * 99) % 80 + 5, 100, tokenizer.cls_id)
    out = bert_data.mask_tokens(ids, np.random.default_rng(0), tokenizer)
    rows = np.arange(len(ids))[:, None]
    at_positions = out["token_ids"][rows, out["mask_positions"]]
    masked = np.mean(at_positions == tokenizer.mask_id)
    kept = np.mean(at_positions == out["labels"])
    assert abs(masked - 0.8) < 0.02 and 0.09 < kept < 0.13  # random draws may also keep
    assert not np.isin(at_positions, [tokenizer.pad_id, tokenizer.cls_id, tokenizer.unk_id]).any()


def test_encode_classification_cuts_and_pads(tokenizer):
    ids, cut = bert_data.encode_classification(tokenizer, ["abc", "x" * 20], 8)
    assert cut == 1
    np.testing.assert_array_equal(ids[0], [tokenizer.cls_id, *tokenizer.encode("abc"), 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[1, 1:], tokenizer.encode("x" * 7))


def test_pydoc_order_is_balanced_and_reorders_only_words(data_dir):
    from pydoc_data.topics import topics

    rows = pydoc_order.examples(topics)
    passages = [p for _, p in pydoc_order.prose_passages(topics)]
    labels = np.array([label for *_, label in rows])
    assert len(rows) > 1500 and 0.45 < labels.mean() < 0.55
    for (_, _, text, label), passage in zip(rows, passages, strict=True):
        assert sorted(text.split()) == sorted(passage.split())
        assert (text == passage) == (label == 1)
    test = datasets.load("pydoc_order", "test", data_dir=data_dir)
    assert len(test) == sum(split == "test" for split, *_ in rows)


# -- training -------------------------------------------------------------------------------


def _pydoc_windows(data_dir, tokenizer, length, count):
    ds = datasets.load("pydoc_text", "train", data_dir=data_dir)
    ids = tokenizer.encode("\n\n".join(text_lib.read_texts(ds)))
    return bert_data.mlm_windows(ids, length, tokenizer.cls_id)[:count]


def test_short_pretraining_reduces_masked_token_loss_on_pydoc_text(data_dir, tokenizer):
    windows = _pydoc_windows(data_dir, tokenizer, 32, 256)
    x, y, w = bert_data.mlm_arrays(windows, tokenizer, seed=0)
    model = bert.compile_bert(
        bert.build_bert(tokenizer.vocab_size, 32, dropout=0.0, **TINY), learning_rate=3e-3
    )
    before = model.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)["loss"]
    model.fit(x, y, sample_weight=w, batch_size=32, epochs=3, verbose=0)
    after = model.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)["loss"]
    assert after < 0.8 * before, (before, after)


def test_short_finetuning_reduces_loss_on_pydoc_order(data_dir, tokenizer):
    ds = datasets.load("pydoc_order", "train[:64]", data_dir=data_dir)
    rows = list(ds.as_numpy_iterator())
    ids, _ = bert_data.encode_classification(tokenizer, [r["text"].decode() for r in rows], 64)
    x, y = bert_data.cls_inputs(ids), np.array([r["label"] for r in rows])
    model = bert.compile_bert(
        bert.build_bert(tokenizer.vocab_size, 64, num_classes=2, dropout=0.0, **TINY), 3e-3
    )
    before = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    model.fit(x, y, batch_size=16, epochs=8, verbose=0)
    after = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert after < 0.8 * before, (before, after)


# -- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """One finished `pretrain` run (hard attention, max_length 48) and its metrics, shared
    by the tests that fine-tune from it."""
    out = tmp_path_factory.mktemp("pretrained") / "pre"
    metrics = bert_cli.main(
        ["pretrain", "--data-dir", data_dir, "--epochs", "1", "--steps", "2", *TINY_FLAGS]
        + ["--output", str(out), "--seq-len", "32", "--max-length", "48", "--layer", "hard"]
    )
    return out, metrics


def test_pretrain_then_finetune_from_the_command_line(pretrained, data_dir, tmp_path):
    pre, metrics = pretrained
    fine = tmp_path / "fine"
    assert np.isfinite(metrics["test_loss"])
    for item in ("metrics.json", "run.json", "tokenizer.json", "checkpoints/epoch-0001.keras"):
        assert (pre / item).exists(), item
    assert json.loads((pre / "run.json").read_text())["status"] == "finished"
    assert len(list((pre / "attention").glob("*.png"))) == 2  # 1 block, 2 examples
    loaded = keras.models.load_model(pre / "checkpoints/epoch-0001.keras")
    assert isinstance(loaded.encoder.blocks[0].attention, keras_attn.HardAttention)

    common = ["--data-dir", data_dir, "--epochs", "1", "--steps", "2", *TINY_FLAGS]
    metrics = bert_cli.main(
        ["finetune", *common, "--output", str(fine), "--pretrained", str(pre), "--batch-size", "8"]
    )
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["num_classes"] == 2
    run = json.loads((fine / "run.json").read_text())
    assert run["status"] == "finished" and run["pretrained"] == str(pre)
    # The run records the model that ran: the pretrained encoder's sizes and attention.
    assert run["args"]["max_length"] == 48 and run["args"]["hidden_dim"] == 16
    assert run["attention"]["layer"] == "hard"


def test_finetune_pretrained_takes_the_encoders_sizes_and_rejects_others(
    pretrained, tmp_path, capsys
):
    pre, _ = pretrained
    fine = ["finetune", "--pretrained", str(pre), "--output", str(tmp_path / "fine")]
    _fails([*fine, "--hidden-dim", "32"], capsys, "--hidden-dim 32 differs from the pretrained")
    _fails([*fine, "--max-length", "64"], capsys, "max_length=48")
    _fails([*fine, "--layer", "attention"], capsys, "--layer attention differs")
    assert not os.path.exists(tmp_path / "fine.partial")
    args = bert_cli.make_parser().parse_args(fine)
    bert_cli.take_from_pretrained(args)
    assert (args.max_length, args.num_layers, args.num_heads, args.hidden_dim) == (48, 1, 2, 16)
    assert args.layer == "hard" and args.score_mods == []


@pytest.mark.parametrize("name, split", [("imdb_reviews", "test"), ("glue/sst2", "validation")])
def test_tfds_catalog_datasets_by_name(tmp_path, name, split):
    """The catalog datasets go through tfds.load; mock_data stands in for the download."""
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path / "mock")):
        args = bert_cli.make_parser().parse_args(
            ["finetune", "--dataset", name, "--data-dir", str(tmp_path / "mock")]
        )
        texts, labels = bert_data.load_examples(args, "test", bert_data.CLASSIFY_DATASETS)
        assert len(texts) == len(labels) == 6 and all(isinstance(t, str) for t in texts)
        metrics = bert_cli.main(
            [
                "finetune",
                "--dataset",
                name,
                "--data-dir",
                str(tmp_path / "mock"),
                "--epochs",
                "1",
                "--batch-size",
                "3",
                "--max-length",
                "24",
                "--output",
                str(tmp_path / "run"),
                *TINY_FLAGS,
            ]  # fmt: skip
        )
    assert metrics["test_examples"] == 6


def _fails(argv, capsys, match):
    with pytest.raises(SystemExit) as exc:
        bert_cli.main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_unknown_dataset_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    _fails(["finetune", "--dataset", "no_such_data", "--output", str(out)], capsys, "pydoc_order")
    _fails(["pretrain", "--dataset", "pydoc_order", "--output", str(out)], capsys, "pydoc_text")
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "run.partial")


def test_data_dir_without_the_data_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["finetune", "--dataset", "imdb_reviews", "--data-dir", str(empty), "--no-download"]
    _fails([*argv, "--output", str(tmp_path / "run")], capsys, str(empty))
    assert not os.path.exists(tmp_path / "run")


def test_window_longer_than_max_length_is_a_clear_error(tmp_path, capsys):
    argv = ["pretrain", "--seq-len", "200", "--max-length", "128", "--output", str(tmp_path / "r")]
    _fails(argv, capsys, "max_length=128")
    assert not os.path.exists(tmp_path / "r.partial")
    _fails(argv, capsys, "--seq-len 200 is longer than the model's maximum length --max-length 128")
