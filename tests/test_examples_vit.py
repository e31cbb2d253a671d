"""The ViT example: the model, the embedded digits dataset, the command line and its errors."""

import json
import os
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

import keras_attn

# The examples are not an installed package: import them from the checkout.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples import datasets  # noqa: E402
from examples import vit  # noqa: E402
from examples.datasets import digits  # noqa: E402
from examples.vit import __main__ as vit_cli  # noqa: E402
from examples.vit import data as vit_data  # noqa: E402

TINY = dict(patch_size=2, num_layers=2, num_heads=2, hidden_dim=16)
TINY_FLAGS = ["--num-layers", "1", "--num-heads", "2", "--hidden-dim", "16", "--verbose", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data dir holding sklearn_digits, built locally from scikit-learn."""
    path = str(tmp_path_factory.mktemp("tfds"))
    datasets.load("sklearn_digits", "test", data_dir=path)
    return path


def _images(count, shape=(8, 8, 1), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, *shape)).astype("float32")


def _outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


# -- model --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attention, cls",
    [
        (None, keras_attn.Attention),
        ({"layer": "hard"}, keras_attn.HardAttention),
        ({"pattern": {"name": "local", "config": {"window": 3}}}, keras_attn.Attention),
    ],
)
def test_vit_saves_and_loads_with_identical_outputs(tmp_path, attention, cls):
    model = vit.build_vit((8, 8, 1), 10, attention=attention, **TINY)
    x = _images(3)
    path = tmp_path / "vit.keras"
    model.save(path)
    assert path.stat().st_size > 0
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(_outputs(loaded, x), _outputs(model, x))
    assert type(loaded) is vit.ViT and len(loaded.blocks) == TINY["num_layers"]
    assert type(loaded.blocks[0].attention) is cls


def test_matches_keras_multi_head_attention_with_the_same_weights():
    reference = vit.build_vit((8, 8, 3), 5, attention={"layer": "keras"}, **TINY)
    ours = vit.build_vit((8, 8, 3), 5, **TINY)
    ours.set_weights(reference.get_weights())
    x = _images(4, (8, 8, 3))
    np.testing.assert_allclose(_outputs(ours, x), _outputs(reference, x), atol=1e-5)


def test_patch_embedding_class_token_and_positions_match_numpy():
    model = vit.build_vit((4, 6, 2), 3, **TINY)
    x = _images(2, (4, 6, 2))
    embedded, arguments = model.embed(x, training=False)  # what the first block receives
    got = keras.ops.convert_to_numpy(embedded)  # (B, 1 + N, E)
    assert arguments == {}

    kernel, bias = model.patch_embedding.get_weights()  # (p, p, C, E), (E,)
    token = model.class_token.get_weights()[0]  # (1, 1, E)
    positions = model.position_embedding.get_weights()[0]  # (1 + N, E)
    p = 2
    patches = (
        (x / 255.0).reshape(2, 2, p, 3, p, 2).transpose(0, 1, 3, 2, 4, 5)
    )  # (B, 2, 3, p, p, C)
    patches = patches.reshape(2, 6, p * p * 2)  # row-major order of patches
    embedded = patches @ kernel.reshape(p * p * 2, -1) + bias
    expected = np.concatenate([np.broadcast_to(token, (2, 1, 16)), embedded], axis=1) + positions
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_shape=(8, 8, 1), patch_size=3), "multiples of `patch_size`"),
        (dict(image_shape=(8, 8)), "image_shape"),
        (dict(hidden_dim=18, num_heads=4), "divisible by `num_heads`"),
        (dict(attention={"layer": "no_such_layer"}), "no_such_layer"),
    ],
)
def test_bad_model_arguments_fail_early(kwargs, match):
    args = {"image_shape": (8, 8, 1), "num_classes": 10, **TINY, **kwargs}
    with pytest.raises((ValueError, keras_attn.PluginError), match=match):
        vit.build_vit(**args)


# -- the embedded digits --------------------------------------------------------------------


def test_sklearn_digits_is_scikit_learns_digits_split_once(data_dir):
    from sklearn.datasets import load_digits

    raw = load_digits()
    train_idx, test_idx = digits.split_indices(raw.target)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert len(train_idx) + len(test_idx) == len(raw.target)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        ds = datasets.load("sklearn_digits", split, data_dir=data_dir, as_supervised=True)
        images, labels = map(np.stack, zip(*ds.as_numpy_iterator(), strict=True))
        assert images.shape == (len(idx), 8, 8, 1) and images.dtype == np.uint8
        # The same images and labels (in TFDS's order): pixels 0..16 scaled to 0..255.
        expected = np.round(raw.images[idx] * 255.0 / 16.0).astype("uint8")[..., None]
        got = sorted((im.tobytes(), int(label)) for im, label in zip(images, labels, strict=True))
        want = sorted(
            (im.tobytes(), int(label)) for im, label in zip(expected, raw.target[idx], strict=True)
        )
        assert got == want
    # stratified: every digit is about 20% test
    counts = np.bincount(raw.target[test_idx]) / np.bincount(raw.target)
    assert np.all(np.abs(counts - 0.2) < 0.01)


def test_short_training_reduces_loss_on_embedded_digits(data_dir):
    args = vit_cli.make_parser().parse_args(["train", "--data-dir", data_dir])
    x, y = vit_data.load_images(args, "train")
    x, y = x[:256].astype("float32"), y[:256]
    # 8 epochs of 8 steps: after 5, the loss was 0.6-0.72x the first, by backend and seed.
    model = vit.compile_vit(vit.build_vit((8, 8, 1), 10, dropout=0.0, **TINY), 3e-3, 64)
    before = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    assert after["loss"] < 0.7 * before, (before, after)
    assert after["accuracy"] > 0.3  # chance is 0.1


# -- the command line ---------------------------------------------------------------------------


def test_train_with_hard_attention_from_the_command_line(data_dir, tmp_path):
    out = tmp_path / "run"
    metrics = vit_cli.main(
        [
            "train",
            "--data-dir",
            data_dir,
            "--output",
            str(out),
            "--epochs",
            "2",
            "--steps",
            "2",
            "--layer",
            "hard",
            *TINY_FLAGS,
        ]  # fmt: skip
    )
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_examples"] == 359
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["attention"]["layer"] == "hard"
    assert (out / "checkpoints" / "epoch-0002.keras").exists()
    assert len(list((out / "attention").glob("*.png"))) == 2
    model = keras.models.load_model(out / "checkpoints" / "epoch-0002.keras")
    assert isinstance(model.blocks[0].attention, keras_attn.HardAttention)

    # --resume continues from the last checkpoint to the new --epochs.
    metrics = vit_cli.main(
        [
            "train",
            "--data-dir",
            data_dir,
            "--output",
            str(out),
            "--epochs",
            "3",
            "--steps",
            "2",
            "--resume",
            *TINY_FLAGS,
        ]  # fmt: skip
    )
    assert (out / "checkpoints" / "epoch-0003.keras").exists()
    assert json.loads((out / "run.json").read_text())["resumed_epoch"] == 2
    assert len(metrics["loss_per_epoch"]) == 3  # the first run's 2 epochs and the resumed one

    # Resuming past the last epoch fails at once and leaves no stray DIR.partial.
    with pytest.raises(SystemExit):
        vit_cli.main(["train", "--output", str(out), "--epochs", "3", "--resume", *TINY_FLAGS])
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_catalog_datasets_by_name(tmp_path, name, shape):
    """mnist and cifar10 go through tfds.load; mock_data stands in for the download."""
    mock_dir = str(tmp_path / "mock")
    with tfds.testing.mock_data(num_examples=4, data_dir=mock_dir):
        args = vit_cli.make_parser().parse_args(
            ["train", "--dataset", name, "--data-dir", mock_dir]
        )
        images, labels = vit_data.load_images(args, "test")
        assert images.shape == (4, *shape) and labels.shape == (4,)
        metrics = vit_cli.main(
            [
                "train",
                "--dataset",
                name,
                "--data-dir",
                mock_dir,
                "--epochs",
                "1",
                "--batch-size",
                "2",
                "--output",
                str(tmp_path / "run"),
                *TINY_FLAGS,
            ]  # fmt: skip
        )
    assert metrics["patch_size"] == 4 and metrics["image_shape"] == list(shape)


def _fails(argv, capsys, match):
    with pytest.raises(SystemExit) as exc:
        vit_cli.main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_unknown_dataset_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    _fails(["train", "--dataset", "imagenet9", "--output", str(tmp_path / "r")], capsys, "mnist")
    assert not os.path.exists(tmp_path / "r") and not os.path.exists(tmp_path / "r.partial")


def test_data_dir_without_the_data_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["train", "--dataset", "mnist", "--data-dir", str(empty), "--no-download"]
    _fails([*argv, "--output", str(tmp_path / "r")], capsys, str(empty))
    assert not os.path.exists(tmp_path / "r")


def test_patch_size_that_does_not_tile_the_image_is_a_clear_error(data_dir, tmp_path, capsys):
    argv = ["train", "--data-dir", data_dir, "--patch-size", "3", "--output", str(tmp_path / "r")]
    _fails(argv, capsys, "multiples of `patch_size`")
    assert not os.path.exists(tmp_path / "r")


def test_compare_trains_both_models_from_the_same_weights(data_dir, tmp_path):
    out = tmp_path / "compare"
    result = vit_cli.main(
        [
            "compare",
            "--data-dir",
            data_dir,
            "--output",
            str(out),
            "--epochs",
            "1",
            "--steps",
            "3",
            *TINY_FLAGS,
        ]  # fmt: skip
    )
    assert result["same_initial_weights"] and set(result["models"]) == {"keras_attn", "keras"}
    for row in result["models"].values():
        assert row["median_step_ms"] > 0 and 0.0 <= row["test_accuracy"] <= 1.0
    ratio = (
        result["models"]["keras_attn"]["median_step_ms"]
        / result["models"]["keras"]["median_step_ms"]
    )
    assert result["step_time_ratio"] == pytest.approx(ratio)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    # run.json holds the wall time of the whole comparison, not of writing its results.
    info = json.loads((out / "run.json").read_text())
    assert info["wall_time_s"] >= result["wall_time_s"] - 0.1
    # It spans both models' training: of 3 steps, two take at least the median each.
    trained_s = sum(2 * row["median_step_ms"] / 1000 for row in result["models"].values())
    assert result["wall_time_s"] >= trained_s
