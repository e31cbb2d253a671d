"""The plugin system (keras_attn.plugins), exercised with real plugins.

In-process plugins are registered with `keras_attn.plugins.register`; entry-point
plugins are real distributions (a module and a ``*.dist-info`` folder) written to a
temporary directory and put on ``sys.path``, found by ``importlib.metadata`` exactly
as an installed package is.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

import keras_attn
from keras_attn import hookimpl
from keras_attn import patterns as patterns_module
from keras_attn import plugins
from keras_attn.errors import ComponentKindError
from keras_attn.errors import DuplicateComponentError
from keras_attn.errors import MissingComponentsError
from keras_attn.errors import PluginError
from keras_attn.errors import PluginImportError
from keras_attn.errors import UnknownComponentError

# DESIGN.md section 1: the built-ins of each kind.
BUILTIN_NAMES = {
    "score": {"dot", "scaled_dot", "general", "additive", "cosine"},
    "score_mod": {"softcap", "relative_position"},
    "pattern": {
        "full",
        "causal",
        "local",
        "dilated",
        "strided",
        "block_local",
        "global_tokens",
    },
    "normalizer": {"softmax", "hard", "topk", "sparsemax"},
}
BUILTIN_LAYERS = (
    keras_attn.Attention,
    keras_attn.SoftAttention,
    keras_attn.HardAttention,
    keras_attn.GlobalAttention,
    keras_attn.LocalAttention,
    keras_attn.SelfAttention,
    keras_attn.CrossAttention,
    keras_attn.MultiHeadAttention,
)


# -- a complete in-process plugin: one component of every kind --------------------------


class LearnedScale(keras_attn.Score):
    """``s * q · k`` with a learned scalar ``s``."""

    name = "test_learned_scale"

    def __init__(self, initial=0.5, **kwargs):
        super().__init__(**kwargs)
        self.initial = initial

    def build(self, query_shape, key_shape=None):
        self.scale = self.add_weight(
            name="scale", shape=(), initializer=keras.initializers.Constant(self.initial)
        )

    def call(self, query, key):
        return ops.matmul(query, ops.swapaxes(key, -1, -2)) * ops.cast(self.scale, query.dtype)

    def get_config(self):
        return {**super().get_config(), "initial": self.initial}


class DistancePenalty(keras_attn.ScoreMod):
    """``logits - slope * |i - j|``."""

    name = "test_distance_penalty"

    def __init__(self, slope=0.25, **kwargs):
        super().__init__(**kwargs)
        self.slope = slope

    def call(self, logits, positions=None):
        distance = ops.abs(positions.query - positions.key)
        return logits - self.slope * ops.cast(distance, logits.dtype)

    def get_config(self):
        return {**super().get_config(), "slope": self.slope}


class StridedOrSelf(keras_attn.Pattern):
    """Key j is visible to query i if ``j % stride == 0`` or ``j == i``."""

    name = "test_strided_or_self"

    def __init__(self, stride=3):
        self.stride = stride

    def mask(self, positions):
        on_stride = ops.equal(ops.mod(positions.key, self.stride), 0)
        return ops.logical_or(on_stride, ops.equal(positions.query, positions.key))

    def get_config(self):
        return {"stride": self.stride}


class Tempered(keras_attn.Normalizer):
    """Softmax of ``logits / temperature``."""

    name = "test_tempered"

    def __init__(self, temperature=2.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def normalize(self, logits, mask, training):
        return ops.softmax(logits / self.temperature, axis=-1)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


class ResidualAttention(keras_attn.Attention):
    """A layer a plugin builds on keras_attn: ``query + alpha * attention(query, ...)``."""

    registry_name = "test_residual"

    def __init__(self, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        self.alpha = alpha

    def call(self, query, value=None, key=None, **kwargs):
        return query + self.alpha * super().call(query, value, key, **kwargs)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


class ExamplePlugin:
    """Implements all five hooks, as a third-party plugin module would."""

    @hookimpl
    def register_scores(self, register):
        register(LearnedScale)

    @hookimpl
    def register_score_mods(self, register):
        register(DistancePenalty)

    @hookimpl
    def register_patterns(self, register):
        register(StridedOrSelf)

    @hookimpl
    def register_normalizers(self, register):
        register(Tempered)

    @hookimpl
    def register_layers(self, register):
        register(ResidualAttention)


PLUGIN_NAMES = {
    "score": "test_learned_scale",
    "score_mod": "test_distance_penalty",
    "pattern": "test_strided_or_self",
    "normalizer": "test_tempered",
    "layer": "test_residual",
}


@pytest.fixture
def example_plugin():
    plugin = ExamplePlugin()
    plugins.register(plugin, name="example_plugin")
    yield plugin
    if plugins.load().pm.is_registered(plugin):
        plugins.unregister(plugin)


# -- numpy reference of Attention with the example plugin's components ---------------


def np_plugin_attention(x, weights, scale, slope, stride, temperature):
    """Self-attention of `x (B, T, E)` with LearnedScale, DistancePenalty,
    StridedOrSelf and Tempered, given the layer's projection weights."""
    wq, bq, wk, bk, wv, bv, wo, bo = weights
    q = np.einsum("btc,chd->bhtd", x, wq) + bq[None, :, None, :]  # (B, H, T, D)
    k = np.einsum("btc,chd->bhtd", x, wk) + bk[None, :, None, :]
    v = np.einsum("btc,chd->bhtd", x, wv) + bv[None, :, None, :]
    t = x.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    logits = scale * q @ k.swapaxes(-1, -2) - slope * np.abs(i - j)  # (B, H, T, T)
    allowed = (j % stride == 0) | (i == j)
    z = np.where(allowed, logits / temperature, -np.inf)
    w = np.exp(z - z.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out = w @ v  # (B, H, T, D)
    return np.einsum("bhtd,hde->bte", out, wo) + bo, w


# -- built-ins go through the same hooks -------------------------------------------------


def test_builtins_are_plugins_of_the_plugin_manager():
    pm = plugins.load().pm
    for plugin_name, module_name in plugins.BUILTIN_PLUGINS.items():
        plugin = pm.get_plugin(plugin_name)
        assert plugin is sys.modules[module_name]
        hooks = {caller.name for caller in pm.get_hookcallers(plugin)}
        assert len(hooks) == 1 and hooks <= set(plugins.KINDS.values())


@pytest.mark.parametrize("kind", sorted(BUILTIN_NAMES))
def test_every_builtin_component_is_registered(kind):
    assert BUILTIN_NAMES[kind] <= set(plugins.names(kind))
    for name in BUILTIN_NAMES[kind]:
        entry = plugins.get_entry(kind, name)
        assert entry.plugin == f"keras_attn.{kind}s"
        assert (entry.distribution, entry.version) == ("keras_attn", keras_attn.__version__)
        assert issubclass(entry.cls, plugins.base_class(kind))
        assert entry.cls.name == name


def test_every_builtin_layer_is_registered():
    registered = {e.cls: e for e in plugins.entries("layer")}
    for cls in BUILTIN_LAYERS:
        assert registered[cls].plugin == "keras_attn.layers"
        assert plugins.get("layer", registered[cls].name) is cls


def test_the_registry_imported_first_knows_every_kind():
    # The registry sits below the components and never imports them: keras_attn.components
    # declares its base classes when it is imported. Imported on its own, the registry
    # still names every kind and hook, and finds every base class.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys
                from keras_attn import plugins
                print("components:", "keras_attn.components" in sys.modules)
                print("hooks:", plugins.KINDS["score"], plugins.KINDS["position_encoding"])
                base = plugins.base_class("score")
                from keras_attn import components, testing
                print("score base:", base is components.Score)
                print("pattern:", plugins.kind_of(components.Union))
                import keras
                try:
                    testing.check_score(keras.layers.Dense)
                except AssertionError as e:
                    print("check:", e)
                """
            ),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "components: False" in done.stdout
    assert "hooks: register_scores register_position_encodings" in done.stdout
    assert "score base: True" in done.stdout and "pattern: pattern" in done.stdout
    assert "expected a subclass of keras_attn.Score; it is a layer" in done.stdout


def test_define_kind_takes_a_known_kind_and_a_class():
    with pytest.raises(ValueError, match="Unknown component kind.*kind='scores'"):
        plugins.define_kind("scores", keras_attn.Score)
    with pytest.raises(TypeError, match="must be a class. Received: base='Score'"):
        plugins.define_kind("score", "Score")
    assert plugins.base_class("score") is keras_attn.Score


def test_builtins_are_keras_serializable_before_any_lookup():
    # Keras looks classes up by registered name when loading a `.keras` file; the
    # built-ins must be there as soon as keras_attn is imported.
    for kind in ("score", "normalizer", "layer"):
        for entry in plugins.entries(kind):
            if entry.plugin.startswith("keras_attn."):
                name = keras.saving.get_registered_name(entry.cls)
                assert keras.saving.get_registered_object(name) is entry.cls


def test_entries_and_names_reject_unknown_kind():
    with pytest.raises(ValueError, match="Received: kind='scores'"):
        plugins.entries("scores")
    with pytest.raises(ValueError, match="Received: kind='nope'"):
        plugins.get("nope", "dot")


# -- in-process plugins ----------------------------------------------------------------


def test_register_makes_every_kind_available(example_plugin):
    for kind, name in PLUGIN_NAMES.items():
        entry = plugins.get_entry(kind, name)
        assert entry.plugin == "example_plugin"
        assert (entry.distribution, entry.version) == (None, None)
        assert name in plugins.names(kind)
        assert entry in plugins.entries()
    assert plugins.get("layer", "test_residual") is ResidualAttention


def test_unregister_removes_every_component(example_plugin):
    plugins.unregister(example_plugin)
    for kind, name in PLUGIN_NAMES.items():
        assert name not in plugins.names(kind)
        with pytest.raises(UnknownComponentError):
            plugins.get(kind, name)
    # ...and Keras forgets the classes keras_attn registered for it.
    assert keras.saving.get_registered_object("keras_attn.score>test_learned_scale") is None
    # Built-ins are untouched.
    assert BUILTIN_NAMES["score"] <= set(plugins.names("score"))


def test_plugin_classes_are_keras_serializable(example_plugin):
    for kind, cls in (("score", LearnedScale), ("normalizer", Tempered), ("layer", None)):
        cls = cls or ResidualAttention
        name = keras.saving.get_registered_name(cls)
        assert name == f"keras_attn.{kind}>{PLUGIN_NAMES[kind]}"
        assert keras.saving.get_registered_object(name) is cls


def test_register_returns_the_plugin_and_defaults_its_name():
    class NamedByClass:
        @hookimpl
        def register_normalizers(register):
            register(Tempered)

    assert plugins.register(NamedByClass) is NamedByClass
    try:
        assert plugins.get_entry("normalizer", "test_tempered").plugin == "NamedByClass"
    finally:
        plugins.unregister(NamedByClass)


def test_register_twice_and_unregister_unknown_are_errors(example_plugin):
    with pytest.raises(PluginError, match="already registered"):
        plugins.register(example_plugin, name="another_name")
    with pytest.raises(PluginError, match="already registered"):
        plugins.register(ExamplePlugin(), name="example_plugin")
    with pytest.raises(PluginError, match="Not a registered"):
        plugins.unregister(ExamplePlugin())


def test_plugin_components_work_in_a_layer_by_name(example_plugin):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 8)).astype("float32")
    layer = keras_attn.Attention(
        num_heads=2,
        score={"name": "test_learned_scale", "config": {"initial": 0.7}},
        score_mods=["test_distance_penalty"],
        pattern={"name": "test_strided_or_self", "config": {"stride": 3}},
        normalizer="test_tempered",
    )
    out, scores = layer(x, x, return_attention_scores=True)
    assert isinstance(layer.score, LearnedScale)
    assert isinstance(layer.score_mods[0], DistancePenalty)
    assert isinstance(layer.pattern, StridedOrSelf)
    assert isinstance(layer.normalizer, Tempered)
    expected, expected_scores = np_plugin_attention(
        x, layer.get_weights()[:8], scale=0.7, slope=0.25, stride=3, temperature=2.0
    )
    np.testing.assert_allclose(ops.convert_to_numpy(scores), expected_scores, atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(out), expected, atol=1e-5)


def test_plugin_layer_by_name(example_plugin):
    cls = plugins.get("layer", "test_residual")
    layer = plugins.resolve("layer", {"name": "test_residual", "config": {"alpha": 2.0}})
    assert type(layer) is cls and layer.alpha == 2.0
    x = np.random.default_rng(1).normal(size=(2, 5, 4)).astype("float32")
    plain = keras_attn.Attention()
    plain.build(x.shape)
    layer.build(x.shape)
    layer.set_weights(plain.get_weights())
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(x)), x + 2.0 * ops.convert_to_numpy(plain(x, x)), atol=1e-5
    )


# -- resolve and serialize -------------------------------------------------------------


def test_resolve_name_builds_the_registered_class():
    score = plugins.resolve("score", "cosine")
    assert type(score) is plugins.get("score", "cosine")


def test_resolve_config_dict_passes_the_config():
    mod = plugins.resolve("score_mod", {"name": "softcap", "config": {"cap": 3.0}})
    assert mod.cap == 3.0
    pattern = plugins.resolve("pattern", {"name": "local", "config": {"window": 4}})
    assert pattern == keras_attn.patterns.Local(4)
    assert plugins.resolve("pattern", {"name": "full"}) == keras_attn.patterns.Full()


def test_resolve_passes_defaults_to_names_and_dicts_only():
    policy = keras.DTypePolicy("float16")
    assert plugins.resolve("normalizer", "softmax", dtype=policy).dtype_policy.name == "float16"
    from_dict = plugins.resolve("score", {"name": "dot", "config": {}}, dtype=policy)
    assert from_dict.dtype_policy.name == "float16"
    instance = keras_attn.normalizers.Softmax()
    assert plugins.resolve("normalizer", instance, dtype=policy) is instance
    assert instance.dtype_policy.name == "float32"


def test_resolve_returns_instances_as_they_are(example_plugin):
    for kind, obj in (
        ("score", LearnedScale(0.1)),
        ("score_mod", DistancePenalty()),
        ("pattern", StridedOrSelf(2)),
        ("normalizer", Tempered()),
        ("layer", ResidualAttention()),
    ):
        assert plugins.resolve(kind, obj) is obj


@pytest.mark.parametrize(
    "kind, spec, received",
    [
        ("score", keras_attn.normalizers.Softmax(), "normalizer"),
        ("normalizer", keras_attn.scores.Dot(), "score"),
        ("pattern", keras_attn.score_mods.Softcap(), "score_mod"),
        ("score_mod", keras_attn.patterns.Causal(), "pattern"),
        ("layer", keras_attn.scores.Dot(), "score"),
        ("score", keras_attn.Attention(), "layer"),
    ],
)
def test_resolve_rejects_a_component_of_another_kind(kind, spec, received):
    with pytest.raises(ComponentKindError, match=f"Expected a {kind}, but received a {received}"):
        plugins.resolve(kind, spec)


@pytest.mark.parametrize(
    "spec",
    [42, None, 1.5, ["dot"], {"config": {}}, {"name": "dot", "config": {}, "extra": 1}],
    ids=["int", "none", "float", "list", "dict_without_name", "dict_with_extra_key"],
)
def test_resolve_rejects_what_is_no_spec(spec):
    with pytest.raises(ComponentKindError) as info:
        plugins.resolve("score", spec)
    message = str(info.value)
    assert f"Received: {spec!r}" in message
    assert "'scaled_dot'" in message  # it lists the names there are


def test_resolve_rejects_a_class_with_a_hint():
    with pytest.raises(ComponentKindError, match=r"class Dot\. Pass an instance, e\.g\. Dot\(\)"):
        plugins.resolve("score", keras_attn.scores.Dot)


def test_resolve_unknown_name():
    with pytest.raises(UnknownComponentError, match="Unknown score 'nope'"):
        plugins.resolve("score", "nope")
    with pytest.raises(UnknownComponentError, match="Unknown pattern 'nope'"):
        plugins.resolve("pattern", {"name": "nope", "config": {}})


class NeedsWidth(keras_attn.Score):
    name = "test_needs_width"

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width

    def call(self, query, key):
        return ops.matmul(query, ops.swapaxes(key, -1, -2)) / self.width

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def test_resolve_name_of_a_class_that_needs_arguments():
    class Plugin:
        @hookimpl
        def register_scores(register):
            register(NeedsWidth)

    plugins.register(Plugin)
    try:
        with pytest.raises(TypeError, match="'test_needs_width' cannot be built from its name"):
            plugins.resolve("score", "test_needs_width")
        score = plugins.resolve("score", {"name": "test_needs_width", "config": {"width": 4}})
        assert score.width == 4
    finally:
        plugins.unregister(Plugin)
    # The same holds for a built-in that needs arguments.
    with pytest.raises(TypeError, match=r"'local' cannot be built .*'config'") as info:
        plugins.resolve("pattern", "local")
    assert isinstance(info.value.__cause__, TypeError)


def test_serialize_round_trips_through_resolve(example_plugin):
    for kind, obj in (
        ("score", LearnedScale(0.3)),
        ("score_mod", keras_attn.score_mods.Softcap(7.0)),
        ("pattern", StridedOrSelf(5) | keras_attn.patterns.Causal()),
        ("normalizer", Tempered(3.0)),
    ):
        config = plugins.serialize(obj)
        assert config["name"] == plugins.registry_name(obj)
        again = plugins.resolve(kind, config)
        assert type(again) is type(obj)
        assert plugins.serialize(again) == config


def test_serialize_an_unregistered_component_is_an_error():
    with pytest.raises(UnknownComponentError, match="Tempered is not registered"):
        plugins.serialize(Tempered())
    with pytest.raises(ComponentKindError, match="Not a keras_attn component"):
        plugins.serialize(object())


# -- .keras files with plugin components -----------------------------------------------


def _model(**attention_kwargs):
    inputs = keras.Input((7, 8))
    outputs = keras_attn.Attention(num_heads=2, **attention_kwargs)(inputs, inputs)
    return keras.Model(inputs, outputs)


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()])


def test_keras_file_with_plugin_components_round_trips(example_plugin, tmp_path):
    model = _model(
        score="test_learned_scale",
        score_mods=[{"name": "test_distance_penalty", "config": {"slope": 0.5}}],
        pattern="test_strided_or_self",
        normalizer={"name": "test_tempered", "config": {"temperature": 1.5}},
    )
    _randomize(model)  # the learned scale too: weights must travel with the file
    x = np.random.default_rng(2).normal(size=(3, 7, 8)).astype("float32")
    path = tmp_path / "plugin_model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    attention = loaded.layers[-1]
    assert isinstance(attention.score, LearnedScale)
    assert attention.score_mods[0].slope == 0.5
    assert isinstance(attention.pattern, StridedOrSelf)
    assert attention.normalizer.temperature == 1.5
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))
    scale = ops.convert_to_numpy(model.layers[-1].score.scale)
    expected, _ = np_plugin_attention(
        x, model.get_weights()[:8], scale=scale, slope=0.5, stride=3, temperature=1.5
    )
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(x)), expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["score", "score_mod", "pattern", "normalizer"])
def test_keras_file_needing_a_missing_plugin_names_the_component(example_plugin, tmp_path, kind):
    name = PLUGIN_NAMES[kind]
    spec = [name] if kind == "score_mod" else name
    path = tmp_path / f"needs_{kind}.keras"
    _model(**{kind + ("s" if kind == "score_mod" else ""): spec}).save(path)
    plugins.unregister(example_plugin)  # as on a machine without the plugin
    with pytest.raises(Exception) as info:
        keras.saving.load_model(path)
    message = str(info.value)
    assert f"{kind} {name!r}" in message
    assert "plugin" in message and "not installed" in message
    # The cause is keras_attn's own error, whether or not Keras wraps it.
    error = info.value
    while error is not None and not isinstance(error, UnknownComponentError):
        error = error.__cause__ or error.__context__
    assert isinstance(error, UnknownComponentError)


def test_keras_file_with_a_plugin_layer_round_trips(example_plugin, tmp_path):
    inputs = keras.Input((6, 4))
    layer = plugins.resolve("layer", {"name": "test_residual", "config": {"alpha": 0.3}})
    outputs = layer(inputs, inputs)
    model = keras.Model(inputs, outputs)
    _randomize(model, seed=3)
    path = tmp_path / "plugin_layer.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layers[-1]) is ResidualAttention and loaded.layers[-1].alpha == 0.3
    x = np.random.default_rng(4).normal(size=(2, 6, 4)).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))

    plugins.unregister(example_plugin)
    # Keras itself looks the layer class up; its error names the registered name.
    with pytest.raises(Exception, match="keras_attn.layer>test_residual"):
        keras.saving.load_model(path)


# -- entry-point plugins ---------------------------------------------------------------


class Distributions:
    """Writes installed-looking distributions into one directory on ``sys.path``."""

    def __init__(self, root):
        self.root = root

    def add(self, dist_name, entry_points, modules, version="1.2.3"):
        """entry_points: {entry point name: "module"}; modules: {module name: source}."""
        for module_name, source in modules.items():
            (self.root / f"{module_name}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n"
        )
        lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{lines}")


@pytest.fixture
def dists(tmp_path, monkeypatch):
    """A directory of distributions on sys.path, and a registry that forgets them after."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    before = set(sys.modules)
    yield Distributions(root)
    plugins.reset()
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(root)):
            del sys.modules[name]


SCORE_PLUGIN = """
    import keras_attn
    from keras import ops

    class Half(keras_attn.Score):
        name = "{score}"

        def call(self, query, key):
            return 0.5 * ops.matmul(query, ops.swapaxes(key, -1, -2))

    @keras_attn.hookimpl
    def register_scores(register):
        register(Half)
"""


def test_entry_point_plugin_loads_lazily_and_is_listed(dists):
    dists.add(
        "keras-attn-half",
        {"half": "ep_half_plugin"},
        {"ep_half_plugin": SCORE_PLUGIN.format(score="ep_half")},
    )
    plugins.reset()
    assert "ep_half_plugin" not in sys.modules  # nothing imported before the first lookup
    cls = plugins.get("score", "ep_half")
    assert "ep_half_plugin" in sys.modules
    assert cls is sys.modules["ep_half_plugin"].Half
    [entry] = [e for e in plugins.entries("score") if e.name == "ep_half"]
    assert (entry.plugin, entry.distribution, entry.version) == (
        "half",
        "keras-attn-half",
        "1.2.3",
    )
    assert entry.cls is cls
    assert plugins.load().pm.get_plugin("half") is sys.modules["ep_half_plugin"]

    # It is usable by name, like a built-in.
    q = np.random.default_rng(5).normal(size=(2, 3, 4)).astype("float32")
    logits = plugins.resolve("score", "ep_half")(q, q)
    np.testing.assert_allclose(ops.convert_to_numpy(logits), 0.5 * q @ q.swapaxes(-1, -2), 1e-5)


@pytest.mark.parametrize("value", ["1", "true", " yes "])
def test_disable_autoload_skips_entry_points(dists, monkeypatch, value):
    dists.add(
        "keras-attn-half",
        {"half": "ep_off_plugin"},
        {"ep_off_plugin": SCORE_PLUGIN.format(score="ep_off")},
    )
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, value)
    plugins.reset()
    assert "ep_off" not in plugins.names("score")
    assert "ep_off_plugin" not in sys.modules
    with pytest.raises(UnknownComponentError, match=plugins.DISABLE_AUTOLOAD_ENV):
        plugins.get("score", "ep_off")
    assert BUILTIN_NAMES["score"] <= set(plugins.names("score"))

    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "0")
    plugins.reset()
    assert "ep_off" in plugins.names("score")


@pytest.mark.parametrize(
    "source, error",
    [
        ("raise ValueError('boom from the plugin')", ValueError),
        ("import a_module_that_does_not_exist_anywhere", ModuleNotFoundError),
    ],
    ids=["raises", "missing_dependency"],
)
def test_plugin_failing_to_import_is_reported(dists, monkeypatch, source, error):
    dists.add("keras-attn-broken", {"broken": "ep_broken_plugin"}, {"ep_broken_plugin": source})
    plugins.reset()
    with pytest.raises(PluginImportError) as info:
        plugins.get("score", "scaled_dot")
    message = str(info.value)
    assert "'broken'" in message and "keras-attn-broken 1.2.3" in message
    assert error.__name__ in message and str(info.value.__cause__) in message
    assert type(info.value.__cause__) is error
    assert isinstance(info.value, ImportError)
    assert plugins.DISABLE_AUTOLOAD_ENV in message  # it says how to get going again

    # Every lookup reports it until it is fixed or autoloading is turned off.
    with pytest.raises(PluginImportError):
        keras_attn.Attention()
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    assert isinstance(keras_attn.Attention().score, keras_attn.scores.ScaledDot)


def test_plugin_failing_to_import_does_not_double_load_the_others(dists):
    # "a" loads before "b" fails; the next lookup retries "b" alone.
    dists.add(
        "keras-attn-a", {"a": "ep_ok_plugin"}, {"ep_ok_plugin": SCORE_PLUGIN.format(score="ep_ok")}
    )
    dists.add("keras-attn-b", {"b": "ep_bad_plugin"}, {"ep_bad_plugin": "raise RuntimeError('b')"})
    plugins.reset()
    for _ in range(2):
        with pytest.raises(PluginImportError, match="'b'"):
            plugins.names("score")


def test_two_plugins_registering_one_name(dists):
    dists.add(
        "keras-attn-one",
        {"first": "ep_twin_one"},
        {"ep_twin_one": SCORE_PLUGIN.format(score="ep_twin")},
    )
    dists.add(
        "keras-attn-two",
        {"second": "ep_twin_two"},
        {"ep_twin_two": SCORE_PLUGIN.format(score="ep_twin")},
    )
    plugins.reset()
    with pytest.raises(DuplicateComponentError) as info:
        plugins.get("score", "ep_twin")
    message = str(info.value)
    assert "score named 'ep_twin'" in message
    assert "plugin 'first' (package keras-attn-one 1.2.3)" in message
    assert "plugin 'second' (package keras-attn-two 1.2.3)" in message


def test_plugin_taking_a_builtin_name(dists):
    dists.add(
        "keras-attn-shadow",
        {"shadow": "ep_shadow"},
        {"ep_shadow": SCORE_PLUGIN.format(score="cosine")},
    )
    plugins.reset()
    with pytest.raises(DuplicateComponentError) as info:
        plugins.names("score")
    message = str(info.value)
    assert "plugin 'keras_attn.scores'" in message and "plugin 'shadow'" in message


def test_plugin_registering_a_component_of_the_wrong_kind(dists):
    source = """
        import keras_attn
        from keras import ops

        class Doubled(keras_attn.Normalizer):
            name = "doubled"

            def normalize(self, logits, mask, training):
                return 2 * ops.softmax(logits)

        @keras_attn.hookimpl
        def register_scores(register):
            register(Doubled)
    """
    dists.add("keras-attn-wrong", {"wrong": "ep_wrong_kind"}, {"ep_wrong_kind": source})
    plugins.reset()
    with pytest.raises(ComponentKindError) as info:
        plugins.names("normalizer")
    message = str(info.value)
    assert "register_scores" in message and "keras_attn.Score" in message
    assert "ep_wrong_kind.Doubled, which is a normalizer" in message
    assert "plugin 'wrong'" in message and "keras-attn-wrong 1.2.3" in message


def test_keras_file_loads_in_a_fresh_process_with_the_plugin_installed(dists, tmp_path):
    # The real thing: a new interpreter, the plugin installed as a distribution, and
    # no keras_attn call before `load_model`.
    shifted = """
        import keras_attn
        from keras import ops

        class Shifted(keras_attn.ScoreMod):
            name = "ep_shifted"

            def call(self, logits, positions=None):
                return logits + ops.cast(positions.key, logits.dtype) * 0.1

        @keras_attn.hookimpl
        def register_score_mods(register):
            register(Shifted)
    """
    source = textwrap.dedent(shifted) + textwrap.dedent(SCORE_PLUGIN)
    dists.add(
        "keras-attn-fresh",
        {"fresh": "ep_fresh"},
        {"ep_fresh": source.format(score="ep_fresh_half")},
    )
    plugins.reset()
    model = _model(score="ep_fresh_half", score_mods=["ep_shifted"], normalizer="sparsemax")
    _randomize(model, seed=6)
    x = np.random.default_rng(7).normal(size=(2, 7, 8)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    model.save(tmp_path / "fresh.keras")
    # The child loads the file, then forgets the plugin (as where it is not
    # installed) and loads it again.
    script = textwrap.dedent(
        f"""
        import os, sys
        import keras, numpy as np
        import keras_attn
        print("imported before load:", "ep_fresh" in sys.modules)
        model = keras.saving.load_model({str(tmp_path / "fresh.keras")!r})
        print("imported after load:", "ep_fresh" in sys.modules)
        np.save({str(tmp_path / "y.npy")!r}, keras.ops.convert_to_numpy(
            model(np.load({str(tmp_path / "x.npy")!r}))))
        os.environ[{plugins.DISABLE_AUTOLOAD_ENV!r}] = "1"
        keras_attn.plugins.reset()
        try:
            keras.saving.load_model({str(tmp_path / "fresh.keras")!r})
        except Exception as e:
            print(type(e).__name__, e)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(dists.root), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported before load: False" in done.stdout
    assert "imported after load: True" in done.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), ops.convert_to_numpy(model(x)))
    # Both missing components, with the package the file recorded for them.
    assert "MissingComponentsError" in done.stdout
    assert "score 'ep_fresh_half' (provided by package keras-attn-fresh 1.2.3; used by" in (
        done.stdout
    )
    assert "score_mod 'ep_shifted' (provided by package keras-attn-fresh 1.2.3; used by" in (
        done.stdout
    )


# -- what a .keras file records, and what it says when components are missing ----------


def test_a_serialized_spec_records_its_package_and_resolve_accepts_it():
    spec = plugins.serialize(plugins.resolve("normalizer", "softmax"))
    assert (spec["name"], spec["package"], spec["version"]) == (
        "softmax",
        "keras_attn",
        keras_attn.__version__,
    )
    assert type(plugins.resolve("normalizer", spec)).__name__ == "Softmax"
    config = keras_attn.Attention(num_heads=2, score_mods=["softcap"]).get_config()
    assert config["score"]["package"] == config["score_mods"][0]["package"] == "keras_attn"


def test_a_keras_file_missing_several_components_names_all_of_them_at_the_top(
    example_plugin, tmp_path
):
    model = _model(
        score="test_learned_scale",
        score_mods=[{"name": "test_distance_penalty", "config": {"slope": 0.5}}],
        pattern=patterns_module.Causal() | plugins.resolve("pattern", "test_strided_or_self"),
        normalizer={"name": "test_tempered", "config": {"temperature": 1.5}},
    )
    path = tmp_path / "needs_four.keras"
    model.save(path)
    plugins.unregister(example_plugin)  # as on a machine without the plugin
    with pytest.raises(MissingComponentsError) as info:
        keras.saving.load_model(path)
    message = str(info.value)
    assert isinstance(info.value, UnknownComponentError)
    first_line, *rest = message.splitlines()
    name = model.layers[-1].name
    assert first_line == (
        "The model being loaded needs 4 keras_attn component(s) that are not installed:"
    )
    assert rest[:4] == [
        f"  - {kind} {PLUGIN_NAMES[kind]!r} (providing package not recorded in the file; "
        f"used by {name!r})"
        for kind in ("score", "score_mod", "pattern", "normalizer")
    ]
    assert "config=" not in message and len(message) < 1000  # no Keras config dump
    assert [m[:2] for m in info.value.missing] == [
        (kind, PLUGIN_NAMES[kind]) for kind in ("score", "score_mod", "pattern", "normalizer")
    ]


def test_a_keras_file_lists_the_missing_components_of_every_layer_at_once(example_plugin, tmp_path):
    # Three layers, each missing something else (one is a plugin's own layer class),
    # one sharing a missing normalizer: one error lists all of them, each once, with
    # the layers that use it, although Keras builds the layers one at a time.
    inputs = keras.Input((7, 8))
    x = keras_attn.Attention(num_heads=2, score="test_learned_scale", name="first")(inputs, inputs)
    x = keras_attn.Attention(num_heads=2, normalizer="test_tempered", name="second")(x, x)
    residual = plugins.get("layer", PLUGIN_NAMES["layer"])
    x = residual(num_heads=2, key_dim=4, normalizer="test_tempered", name="third")(x, x)
    path = tmp_path / "three_layers.keras"
    keras.Model(inputs, x).save(path)
    plugins.unregister(example_plugin)
    with pytest.raises(MissingComponentsError) as info:
        keras.saving.load_model(path)
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "The model being loaded needs 3 keras_attn component(s) that are not installed:"
    )
    assert lines[1:4] == [
        "  - score 'test_learned_scale' (providing package not recorded in the file; "
        "used by 'first')",
        "  - normalizer 'test_tempered' (providing package not recorded in the file; "
        "used by 'second', 'third')",
        "  - layer 'test_residual' (providing package not recorded in the file; used by 'third')",
    ]
    assert [m[:2] for m in info.value.missing] == [
        ("score", "test_learned_scale"),
        ("normalizer", "test_tempered"),
        ("layer", "test_residual"),
    ]


def test_a_layer_built_from_its_config_alone_names_its_own_missing_components(example_plugin):
    config = keras_attn.Attention(num_heads=2, score="test_learned_scale").get_config()
    plugins.unregister(example_plugin)
    with pytest.raises(MissingComponentsError, match=r"^Attention '.*' needs 1 keras_attn"):
        keras_attn.Attention.from_config(config)


def test_an_in_process_plugin_from_an_installed_package_records_that_package(dists, tmp_path):
    dists.add("keras-attn-inproc", {}, {"inproc_plugin": SCORE_PLUGIN.format(score="inproc")},
              version="0.4.0")  # fmt: skip
    # An installer's RECORD says which files the distribution owns.
    (dists.root / "keras_attn_inproc-0.4.0.dist-info" / "RECORD").write_text("inproc_plugin.py,,\n")
    import importlib

    module = importlib.import_module("inproc_plugin")
    plugins.register(module)
    spec = plugins.serialize(plugins.resolve("score", "inproc"))
    assert (spec["package"], spec["version"]) == ("keras-attn-inproc", "0.4.0")
    # A plugin defined in this test file belongs to no installed package.
    assert plugins._distribution_of(ExamplePlugin()) == (None, None)


def test_a_keras_file_names_the_package_of_a_missing_entry_point_plugin(
    dists, tmp_path, monkeypatch
):
    dists.add(
        "keras-attn-half",
        {"half": "ep_saved_plugin"},
        {"ep_saved_plugin": SCORE_PLUGIN.format(score="ep_saved")},
        version="2.0.1",
    )
    plugins.reset()
    path = tmp_path / "needs_half.keras"
    _model(score="ep_saved", normalizer="softmax").save(path)
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")  # as if it were not installed
    plugins.reset()
    with pytest.raises(MissingComponentsError) as info:
        keras.saving.load_model(path)
    message = str(info.value)
    assert message.splitlines()[1].startswith(
        "  - score 'ep_saved' (provided by package keras-attn-half 2.0.1; used by 'attention"
    )
    assert "pip install keras-attn-half" in message
    assert info.value.missing == [("score", "ep_saved", "keras-attn-half", "2.0.1")]
