"""The GPT example: model, cached generation, and the train command end to end."""

import json
import os
import pathlib
import shutil
import sys

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

import keras_attn

# examples/ is a folder of the repository, not an installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples import gpt  # noqa: E402
from examples.gpt import __main__ as gpt_cli  # noqa: E402
from examples.gpt.model import single_document  # noqa: E402

VOCAB = 23


def tiny_gpt(attention=None, max_length=24, num_layers=2, seed=0):
    keras.utils.set_random_seed(seed)
    return gpt.build_gpt(
        VOCAB, max_length, num_layers=num_layers, num_heads=2, hidden_dim=16, attention=attention
    )


def logits_of(model, ids):
    """Logits of int ids ``(B, T)``, or of a packed model's dict of inputs."""
    if isinstance(ids, dict):
        return keras.ops.convert_to_numpy(model(ids))
    return keras.ops.convert_to_numpy(model(np.asarray(ids, "int32")))


@pytest.fixture(scope="module")
def default_model():
    """The tiny GPT with the default attention, shared by the tests that only read it."""
    return tiny_gpt()


@pytest.fixture(scope="module")
def default_generator(default_model):
    """A `Generator` of `default_model`: the tests decoding (2, 3) prompts by 12 tokens
    share its compiled decoding loops."""
    return gpt.Generator(default_model)


def naive_greedy(model, prompt, steps):
    """Uncached greedy decoding by hand: rerun the model on the growing sequence."""
    ids = np.asarray(prompt, "int32")
    for _ in range(steps):
        nxt = logits_of(model, ids)[:, -1].argmax(-1).astype("int32")
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return ids


# -- model ---------------------------------------------------------------------------


def test_logits_shape_and_causality(default_model):
    model = default_model
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (2, 10)).astype("int32")
    changed = ids.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB  # change only the future of position 5
    a, b = logits_of(model, ids), logits_of(model, changed)
    assert a.shape == (2, 10, VOCAB)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-4  # the future positions do see the change


def test_blocks_use_keras_attn_layers_from_the_attention_flags():
    attention = {
        "layer": "attention",
        "pattern": {"name": "local", "config": {"window": 3, "causal": True}},
        "normalizer": "hard",
    }
    model = tiny_gpt(attention)
    layer = model.blocks[0].attention
    assert isinstance(layer, keras_attn.Attention)
    assert keras_attn.plugins.registry_name(layer.normalizer) == "hard"
    assert keras_attn.plugins.registry_name(layer.pattern) == "local"
    # Local window 3, causal: the logits at position 9 ignore tokens 0..6.
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, 10)).astype("int32")
    changed = ids.copy()
    changed[0, 0] = (changed[0, 0] + 1) % VOCAB
    a, b = logits_of(model, ids), logits_of(model, changed)
    # Two blocks of window 3 reach back 4 positions: position 9 cannot see position 0.
    np.testing.assert_allclose(a[0, 9], b[0, 9], atol=1e-5)


def test_reference_model_uses_keras_multi_head_attention():
    model = tiny_gpt({"layer": "keras"})
    assert type(model.blocks[0].attention) is keras.layers.MultiHeadAttention


@pytest.mark.parametrize(
    "attention",
    [None, {"layer": "attention", "score": "general", "score_mods": ["softcap"]}],
    ids=["default", "general+softcap"],
)
def test_save_and_load_gives_identical_outputs(tmp_path, attention):
    model = tiny_gpt(attention)
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 12)).astype("int32")
    path = str(tmp_path / "gpt.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(logits_of(model, ids), logits_of(loaded, ids))
    assert type(loaded) is gpt.GPT and len(loaded.blocks) == 2
    assert loaded.attention_config == model.attention_config
    assert loaded.blocks[1].attention_config == model.blocks[1].attention_config


def test_sequence_longer_than_max_length_is_a_clear_error():
    model = tiny_gpt(max_length=8)
    with pytest.raises(ValueError, match="longer than the model's maximum length 8"):
        model(np.zeros((1, 9), "int32"))
    with pytest.raises(ValueError, match="longer than the model's maximum length 8"):
        gpt.generate(model, np.zeros((1, 5), "int32"), 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampling": "beam"}, "sampling"),
        ({"sampling": "top_k"}, "top_k"),
        ({"sampling": "temperature", "temperature": 0.0}, "temperature"),
    ],
)
def test_bad_sampling_arguments(default_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gpt.generate(default_model, np.zeros((1, 2), "int32"), 2, **kwargs)


def test_build_gpt_validates_arguments():
    with pytest.raises(ValueError, match="hidden_dim=10, num_heads=4"):
        gpt.build_gpt(VOCAB, 8, num_heads=4, hidden_dim=10)
    with pytest.raises(ValueError, match="num_layers=0"):
        gpt.build_gpt(VOCAB, 8, num_layers=0)
    with pytest.raises(keras_attn.UnknownComponentError, match="no_such_pattern"):
        gpt.build_gpt(VOCAB, 8, attention={"pattern": "no_such_pattern"})


# -- generation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "full",
        pytest.param({"name": "local", "config": {"window": 4}}, marks=pytest.mark.slow),
    ],
)
def test_cached_greedy_equals_uncached_greedy(default_generator, pattern):
    if pattern == "full":  # the default attention
        generator = default_generator
    else:
        generator = gpt.Generator(tiny_gpt({"pattern": pattern}))
    model = generator.model
    prompt = np.random.default_rng(3).integers(0, VOCAB, (2, 3)).astype("int32")
    reference = naive_greedy(model, prompt, 12)
    cached = generator.generate(prompt, 12, use_cache=True)
    uncached = generator.generate(prompt, 12, use_cache=False)
    np.testing.assert_array_equal(cached, reference)
    np.testing.assert_array_equal(uncached, reference)
    np.testing.assert_array_equal(cached[:, :3], prompt)


@pytest.mark.slow  # compiles several decoding loops (~25 s each on JAX, CPU)
def test_rope_grouped_query_and_sinks_decode_with_the_cache_as_without():
    attention = {
        "position_encoding": "rope",
        "num_key_value_heads": 1,
        "normalizer": "sink_softmax",
    }
    model = tiny_gpt(attention)
    layer = model.blocks[0].attention
    assert (layer.num_key_value_heads, type(layer.position_encoding).name) == (1, "rope")
    assert layer.cache_shape(2, 24) == (2, 2, 24, 1, 8)  # the cache holds the kv heads only
    prompt = np.random.default_rng(4).integers(0, VOCAB, (2, 3)).astype("int32")
    np.testing.assert_array_equal(
        gpt.generate(model, prompt, 8, use_cache=True), naive_greedy(model, prompt, 8)
    )


def test_modern_attention_flags_reach_the_attention_dict():
    from examples.common import cli
    from examples.gpt.__main__ import make_parser

    args = make_parser().parse_args(
        [
            "train",
            "--position-encoding",
            "rope",
            "--num-kv-heads",
            "2",
            "--normalizer",
            "sink_softmax",
        ]
    )
    attention = cli.attention_from_args(args)
    assert attention.position_encoding == "rope"
    assert attention.num_key_value_heads == 2
    assert attention.normalizer == "sink_softmax"
    with pytest.raises(ValueError, match="reference layer.*takes no position_encoding"):
        gpt.build_gpt(VOCAB, 8, attention={"layer": "keras", "position_encoding": "rope"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        gpt.build_gpt(VOCAB, 8, attention={"num_key_value_heads": 0})


@pytest.mark.slow  # compiles several decoding loops (~25 s each on JAX, CPU)
def test_generate_text_slides_past_the_maximum_length():
    model = tiny_gpt(max_length=12)
    generator = gpt.Generator(model)  # the first chunk of both calls compiles once
    prompt = np.array([[1, 2, 3]], "int32")
    # Within one window it is plain greedy decoding.
    np.testing.assert_array_equal(
        generator.generate_text(prompt, 9), naive_greedy(model, prompt, 9)
    )
    # Past it, each chunk continues greedily from the last 6 tokens (checked by hand).
    ids = generator.generate_text(prompt, 20)
    assert ids.shape == (1, 23)
    np.testing.assert_array_equal(naive_greedy(model, ids[:, 6:12], 6), ids[:, 6:18])


def test_sampling_is_seeded_and_top_k_stays_among_the_best(default_generator):
    # (2, 3) prompts, 12 new tokens: the shapes of test_cached_greedy_equals_uncached_greedy,
    # whose compiled loop this reuses.
    generator, model = default_generator, default_generator.model
    prompt = np.array([[1, 2, 3], [4, 5, 6]], "int32")
    a = generator.generate(prompt, 12, sampling="temperature", temperature=5.0, seed=7)
    b = generator.generate(prompt, 12, sampling="temperature", temperature=5.0, seed=7)
    c = generator.generate(prompt, 12, sampling="temperature", temperature=5.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # 24 draws at high temperature: equal only by a fluke
    # top_k=1 is greedy whatever the noise.
    np.testing.assert_array_equal(
        generator.generate(prompt, 12, sampling="top_k", top_k=1, seed=3),
        generator.generate(prompt, 12),
    )
    # With top_k=3 every token is among the 3 best of its position (checked by hand).
    ids = generator.generate(prompt, 12, sampling="top_k", top_k=3, temperature=10.0, seed=4)
    logits = logits_of(model, ids)
    for row in range(2):
        for t in range(3, ids.shape[1]):
            best3 = np.argsort(logits[row, t - 1])[-3:]
            assert ids[row, t] in best3


@pytest.mark.slow  # compiles several decoding loops (~25 s each on JAX, CPU)
def test_temperature_sampling_follows_softmax():
    """Gumbel-max sampling of one step matches softmax(logits / T): 4000 draws, within 0.03."""
    model = tiny_gpt(num_layers=1)
    prompt = np.array([[4, 5]], "int32")
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits_of(model, prompt)[0, -1] / 2.0))
    batch = np.repeat(prompt, 4000, axis=0)
    draws = gpt.generate(model, batch, 1, sampling="temperature", temperature=2.0, seed=0)[:, -1]
    freq = np.bincount(draws, minlength=VOCAB) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.03)


# -- packed documents ------------------------------------------------------------------


def test_pack_documents_fills_rows_and_weighs_out_targets_across_documents():
    from examples.gpt.data import pack_documents

    # Documents 10 11 12 | 20 21 | (empty) | 30 31 32 33 34, rows of 4 tokens:
    # stream 10 11 12 20 21 30 31 32 33 34, two rows and their targets, tail [34] left out.
    packed = pack_documents([[10, 11, 12], [20, 21], [], [30, 31, 32, 33, 34]], 4)
    np.testing.assert_array_equal(packed["token_ids"], [[10, 11, 12, 20], [21, 30, 31, 32]])
    np.testing.assert_array_equal(packed["targets"], [[11, 12, 20, 21], [30, 31, 32, 33]])
    # Ids count the documents of each row from 0; document 20 21 continues in row 2.
    np.testing.assert_array_equal(packed["segment_ids"], [[0, 0, 0, 1], [0, 1, 1, 1]])
    # 12 -> 20 and 21 -> 30 cross a boundary; 20 -> 21 (across rows) does not.
    np.testing.assert_array_equal(packed["weights"], [[1, 1, 0, 1], [0, 1, 1, 1]])
    assert packed["weights"].dtype == np.float32 and packed["segment_ids"].dtype == np.int32
    with pytest.raises(ValueError, match="too few for one packed row"):
        pack_documents([[1, 2, 3]], 4)


def test_packed_model_attends_within_documents_and_restarts_positions():
    """Each document of a packed row gets the logits it gets alone: changing one document
    changes nothing in the other (no attention crosses), and positions (learned and
    rope) restart at each document."""
    keras.utils.set_random_seed(0)
    model = gpt.build_gpt(
        VOCAB, 24, num_layers=2, num_heads=2, hidden_dim=16,
        attention={"position_encoding": "rope"}, packed=True,
    )  # fmt: skip
    ids = np.random.default_rng(5).integers(0, VOCAB, (2, 10)).astype("int32")
    segments = np.array([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3], "int32")
    logits = logits_of(model, {"token_ids": ids, "segment_ids": segments})
    for row, start in ((0, 4), (1, 7)):
        alone = logits_of(model, single_document(model, ids[row : row + 1, start:]))
        np.testing.assert_allclose(logits[row, start:], alone[0], atol=1e-5)
    changed = ids.copy()
    changed[0, 4:] = (changed[0, 4:] + 1) % VOCAB  # the second document of row 0
    other = logits_of(model, {"token_ids": changed, "segment_ids": segments})
    np.testing.assert_array_equal(other[0, :4], logits[0, :4])
    assert np.abs(other[0, 4:] - logits[0, 4:]).max() > 1e-4


def test_packed_reference_model_masks_across_documents():
    keras.utils.set_random_seed(0)
    model = gpt.build_gpt(
        VOCAB, 24, num_layers=1, num_heads=2, hidden_dim=16, attention={"layer": "keras"},
        packed=True,
    )  # fmt: skip
    ids = np.random.default_rng(6).integers(0, VOCAB, (1, 8)).astype("int32")
    segments = np.array([[0, 0, 0, 1, 1, 1, 1, 1]], "int32")
    logits = logits_of(model, {"token_ids": ids, "segment_ids": segments})
    alone = logits_of(model, single_document(model, ids[:, 3:]))
    np.testing.assert_allclose(logits[0, 3:], alone[0], atol=1e-5)


# -- the command line ----------------------------------------------------------------

TINY = [
    "--num-layers", "1", "--num-heads", "2", "--hidden-dim", "32", "--seq-len", "32",
    "--max-length", "64", "--batch-size", "16", "--sample-length", "0", "--verbose", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def run_main(argv):
    return gpt_cli.main(argv)


TRAIN = ["--epochs", "3", "--steps", "15", "--learning-rate", "3e-3", *TINY]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    """One finished `train` run (3 epochs) and its metrics, shared by the tests that read
    or resume it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    metrics = run_main(["train", "--output", str(out), "--data-dir", data_dir, *TRAIN])
    return out, metrics


def test_train_reduces_loss_on_the_embedded_text_and_writes_a_finished_run(trained_run):
    out, metrics = trained_run
    losses = metrics["loss_per_epoch"]
    assert losses[-1] < losses[0] - 0.3, losses
    assert not os.path.exists(str(out) + ".partial")
    with open(out / "run.json") as f:
        info = json.load(f)
    assert info["status"] == "finished"
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert saved["test_loss"] == pytest.approx(metrics["test_loss"])
    assert saved["unigram_entropy"] > 2.0
    assert sorted(os.listdir(out / "checkpoints")) == [
        "epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras",
    ]  # fmt: skip
    assert sorted(os.listdir(out / "attention")) == ["viewer.html", "weights.png"]
    assert os.listdir(out / "logs")  # TensorBoard event files
    with open(out / "attention" / "weights.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_from_the_last_checkpoint(trained_run, tmp_path, data_dir):
    first_out, first = trained_run
    out = tmp_path / "run"
    shutil.copytree(first_out, out)  # the shared run stays as it was
    argv = ["train", "--output", str(out), "--data-dir", data_dir, *TRAIN]
    resumed = run_main([*argv, "--epochs", "4", "--resume"])
    with open(out / "run.json") as f:
        info = json.load(f)
    assert info["resumed_epoch"] == 3 and info["status"] == "finished"
    # Every epoch the model has trained: the first run's, then the resumed one's.
    assert len(resumed["loss_per_epoch"]) == 4
    np.testing.assert_allclose(resumed["loss_per_epoch"][:3], first["loss_per_epoch"], rtol=1e-6)
    assert resumed["loss_per_epoch"][3] == pytest.approx(resumed["loss"])
    assert sorted(os.listdir(out / "checkpoints")) == [f"epoch-{i:04d}.keras" for i in range(1, 5)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "no_such_dataset"], "Unknown dataset 'no_such_dataset'"),
        (["--seq-len", "80"], "--seq-len 80 is longer than the model's maximum length"),
        (["--seq-len", "80"], "--max-length 64"),
        (["--pattern", "no_such_pattern"], "Unknown pattern 'no_such_pattern'"),
    ],
)
def test_bad_input_fails_before_writing_anything(tmp_path, data_dir, capsys, extra, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_main(["train", "--output", str(out), "--data-dir", data_dir, *TINY, *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_tiny_shakespeare_through_tfds_mock_data(tmp_path):
    out = tmp_path / "run"
    # Mock examples are short random strings: small windows and batches.
    small = ["--seq-len", "4", "--batch-size", "2", "--epochs", "1", "--steps", "2"]
    with tfds.testing.mock_data(num_examples=4):
        metrics = run_main(
            ["train", "--dataset", "tiny_shakespeare", "--output", str(out), "--no-download"]
            + TINY
            + small
        )
    assert np.isfinite(metrics["loss"])
    assert os.path.isdir(out)


@pytest.mark.parametrize(
    "extra",
    [[], ["--position-encoding", "rope"]],
    ids=["pack", "pack+rope"],
)
def test_pack_trains_through_tfds_and_the_run_record_says_so(tmp_path, extra):
    """--pack through the real TFDS pipeline (mock data: 4 documents per split): fit
    under jit, held-out loss, metrics, the .keras checkpoint and a cached sample."""
    out = tmp_path / "run"
    small = ["--seq-len", "8", "--batch-size", "2", "--epochs", "1", "--steps", "3"]
    argv = ["train", "--dataset", "tiny_shakespeare", "--output", str(out), "--no-download"]
    argv += [*TINY, *small, "--pack", "--sample-length", "5", *extra]
    with tfds.testing.mock_data(num_examples=4):
        metrics = run_main(argv)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["test_loss"])
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert saved["pack"] is True and saved["train_documents"] == 4
    assert saved["train_rows"] >= 2 and saved["train_masked_targets"] >= 1
    assert saved["train_tokens_per_s"] > 0
    with open(out / "run.json") as f:
        info = json.load(f)
    assert info["args"]["pack"] is True and info["status"] == "finished"
    assert "warnings" not in info  # the sample and the heatmaps ran
    assert os.path.exists(out / "sample.txt")
    model = keras.models.load_model(str(out / "checkpoints" / "epoch-0001.keras"))
    assert sorted(model.input) == ["segment_ids", "token_ids"]
    layer = model.blocks[0].attention
    assert layer.reset_positions
    if extra:
        assert info["attention"]["position_encoding"] == "rope"
        assert type(layer.position_encoding).name == "rope"
