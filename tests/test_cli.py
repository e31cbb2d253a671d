"""The keras-attn command line, called in-process and as the installed console script."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras_attn
from keras_attn import cli
from keras_attn import plugins
from keras_attn import viz


def run(*argv):
    out = io.StringIO()
    rc = cli.main(list(argv), out=out)
    return rc, out.getvalue()


def test_plugins_lists_every_component_with_its_plugin_and_version():
    rc, text = run("plugins")
    assert rc == 0
    sections, kind = {}, None
    for line in text.splitlines():
        if not line.startswith(" "):
            kind = line.split("s (")[0]
        else:
            sections[kind, line.split()[0]] = line
    for entry in plugins.entries():
        line = sections[entry.kind, entry.name]
        assert entry.plugin in line
        if entry.distribution:
            assert f"{entry.distribution} {entry.version}" in line
    for kind in plugins.KINDS:
        assert f"{kind}s ({len(plugins.names(kind))})" in text


def test_plugins_json_matches_the_registry():
    rc, text = run("plugins", "--json")
    rows = json.loads(text)
    assert rc == 0
    assert {(r["kind"], r["name"]) for r in rows} == {(e.kind, e.name) for e in plugins.entries()}
    assert {r["version"] for r in rows if r["plugin"].startswith("keras_attn.")} == {"0.1.0"}


def _drawn_mask(text):
    rows = [line.split(" ", 1)[1] for line in text.splitlines()[1:-1]]
    return np.array([[c == "#" for c in row] for row in rows])


def test_pattern_draws_the_mask_of_a_causal_local_window():
    rc, text = run("pattern", "local", "--length", "9", "--window", "3", "--causal", "--ascii")
    assert rc == 0
    i, j = np.arange(9)[:, None], np.arange(9)[None, :]
    expected = (i - j >= 0) & (i - j < 3)
    np.testing.assert_array_equal(_drawn_mask(text), expected)
    assert text.splitlines()[-1].startswith(f"{expected.sum()} of 81 pairs allowed")


def test_pattern_from_json_config_with_offset_and_query_length():
    config = {
        "name": "union",
        "config": {
            "patterns": [
                {"name": "local", "config": {"window": 2}},
                {"name": "global_tokens", "config": {"num_tokens": 1}},
            ]
        },
    }
    rc, text = run(
        "pattern", "--length", "8", "--query-length", "3", "--offset", "4",
        "--config", json.dumps(config), "--ascii",
    )  # fmt: skip
    assert rc == 0
    i, j = np.arange(4, 7)[:, None], np.arange(8)[None, :]
    expected = (np.abs(i - j) < 2) | (i == 0) | (j == 0)
    np.testing.assert_array_equal(_drawn_mask(text), expected)
    assert text.splitlines()[1].startswith("4 ")


def test_unknown_pattern_is_an_error_listing_the_names(capsys):
    rc, _ = run("pattern", "nope", "--length", "4")
    assert rc == 2
    err = capsys.readouterr().err
    assert "Unknown pattern 'nope'" in err and "'local'" in err and "plugin" in err


def test_missing_pattern_argument_names_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        run("pattern", "local", "--length", "4")
    assert info.value.code == 2
    assert "--window" in capsys.readouterr().err


def test_bad_length_is_an_error(capsys):
    with pytest.raises(SystemExit):
        run("pattern", "causal", "--length", "0")
    assert "Received: --length=0" in capsys.readouterr().err


def test_render_mask_rejects_non_2d_input():
    with pytest.raises(ValueError, match="Received: mask.shape"):
        viz.render_mask(np.ones((2, 2, 2), bool))


def test_name_and_config_together_is_an_error_not_a_choice(capsys):
    config = json.dumps({"name": "causal", "config": {}})
    with pytest.raises(SystemExit) as info:
        run("pattern", "local", "--window", "2", "--length", "4", "--config", config)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "not both" in err and "Received: NAME='local' and --config=" in err


def test_pattern_without_name_or_config_says_what_to_give(capsys):
    with pytest.raises(SystemExit):
        run("pattern", "--length", "4")
    assert "give a pattern NAME or --config JSON" in capsys.readouterr().err


def _help(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        run(*argv, "--help")
    assert info.value.code == 0
    return capsys.readouterr().out


def test_pattern_help_lists_the_patterns_arguments_with_defaults_and_docs(capsys):
    text = _help(capsys, "pattern", "local")
    assert text.startswith("usage: keras-attn pattern local")
    assert "Sliding window" in text  # the class docstring's summary
    section = text.split("arguments of pattern 'local':")[1]
    assert "--window WINDOW" in section and "(required) Positive integer" in section
    assert "--causal, --no-causal" in section and "(default: False)" in section
    assert "--length" in text  # the drawing options are there too


def test_every_registered_pattern_lists_every_constructor_argument(capsys):
    for name in plugins.names("pattern"):
        text = _help(capsys, "pattern", name).split(f"arguments of pattern {name!r}:")[1]
        for param in cli._pattern_parameters(plugins.get("pattern", name)):
            assert "--" + param.name.replace("_", "-") in text, (name, param.name)


def test_pattern_help_without_a_name_points_to_the_names(capsys):
    text = _help(capsys, "pattern")
    assert "keras-attn pattern NAME --help" in text and "--config" in text


class FirstKeys(keras_attn.Pattern):
    """Only the first keys.

    Args:
        length: How many keys, from the start, every query sees.
    """

    name = "test_cli_first_keys"

    def __init__(self, length=1):
        self.length = length

    def mask(self, positions):
        return positions.key < self.length

    def get_config(self):
        return {"length": self.length}


class _Plugin:
    @keras_attn.hookimpl
    def register_patterns(self, register):
        register(FirstKeys)


@pytest.fixture
def first_keys_plugin():
    plugin = _Plugin()
    plugins.register(plugin, name="test_cli_plugin")
    yield plugin
    plugins.unregister(plugin)


def test_a_pattern_argument_named_like_an_option_gets_a_prefix(first_keys_plugin, capsys):
    assert "--pattern-length LENGTH" in _help(capsys, "pattern", FirstKeys.name)
    rc, text = run(
        "pattern", FirstKeys.name, "--length", "4", "--pattern-length", "2", "--ascii"
    )  # fmt: skip
    assert rc == 0
    np.testing.assert_array_equal(_drawn_mask(text), np.arange(4)[None, :].repeat(4, 0) < 2)


BACKENDS = ("keras", "tensorflow", "jax", "jaxlib", "torch")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["pattern", "--help"]])
def test_help_and_version_import_no_keras_and_no_backend(argv):
    code = f"""
import json, sys
from keras_attn import cli
try:
    cli.main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({BACKENDS!r}))))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_version_is_the_installed_version(capsys):
    with pytest.raises(SystemExit) as info:
        run("--version")
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"keras-attn {keras_attn.__version__}"


SCRIPT = shutil.which("keras-attn", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(SCRIPT is None, reason="keras_attn is not installed as a package")
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_console_script_answers_help_and_version_without_importing_a_backend(flag):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", SCRIPT, flag], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()}
    assert "keras_attn" in imported and not imported & set(BACKENDS)
    assert result.stdout.startswith("usage: keras-attn" if flag == "--help" else "keras-attn ")


@pytest.mark.skipif(SCRIPT is None, reason="keras_attn is not installed as a package")
def test_console_script_is_installed():
    result = subprocess.run(
        [SCRIPT, "pattern", "causal", "--length", "3", "--ascii"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "#.." in result.stdout and "##." in result.stdout and "###" in result.stdout
