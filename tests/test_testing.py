"""keras_attn.testing: the checks pass on built-ins and fail on broken components.

Also the plugin author's experience end to end: the pytest fixtures, the minimal
plugin package of docs/plugins.md pip-installed and listed, and the failure modes of
installed packages (a plugin that does not import, two packages registering one
name, a component of the wrong kind, a `.keras` file needing a plugin that is not
installed), each in a fresh process as a user would meet them.
"""

import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import patterns
from keras_attn import plugins
from keras_attn import testing
from keras_attn.normalizers import Normalizer

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]

# -- the checks pass on built-ins ------------------------------------------------------------


@pytest.mark.parametrize(
    "component, kwargs",
    [
        (("score", "general"), {}),
        (("score", "cosine"), {}),
        (("score_mod", "relative_position"), {}),
        (patterns.Local(2, causal=True) | patterns.GlobalTokens(indices=[3]), {}),
        (patterns.Dilated(2) & patterns.BlockLocal(4), {"train": False}),
        (("normalizer", "softmax"), {"sums_to_one": True}),
        (("normalizer", "hard"), {"sums_to_one": True, "save": False}),
        (("normalizer", "topk"), {"sums_to_one": True, "train": False}),
        (keras_attn.LocalAttention(window=2, num_heads=2), {"train": False}),
    ],
    ids=repr,
)
def test_builtins_pass(component, kwargs):
    testing.check_component(component, **kwargs)


def test_layer_with_a_context_passes():
    testing.check_layer(
        keras_attn.CrossAttention(num_heads=2, key_dim=4), input_shapes=[(2, 5, 8), (2, 3, 6)]
    )


# -- the checks fail on broken components ------------------------------------------------


class Leaky(Normalizer):
    """Takes over `call` and forgets the mask: masked pairs get weight."""

    name = "leaky"

    def call(self, logits, mask=None, training=None):
        return ops.softmax(logits, axis=-1)


class NaNOnEmptyRows(Normalizer):
    """Masks with -inf: a row with no allowed key is NaN."""

    name = "nan_on_empty_rows"

    def call(self, logits, mask=None, training=None):
        if mask is not None:
            logits = ops.where(mask, logits, -np.inf)
        return ops.softmax(logits, axis=-1) * ops.cast(mask, logits.dtype)


class ForgetsTemperature(Normalizer):
    """`temperature` is not in get_config: the clone uses the default."""

    name = "forgets_temperature"

    def __init__(self, temperature=1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def normalize(self, logits, mask, training):
        return ops.softmax(logits / self.temperature, axis=-1)


class NotJson(keras_attn.Score):
    """Puts a numpy array into its config."""

    name = "not_json"

    def __init__(self, scale=np.array(0.5), **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, query, key):
        return ops.matmul(query, ops.swapaxes(key, -1, -2)) * float(self.scale)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


class MixesTheBatch(keras_attn.Score):
    """Centres logits over the whole tensor: slices of the leading dims are not independent."""

    name = "mixes_the_batch"

    def call(self, query, key):
        logits = ops.matmul(query, ops.swapaxes(key, -1, -2))
        return logits - ops.mean(logits)


class RowIndexBias(keras_attn.ScoreMod):
    """Uses 0-based row indices instead of the positions it is given."""

    name = "row_index_bias"

    def call(self, logits, positions=None):
        rows = ops.arange(ops.shape(logits)[-2], dtype="float32")[:, None]
        return logits - ops.cast(rows, logits.dtype)


class FirstHalf(keras_attn.Pattern):
    """Depends on the key length, not on positions alone."""

    name = "first_half"

    def mask(self, positions):
        length = positions.key.shape[-1]
        return ops.logical_and(positions.key < length // 2, positions.query >= 0)


class ClaimsCausal(keras_attn.Pattern):
    """Says it is causal, but lets queries see the next key."""

    name = "claims_causal"
    causal = True

    def mask(self, positions):
        return positions.key <= positions.query + 1


class DropsBlocks(patterns.Local):
    """A closed-form block_mask that forgets the blocks above the diagonal."""

    name = "drops_blocks"

    def block_mask(self, query_length, key_length, block_size, query_offset=0):
        return np.tril(super().block_mask(query_length, key_length, block_size, query_offset))


class NoName(keras_attn.Score):
    def call(self, query, key):
        return ops.matmul(query, ops.swapaxes(key, -1, -2))


class ForgetsWindow(keras_attn.Attention):
    """A layer whose get_config drops a constructor argument."""

    name = "forgets_window"

    def __init__(self, window=2, **kwargs):
        kwargs.pop("pattern", None)
        super().__init__(pattern=patterns.Local(window), **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("pattern")
        return config


@pytest.mark.parametrize(
    "check, component, message",
    [
        (testing.check_normalizer, Leaky, "masked-out pairs get non-zero weight"),
        (testing.check_normalizer, NaNOnEmptyRows, "a row with no allowed key"),
        (testing.check_normalizer, ForgetsTemperature(0.25), "the clone from get_config"),
        (testing.check_score, NotJson, "not JSON-serializable"),
        (testing.check_score, MixesTheBatch, "leading dims"),
        (testing.check_score, NoName, "set the class attribute `name`"),
        (testing.check_score, patterns.Causal, "expected a subclass of keras_attn.Score"),
        (testing.check_score_mod, RowIndexBias, "positions in that layout"),
        (testing.check_pattern, FirstHalf, "function of each"),
        (testing.check_pattern, ClaimsCausal, "`causal` is True"),
        (testing.check_pattern, DropsBlocks(3), "leaves out blocks holding allowed pairs"),
        (testing.check_layer, ForgetsWindow(window=1, num_heads=2), "the clone from get_config"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_broken_components_fail(keras_attn_tmp_plugin, check, component, message):
    cls = component if isinstance(component, type) else type(component)
    if cls.__module__ == __name__ and cls is not NoName:
        keras_attn_tmp_plugin(cls)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(component, train=False)


def test_the_message_names_the_component():
    with pytest.raises(AssertionError, match=r"normalizer test_testing\.Leaky \(name='leaky'\)"):
        testing.check_normalizer(Leaky, save=False)


def test_unregistered_component_cannot_be_saved():
    class Fine(keras_attn.Score):
        name = "fine_but_unregistered"

        def call(self, query, key):
            return ops.matmul(query, ops.swapaxes(key, -1, -2))

    testing.check_score(Fine, save=False, train=False)
    with pytest.raises(AssertionError, match="not registered.*keras_attn_tmp_plugin"):
        testing.check_score(Fine, train=False)


def test_check_component_by_name_and_of_non_components():
    with pytest.raises(AssertionError, match="Unknown normalizer 'no_such'"):
        testing.check_component(("normalizer", "no_such"))
    with pytest.raises(AssertionError, match="Not a keras_attn component"):
        testing.check_component(int)


def test_registered_is_undone_after_the_block():
    with testing.registered(Leaky, ClaimsCausal):
        assert plugins.get("normalizer", "leaky") is Leaky
        assert plugins.get("pattern", "claims_causal") is ClaimsCausal
    assert "leaky" not in plugins.names("normalizer")
    assert "claims_causal" not in plugins.names("pattern")


def test_registered_can_force_the_wrong_kind():
    with pytest.raises(keras_attn.ComponentKindError, match="expected a subclass of"):
        with testing.registered(score=[ClaimsCausal]):
            pass
    assert "claims_causal" not in plugins.names("pattern")


# -- the pytest plugin ---------------------------------------------------------------------


def test_fixtures_are_offered_by_the_pytest11_entry_point(pytester):
    pytester.makepyfile(
        """
        import keras_attn
        from keras import ops

        class Doubled(keras_attn.Score):
            name = "doubled_dot"

            def call(self, query, key):
                return 2 * ops.matmul(query, ops.swapaxes(key, -1, -2))

        def test_check(keras_attn_check, keras_attn_tmp_plugin):
            keras_attn_tmp_plugin(Doubled)
            assert keras_attn.plugins.get("score", "doubled_dot") is Doubled
            keras_attn_check(Doubled, train=False)
            keras_attn_check.score(Doubled, train=False)

        def test_unregistered_afterwards():
            assert "doubled_dot" not in keras_attn.plugins.names("score")
        """
    )
    result = pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


# -- installed packages: the author's guide and the failure modes ----------------------------


def hook_examples():
    """The python example of each ``## register_*`` section of docs/plugins.md."""
    markdown = (ROOT / "docs" / "plugins.md").read_text()
    sections = re.split(r"^## ", markdown, flags=re.M)
    examples = {}
    for section in sections:
        title = section.split("\n", 1)[0].strip()
        if title.startswith("register_"):
            blocks = re.findall(r"```python\n(.*?)```", section, re.S)
            assert len(blocks) == 1, title
            examples[title] = blocks[0]
    return examples


@pytest.mark.parametrize("hook", sorted(plugins.KINDS.values()))
def test_hook_examples_of_the_guide_run_and_pass_the_checks(hook, capsys):
    code = hook_examples()[hook]
    module = types.ModuleType(f"guide_{hook}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, f"docs/plugins.md ({hook})", "exec"), module.__dict__)
        entries = [e for e in plugins.entries() if e.cls.__module__ == module.__name__]
        assert [e.kind for e in entries] == [hook.removeprefix("register_").removesuffix("s")]
        for entry in entries:
            testing.check_component(entry.cls, train=False)
    finally:
        if any(e.cls.__module__ == module.__name__ for e in plugins.entries()):
            plugins.unregister(module)
        del sys.modules[module.__name__]
    assert capsys.readouterr().out  # each example prints what it made


def doc_files(markdown):
    """The files of docs/plugins.md's minimal package: ``<!-- file: path -->`` + a block."""
    pattern = re.compile(r"<!-- file: (\S+) -->\s*```[a-z]*\n(.*?)```", re.S)
    return {path: body for path, body in pattern.findall(markdown)}


def write_package(root, files):
    for path, body in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(body))


def pip_install(source, target):
    """pip-install `source` into the folder `target`, as a user would (no network)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def run_python(code, path=None, **env):
    """Run `code` in a fresh interpreter, with `path` (an install target) importable.

    The JAX backend imports in half the time of TensorFlow; what these processes
    check (plugin discovery, messages, `.keras` files) does not depend on the backend.
    """
    environ = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "jax"}
    environ.pop(plugins.DISABLE_AUTOLOAD_ENV, None)
    environ.update(env)
    if path is not None:
        environ["PYTHONPATH"] = os.pathsep.join([str(path), environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=300, env=environ, cwd=str(ROOT),
    )  # fmt: skip


def plugin_package(root, dist_name, module, source, entry_point=None, version="0.3.0"):
    """A one-module plugin package, written like the guide's minimal package."""
    entry_point = entry_point or module
    files = {
        "pyproject.toml": f"""
            [build-system]
            requires = ["setuptools>=64"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist_name}"
            version = "{version}"

            [project.entry-points.keras_attn]
            {entry_point} = "{module}"

            [tool.setuptools]
            py-modules = ["{module}"]
            """,
        f"{module}.py": source,
    }
    write_package(root / dist_name, files)
    return root / dist_name


@pytest.mark.slow
def test_minimal_package_of_the_guide_installs_lists_and_saves(tmp_path):
    files = doc_files((ROOT / "docs" / "plugins.md").read_text())
    assert any(p.endswith("pyproject.toml") for p in files) and len(files) == 2, files
    write_package(tmp_path / "src", files)
    source = (tmp_path / "src" / next(iter(files))).parent
    target = tmp_path / "site"
    pip_install(source, target)
    model_path = tmp_path / "model.keras"
    listed = run_python(
        f"""
        import io, keras, numpy as np, keras_attn
        from keras_attn import cli
        out = io.StringIO()
        assert cli.main(["plugins"], out=out) == 0
        print(out.getvalue())
        entry = keras_attn.plugins.get_entry("score", "l1")
        print("ENTRY", entry.distribution, entry.version)
        inputs = keras.Input((5, 8))
        outputs = keras_attn.Attention(num_heads=2, score="l1")(inputs)
        keras.Model(inputs, outputs).save({str(model_path)!r})
        """,
        path=target,
    )
    assert listed.returncode == 0, listed.stderr
    assert "ENTRY keras-attn-l1 0.1.0" in listed.stdout
    assert re.search(r"^\s+l1\s+keras-attn-l1 0\.1\.0\s+plugin l1$", listed.stdout, re.M)
    # Where the package is not installed, the .keras file names what is missing.
    missing = run_python(
        f"""
        import keras
        import keras_attn
        keras.saving.load_model({str(model_path)!r})
        """
    )
    assert missing.returncode != 0
    # ...and the package the file recorded for it.
    message = "score 'l1' (provided by package keras-attn-l1 0.1.0; used by 'attention')"
    assert message in missing.stderr, missing.stderr[-3000:]
    assert "pip install keras-attn-l1" in missing.stderr


@pytest.mark.slow
def test_installed_plugin_that_fails_to_import(tmp_path):
    source = plugin_package(
        tmp_path, "keras-attn-broken", "keras_attn_broken", "import no_such_dependency\n"
    )
    pip_install(source, tmp_path / "site")
    done = run_python(
        f"""
        import os, sys
        from keras_attn import cli
        print("FIRST", cli.main(["plugins"]))
        os.environ[{plugins.DISABLE_AUTOLOAD_ENV!r}] = "1"
        print("THEN", cli.main(["plugins"]))
        """,
        path=tmp_path / "site",
    )
    assert done.returncode == 0, done.stderr
    assert "FIRST 2" in done.stdout and "THEN 0" in done.stdout
    assert (
        "The keras_attn plugin 'keras_attn_broken' (package keras-attn-broken 0.3.0) failed "
        "to import 'keras_attn_broken': ModuleNotFoundError: No module named "
        "'no_such_dependency'"
    ) in done.stderr
    assert plugins.DISABLE_AUTOLOAD_ENV in done.stderr


@pytest.mark.slow
def test_installed_plugins_registering_one_name(tmp_path):
    # Both packages register a normalizer "entmax15"; keras-attn-entmax is installed too.
    source = """
        import keras_attn
        from keras import ops

        class Entmax15(keras_attn.Normalizer):
            name = "entmax15"

            def normalize(self, logits, mask, training):
                return ops.softmax(logits, axis=-1)

        @keras_attn.hookimpl
        def register_normalizers(register):
            register(Entmax15)
        """
    pip_install(
        plugin_package(tmp_path, "keras-attn-fake-entmax", "zz_fake_entmax", source),
        tmp_path / "site",
    )
    done = run_python(
        "import keras_attn; keras_attn.plugins.names('normalizer')", tmp_path / "site"
    )
    assert "DuplicateComponentError" in done.stderr
    assert re.search(
        r"Two plugins register a normalizer named 'entmax15': "
        r"keras_attn_entmax\.normalizers\.Entmax15 from plugin 'entmax' \(package "
        r"keras-attn-entmax 0\.1\.0\) and zz_fake_entmax\.Entmax15 from plugin "
        r"'zz_fake_entmax' \(package keras-attn-fake-entmax 0\.3\.0\)",
        done.stderr,
    ), done.stderr


@pytest.mark.slow
def test_installed_plugin_registering_the_wrong_kind(tmp_path):
    source = """
        import keras_attn

        class Diagonal(keras_attn.Pattern):
            name = "diagonal"

            def mask(self, positions):
                return positions.query == positions.key

        @keras_attn.hookimpl
        def register_scores(register):
            register(Diagonal)
        """
    pip_install(
        plugin_package(tmp_path, "keras-attn-diagonal", "keras_attn_diagonal", source),
        tmp_path / "site",
    )
    done = run_python("import keras_attn; keras_attn.plugins.names('score')", tmp_path / "site")
    assert (
        "ComponentKindError: register_scores: expected a subclass of keras_attn.Score "
        "(a score). Received: keras_attn_diagonal.Diagonal, which is a pattern, from plugin "
        "'keras_attn_diagonal' (package keras-attn-diagonal 0.3.0)"
    ) in done.stderr, done.stderr


def test_value_and_grads_against_hand_derived_gradients():
    # f(x, W) = sum((x W)^2): df/dx = 2 (x W) Wᵀ, df/dW = 2 xᵀ (x W).
    layer = keras.layers.Dense(3, use_bias=False)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    layer.build(x.shape)
    w = ops.convert_to_numpy(layer.kernel)

    def f(x):
        out = layer(x)
        return ops.sum(out**2), out

    value, (d_x, d_w), aux = testing.value_and_grads(
        f, x, variables=layer.trainable_variables, has_aux=True
    )
    xw = x @ w
    np.testing.assert_allclose(value, (xw**2).sum(), rtol=1e-5)
    np.testing.assert_allclose(d_x, 2 * xw @ w.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_w, 2 * x.T @ xw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(aux), xw, rtol=1e-5, atol=1e-6)
    # An input the function ignores gets a zero gradient, not None.
    _, (d_x, d_unused) = testing.value_and_grads(lambda x, u: ops.sum(x), x, np.ones(2, "float32"))
    np.testing.assert_array_equal(d_x, np.ones_like(x))
    np.testing.assert_array_equal(d_unused, np.zeros(2))


# -- position encodings --------------------------------------------------------------


def test_check_position_encoding_passes_rope():
    testing.check_position_encoding(plugins.get("position_encoding", "rope"))
    testing.check_component(("position_encoding", "rope"), train=False, save=False)


class _IgnoresPositions(keras_attn.PositionEncoding):
    name = "ignores_positions"

    def call(self, query, key, positions=None):
        return query * 2.0, key


class _FromCallStart(keras_attn.PositionEncoding):
    """Encodes position i of each call, not the absolute position: wrong under a cache."""

    name = "from_call_start"

    def call(self, query, key, positions=None):
        steps = ops.cast(ops.arange(ops.shape(query)[-2]), query.dtype)[:, None]
        return query + 0.1 * steps, key + 0.1 * steps


@pytest.mark.parametrize(
    "cls,message",
    [
        (_IgnoresPositions, "the positions are ignored"),
        (_FromCallStart, "positions from T/2"),
    ],
)
def test_check_position_encoding_reports_what_is_wrong(cls, message):
    with testing.registered(cls):
        with pytest.raises(AssertionError, match=message):
            testing.check_position_encoding(cls)


class _MaskReading(Normalizer):
    """A plugin normalizer that assumes a mask is always given (the issue 18 report)."""

    name = "test_mask_reading"

    def normalize(self, logits, mask, training):
        allowed = ops.cast(mask, "float32")  # fails on mask=None
        return ops.softmax(logits, axis=-1) * allowed


def test_a_normalizer_that_crashes_fails_the_check_saying_where():
    # A crash inside the plugin is reported as a failed check, not an error of the check.
    with pytest.raises(
        AssertionError, match=r"test_mask_reading.*raised \w+ when called with mask=None"
    ):
        testing.check_normalizer(_MaskReading)
    np.testing.assert_allclose(
        _np_weights(_MaskReading()), _np_weights(keras_attn.normalizers.Softmax()), atol=1e-6
    )


def _np_weights(normalizer):
    logits = np.arange(6, dtype="float32").reshape(1, 2, 3)
    mask = np.array([[[True, True, False], [True, False, True]]])
    return ops.convert_to_numpy(normalizer(logits, mask=mask))


def test_registering_a_class_its_installed_plugin_registered_is_a_no_op():
    # docs/plugins.md's `keras_attn_tmp_plugin(L1)` keeps passing once L1's package is
    # installed: the same class under the same name is not registered twice.
    softmax = plugins.get("normalizer", "softmax")
    with testing.registered(softmax) as plugin:
        assert plugins.get("normalizer", "softmax") is softmax
    assert plugin == []  # nothing was registered
    assert plugins.get("normalizer", "softmax") is softmax
