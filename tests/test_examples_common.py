"""What the examples share (examples/common): command line, attention, run folder, devices,
heatmaps."""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import types

import keras
import numpy as np
import pytest

import keras_attn

# examples/ is a folder of the repository, not an installed package.
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.common import attention as attention_lib  # noqa: E402
from examples.common import cli  # noqa: E402
from examples.common import devices  # noqa: E402
from examples.common import heatmaps  # noqa: E402
from examples.common import run as run_lib  # noqa: E402
from examples.common import training  # noqa: E402

# -- command line --------------------------------------------------------------------


def parse(argv, commands=None):
    parser, _ = cli.make_parser(
        "prog", "test", commands or {"train": "train"}, ("pydoc_text", "other")
    )
    return parser.parse_args(argv)


def test_attention_flags_take_names_and_json_specs():
    args = parse(
        ["train", "--pattern", '{"name": "local", "config": {"window": 64, "causal": true}}']
        + ["--normalizer", "hard", "--score-mod", "softcap", "--score-mod", "relative_position"]
    )
    assert cli.attention_from_args(args).to_dict() == {
        "layer": "attention",
        "score": "scaled_dot",
        "pattern": {"name": "local", "config": {"window": 64, "causal": True}},
        "normalizer": "hard",
        "score_mods": ["softcap", "relative_position"],
        "position_encoding": None,
        "num_key_value_heads": None,
    }
    assert args.dataset == "pydoc_text" and args.distribute == "none" and args.download


@pytest.mark.parametrize("text", ['{"name": ', '{"config": {}}', "[1]"])
def test_bad_json_specs_are_rejected(text):
    if text.startswith("["):
        assert cli.parse_component(text) == "[1]"  # a name; the registry rejects it later
        return
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_component(text)


def test_resume_and_overwrite_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse(["train", "--resume", "--overwrite"])
    assert "not allowed with" in capsys.readouterr().err


# -- attention layers from the flags -------------------------------------------------


def test_attention_config_builds_presets_with_their_config():
    config = attention_lib.AttentionConfig.from_dict(
        {"layer": {"name": "local", "config": {"window": 3, "causal": True}}}
    )
    layer = config.make_layer(2, 8)
    assert type(layer) is keras_attn.LocalAttention and layer.window == 3 and layer.causal
    hard = attention_lib.AttentionConfig(layer="hard", normalizer="softmax").make_layer(2, 8)
    assert keras_attn.plugins.registry_name(hard.normalizer) == "hard"  # the preset wins
    reference = attention_lib.AttentionConfig(layer="keras").make_layer(2, 8)
    assert type(reference) is keras.layers.MultiHeadAttention


def test_attention_config_is_checked_once_when_made():
    AttentionConfig = attention_lib.AttentionConfig
    with pytest.raises(keras_attn.UnknownComponentError, match="no_such_score"):
        AttentionConfig(score="no_such_score")
    with pytest.raises(keras_attn.UnknownComponentError, match="no_such_layer"):
        AttentionConfig.from_dict({"layer": "no_such_layer"})
    with pytest.raises(ValueError, match=r"Unknown attention keys \['scores'\]"):
        AttentionConfig.from_dict({"scores": "cosine"})
    with pytest.raises(ValueError, match="Received: score_mods='softcap'"):
        AttentionConfig(score_mods="softcap")  # a string, not a list of one
    with pytest.raises(ValueError, match="Received: pattern=3"):
        AttentionConfig(pattern=3)
    # Defaults are filled in one place; a config goes back and forth through its dict.
    config = AttentionConfig.from_dict({"score_mods": ["softcap"], "pattern": "causal"})
    assert config == AttentionConfig(pattern="causal", score_mods=("softcap",))
    assert config.to_dict()["normalizer"] == "softmax"
    assert AttentionConfig.from_dict(config.to_dict()) == config
    assert AttentionConfig.from_dict(config) is config and AttentionConfig.from_dict(None) == (
        AttentionConfig()
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.score = "cosine"


class Halved(keras_attn.Normalizer):
    """A test plugin's normalizer: softmax weights times 0.5."""

    name = "test_halved_softmax"

    def call(self, logits, mask=None, training=None):
        logits = keras.ops.where(mask, logits, -1e9) if mask is not None else logits
        weights = keras.ops.softmax(logits, axis=-1)
        return 0.5 * (weights if mask is None else keras.ops.where(mask, weights, 0.0))


def test_a_plugin_component_is_usable_from_the_flags():
    plugin = types.SimpleNamespace(
        register_normalizers=keras_attn.hookimpl(lambda register: register(Halved))
    )
    keras_attn.plugins.register(plugin, name="test_examples_plugin")
    try:
        args = parse(["train", "--normalizer", "test_halved_softmax"])
        layer = cli.attention_from_args(args).make_layer(1, 4)
        x = np.random.default_rng(0).normal(size=(1, 3, 4)).astype("float32")
        _, weights = layer(x, x, return_attention_scores=True)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(weights).sum(-1), 0.5, rtol=1e-5)
    finally:
        keras_attn.plugins.unregister(plugin)


# -- the run folder ------------------------------------------------------------------


def run_args(path, **flags):
    return argparse.Namespace(output=str(path), resume=False, overwrite=False, **flags)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_a_run_is_renamed_into_place_only_when_it_finishes(tmp_path):
    out = tmp_path / "run"
    with run_lib.Run(run_args(out), "test") as run:
        assert run.path == str(out) + ".partial"
        assert read_json(os.path.join(run.path, "run.json"))["status"] == "running"
        assert not out.exists()
        run.save_metrics({"loss": np.float32(1.5)})
    assert not os.path.exists(str(out) + ".partial")
    assert read_json(out / "run.json")["status"] == "finished"
    assert read_json(out / "metrics.json") == {"loss": 1.5}


def test_a_failed_run_stays_partial_and_says_why(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with run_lib.Run(run_args(out), "test"):
            raise RuntimeError("boom")
    assert not out.exists()
    info = read_json(str(out) + ".partial/run.json")
    assert info["status"] == "failed" and "boom" in info["error"]


def test_a_finished_run_is_kept_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    with run_lib.Run(run_args(out), "test") as run:
        run.save_metrics({"loss": 1.0})
    with pytest.raises(run_lib.RunError, match="--resume .* or --overwrite"):
        run_lib.Run(run_args(out), "test").check()
    with run_lib.Run(argparse.Namespace(output=str(out), resume=True, overwrite=False), "t") as run:
        assert read_json(os.path.join(run.path, "metrics.json")) == {"loss": 1.0}  # copied
    with run_lib.Run(argparse.Namespace(output=str(out), resume=False, overwrite=True), "t") as run:
        assert not os.path.exists(os.path.join(run.path, "metrics.json"))  # a fresh folder
        run.save_metrics({"loss": 0.5})
    assert read_json(out / "metrics.json") == {"loss": 0.5}
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_resume_without_a_run_is_an_error(tmp_path):
    args = argparse.Namespace(output=str(tmp_path / "none"), resume=True, overwrite=False)
    with pytest.raises(run_lib.RunError, match="no run to resume"):
        run_lib.Run(args, "test").check()


def test_latest_checkpoint_and_restore(tmp_path):
    out = tmp_path / "run"
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with run_lib.Run(run_args(out), "test") as run:
        assert run.latest_checkpoint() == (None, 0)
        for epoch in (1, 2, 10):
            model.save(os.path.join(run.checkpoint_dir, f"epoch-{epoch:04d}.keras"))
        assert run.latest_checkpoint()[1] == 10
    resumed = run_lib.Run(argparse.Namespace(output=str(out), resume=True, overwrite=False), "t")
    with resumed:
        restored, epoch = resumed.restore()
    assert epoch == 10
    x = np.ones((1, 3), "float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored(x)), keras.ops.convert_to_numpy(model(x))
    )


# -- devices and precision -----------------------------------------------------------


def test_distribute_tpu_without_a_tpu_is_a_clear_error(backend):
    if backend not in ("tensorflow", "jax"):
        pytest.skip("--distribute tpu is a TensorFlow and JAX option")
    with pytest.raises(run_lib.RunError, match="tpu"):
        devices.distribution("tpu")


def test_distribute_choices_are_checked_per_backend(backend):
    if backend not in ("tensorflow", "jax"):
        # PyTorch trains on one device: every option but "none" names the backend.
        with pytest.raises(run_lib.RunError, match=f"Received: backend={backend}"):
            devices.distribution("mirrored")
        assert devices.distribution("none").num_replicas == 1
        return
    wrong = "data_parallel" if backend == "tensorflow" else "mirrored"
    with pytest.raises(run_lib.RunError, match="Received: distribute="):
        devices.distribution(wrong)
    assert devices.distribution("none").num_replicas == 1


def test_mixed_precision_sets_the_policy():
    assert devices.configure_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert devices.configure_precision(None) == "float32"
    with pytest.raises(run_lib.RunError):
        devices.configure_precision("float8")


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    from examples import gpt
    from examples.common import devices

    devices.split_cpu(2)

    def losses(name):
        dist = devices.distribution(name)
        keras.utils.set_random_seed(0)
        with dist.scope():
            model = gpt.build_gpt(20, 16, num_layers=1, num_heads=2, hidden_dim=16)
            model.compile(
                optimizer=keras.optimizers.SGD(0.5),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        rng = np.random.default_rng(0)
        x = rng.integers(0, 20, (16, 16)).astype("int32")
        y = np.roll(x, -1, axis=1)
        history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        if name == "data_parallel":
            keras.distribution.set_distribution(None)
        return history.history["loss"], dist.num_replicas

    single, _ = losses("none")
    multi, replicas = losses(sys.argv[1])
    print(json.dumps({"single": single, "multi": multi, "replicas": replicas}))
    """
)


def test_two_devices_give_the_loss_of_one(backend):
    """Data parallel training on 2 logical CPU devices (tf.distribute.MirroredStrategy on
    TensorFlow, keras.distribution.DataParallel on JAX) matches one device, step by step."""
    if backend not in ("tensorflow", "jax"):
        pytest.skip("tf.distribute / keras.distribution are TensorFlow and JAX features")
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND=backend)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # read before jax starts
    name = "mirrored" if backend == "tensorflow" else "data_parallel"
    result = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED_SCRIPT, name],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    np.testing.assert_allclose(out["multi"], out["single"], rtol=1e-4)
    assert out["single"][-1] < out["single"][0]  # it trained


# -- attention pictures --------------------------------------------------------------


def test_attention_weights_are_those_of_the_models_own_blocks(tmp_path):
    """`attention_weights` runs the model's blocks on its embedding: each block's weights
    are its attention layer's on that block's input, and the blocks end where the model
    does."""
    from examples import gpt

    keras.utils.set_random_seed(0)
    model = gpt.build_gpt(11, 8, num_layers=2, num_heads=2, hidden_dim=8)
    ids = np.random.default_rng(0).integers(0, 11, (3, 5)).astype("int32")
    weights_by_block = heatmaps.attention_weights(model, ids)
    assert list(weights_by_block) == ["block_0", "block_1"]
    x, _ = model.embed(keras.ops.convert_to_tensor(ids))
    for block in model.blocks:
        weights = weights_by_block[block.name]
        assert weights.shape == (3, 2, 5, 5)
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
        assert np.all(np.triu(np.ones((5, 5)), 1)[None, None] * weights == 0)  # causal kept
        # The same as calling the block's attention layer by hand on its (normed) input.
        h = block.attention_norm(x)
        _, expected = block.attention(h, h, use_causal_mask=True, return_attention_scores=True)
        np.testing.assert_allclose(
            weights, keras.ops.convert_to_numpy(expected), rtol=1e-5, atol=1e-6
        )
        x = block(x)
    # The last block's output is the model's own, before its final norm and head.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model.head(model.final_norm(x))),
        keras.ops.convert_to_numpy(model(ids)),
        rtol=1e-5,
        atol=1e-5,
    )
    paths = heatmaps.save_attention_heatmaps(model, ids, str(tmp_path), examples=2)
    names = [os.path.basename(p) for p in paths]
    assert names == ["example0.png", "example1.png", "viewer.html"]
    for path in paths[:2]:
        with open(path, "rb") as f:
            assert f.read(4) == b"\x89PNG"
    with open(paths[2]) as f:
        page = f.read()
    assert '"block_1"' in page  # the block, by name
    assert not re.search(r"(src|href)=[\"']?https?:", page)  # nothing fetched: works offline


# -- a finished run stays finished ---------------------------------------------------


def test_an_optional_step_that_fails_is_a_warning_not_a_failed_run(tmp_path, capsys):
    out = tmp_path / "run"

    def sample():
        raise RuntimeError("sampling broke")

    with run_lib.Run(run_args(out), "test") as run:
        run.save_metrics({"loss": 1.0})
        assert run.optional("sample", sample) is None
        assert run.optional("heatmaps", lambda: "drawn") == "drawn"
    info = read_json(out / "run.json")
    assert info["status"] == "finished"
    assert info["warnings"] == [{"step": "sample", "error": "RuntimeError: sampling broke"}]
    assert read_json(out / "metrics.json") == {"loss": 1.0}
    assert "sample failed" in capsys.readouterr().err


def test_resume_past_the_last_epoch_fails_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with run_lib.Run(run_args(out, epochs=2), "test") as run:
        model.save(os.path.join(run.checkpoint_dir, "epoch-0002.keras"))
    resume = argparse.Namespace(output=str(out), resume=True, overwrite=False, epochs=2)
    with pytest.raises(run_lib.RunError, match="already trained 2 epoch.*--epochs"):
        with run_lib.Run(resume, "test"):
            pass
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no stray run.partial
    resume.epochs = 3
    with run_lib.Run(resume, "test") as run:
        assert run.restore()[1] == 2


def test_history_holds_the_epochs_of_resumed_runs(tmp_path):
    out = tmp_path / "run"
    with run_lib.Run(run_args(out), "test") as run:
        with open(run.history_path, "w") as f:
            f.write("epoch,loss\n0,3.0\n1,2.0\n2,1.5\n")  # epoch 2 logged after the checkpoint
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.save(os.path.join(run.checkpoint_dir, "epoch-0002.keras"))
    resume = argparse.Namespace(output=str(out), resume=True, overwrite=False, epochs=3)
    with run_lib.Run(resume, "test") as run:
        run.restore()
        assert run.history() == {"loss": [3.0, 2.0]}  # epoch 2 is trained again


def test_throughput_counts_the_timed_steps_and_leaves_out_the_compiling_one(monkeypatch):
    clock = iter([0.0, 5.0, 5.0, 5.5, 6.0, 7.5])  # begin/end of three steps
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    throughput = training.Throughput(tokens_per_step=100)
    assert throughput.tokens_per_s is None
    for step in range(3):
        throughput.on_train_batch_begin(step)
        throughput.on_train_batch_end(step, {"loss": 1.0})
    assert throughput.tokens_per_s == pytest.approx(200 / 2.0)  # steps 2 and 3: 0.5 s + 1.5 s
