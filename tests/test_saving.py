"""keras_attn.saving: a `.keras` file that needs components which are not installed.

The files are real: saved with an in-process plugin registered, then read after it is
unregistered (as on a machine without the plugin).
"""

import json
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import patterns
from keras_attn import plugins
from keras_attn import saving
from keras_attn.errors import MissingComponentsError


class HalfDot(keras_attn.Score):
    name = "saving_half_dot"

    def call(self, query, key):
        return 0.5 * ops.matmul(query, ops.swapaxes(key, -1, -2))  # (..., Tq, Tk)


class EvenKeys(keras_attn.Pattern):
    name = "saving_even_keys"

    def mask(self, positions):
        return ops.equal(positions.key % 2, 0)


class PlainAttention(keras_attn.Attention):
    registry_name = "saving_plain"


class SavingPlugin:
    @keras_attn.hookimpl
    def register_scores(register):
        register(HalfDot)

    @keras_attn.hookimpl
    def register_patterns(register):
        register(EvenKeys)

    @keras_attn.hookimpl
    def register_layers(register):
        register(PlainAttention)


@pytest.fixture
def plugin():
    plugins.register(SavingPlugin, name="saving_test_plugin")
    yield SavingPlugin
    if plugins.load().pm.is_registered(SavingPlugin):
        plugins.unregister(SavingPlugin)


X = np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")


def _save(tmp_path, plugin_layer_first):
    """A model using the plugin's score, its pattern inside a union and its layer class."""
    inputs = keras.Input((6, 8))
    custom = keras_attn.Attention(
        num_heads=2,
        score="saving_half_dot",
        pattern=patterns.Causal() | EvenKeys(),
        name="custom",
    )
    plain = PlainAttention(num_heads=2, key_dim=4, name="plain")
    first, second = (plain, custom) if plugin_layer_first else (custom, plain)
    x = first(inputs, inputs)
    model = keras.Model(inputs, second(x, x))
    path = tmp_path / f"model_{plugin_layer_first}.keras"
    model.save(path)
    return model, path


EXPECTED_MISSING = [
    ("score", "saving_half_dot"),
    ("pattern", "saving_even_keys"),
    ("layer", "saving_plain"),
]


@pytest.mark.parametrize("plugin_layer_first", [False, True])
def test_check_file_names_every_missing_component_without_loading(
    plugin, tmp_path, monkeypatch, plugin_layer_first
):
    _, path = _save(tmp_path, plugin_layer_first)
    plugins.unregister(plugin)

    def no_loading(*args, **kwargs):
        raise AssertionError("check_file must not load the model")

    monkeypatch.setattr(keras.saving, "load_model", no_loading)
    monkeypatch.setattr(keras.saving, "deserialize_keras_object", no_loading)
    with pytest.raises(MissingComponentsError) as info:
        saving.check_file(path)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        f"The model in {str(path)!r} needs 3 keras_attn component(s) that are not installed:"
    )
    assert sorted(lines[1:4]) == sorted(
        [
            "  - score 'saving_half_dot' (providing package not recorded in the file; "
            "used by 'custom')",
            "  - pattern 'saving_even_keys' (providing package not recorded in the file; "
            "used by 'custom')",
            "  - layer 'saving_plain' (providing package not recorded in the file; "
            "used by 'plain')",
        ]
    )
    assert sorted(m[:2] for m in info.value.missing) == sorted(EXPECTED_MISSING)


def test_check_file_raises_what_loading_raises(plugin, tmp_path):
    # keras_attn's layer comes first, so loading reaches keras_attn's own check.
    _, path = _save(tmp_path, plugin_layer_first=False)
    plugins.unregister(plugin)
    with pytest.raises(MissingComponentsError) as checked:
        keras_attn.check_file(path)
    with pytest.raises(MissingComponentsError) as loading:
        keras.saving.load_model(path)
    assert checked.value.missing == loading.value.missing
    assert [m[:2] for m in loading.value.missing] == EXPECTED_MISSING
    # Same lines, only the owner differs ("The model in '...'" / "The model being loaded").
    assert str(checked.value).splitlines()[1:] == str(loading.value).splitlines()[1:]


def test_a_plugin_layer_first_fails_loading_with_keras_error_but_check_file_names_it(
    plugin, tmp_path
):
    _, path = _save(tmp_path, plugin_layer_first=True)
    plugins.unregister(plugin)
    with pytest.raises(Exception) as loading:
        keras.saving.load_model(path)
    assert not isinstance(loading.value, MissingComponentsError)
    with pytest.raises(MissingComponentsError) as checked:
        saving.check_file(path)
    assert ("layer", "saving_plain") in [m[:2] for m in checked.value.missing]


def test_check_file_returns_none_when_installed_and_the_file_then_loads(plugin, tmp_path):
    model, path = _save(tmp_path, plugin_layer_first=True)
    plugins.unregister(plugin)
    plugins.register(plugin, name="saving_test_plugin")  # installed again
    assert saving.check_file(path) is None
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(X)), model.predict(X, verbose=0), atol=1e-5
    )
    assert isinstance(loaded.get_layer("plain"), PlainAttention)
    assert isinstance(loaded.get_layer("custom").score, HalfDot)


def test_check_file_of_builtins_only_returns_none(tmp_path):
    inputs = keras.Input((6, 8))
    layer = keras_attn.LocalAttention(window=2, num_heads=2, score_mods=["softcap"])
    path = tmp_path / "builtins.keras"
    keras.Model(inputs, layer(inputs, inputs)).save(path)
    assert saving.check_file(str(path)) is None


def test_check_file_names_a_missing_builtin_by_its_recorded_package(tmp_path):
    # A file from a newer keras_attn (or a renamed plugin): the package it recorded
    # is what the message tells the user to install.
    inputs = keras.Input((6, 8))
    keras.Model(inputs, keras_attn.Attention(num_heads=2, name="att")(inputs, inputs)).save(
        tmp_path / "m.keras"
    )
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    text = json.dumps(config).replace('"name": "softmax"', '"name": "softmax_v2"')
    assert text != json.dumps(config)
    files["config.json"] = text.encode()
    with zipfile.ZipFile(tmp_path / "edited.keras", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.raises(MissingComponentsError) as info:
        saving.check_file(tmp_path / "edited.keras")
    assert info.value.missing == [
        ("normalizer", "softmax_v2", "keras_attn", keras_attn.__version__)
    ]
    assert f"provided by package keras_attn {keras_attn.__version__}; used by 'att'" in str(
        info.value
    )
    assert "pip install keras_attn" in str(info.value)


def test_check_file_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such .keras file"):
        saving.check_file(tmp_path / "absent.keras")
    (tmp_path / "text.keras").write_text("not a zip")
    with pytest.raises(ValueError, match="is not a zip archive. Received: path="):
        saving.check_file(tmp_path / "text.keras")
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as archive:
        archive.writestr("metadata.json", "{}")
    with pytest.raises(ValueError, match=r"has no config.json but \['metadata.json'\]"):
        saving.check_file(tmp_path / "empty.keras")
    with zipfile.ZipFile(tmp_path / "bad.keras", "w") as archive:
        archive.writestr("config.json", "{not json")
    with pytest.raises(ValueError, match="config.json of this .keras file is not JSON"):
        saving.check_file(tmp_path / "bad.keras")


def test_check_file_is_exported_at_the_top_level():
    assert keras_attn.check_file is saving.check_file
    assert "check_file" in keras_attn.__all__
