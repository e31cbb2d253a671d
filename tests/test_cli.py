"""The keras-attn command line, called in-process and as the installed console script."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


SCRIPT = shutil.which("keras-attn", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(SCRIPT is None, reason="keras_attn is not installed as a package")
def test_console_script_is_installed():
    result = subprocess.run(
        [SCRIPT, "pattern", "causal", "--length", "3", "--ascii"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "#.." in result.stdout and "##." in result.stdout and "###" in result.stdout
