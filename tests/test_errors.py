"""The errors about plugins and components, and the failure modes that raise them.

The failure modes a plugin author hits (issue 5): a plugin that fails to import, two
plugins registering one name, a component of the wrong kind, a `.keras` model that
needs a plugin that is not installed. Entry-point plugins and `.keras` files are
covered in test_plugins.py; here the in-process cases and the messages themselves.
"""

import keras
import pytest
from keras import ops

import keras_attn
from keras_attn import errors
from keras_attn import hookimpl
from keras_attn import plugins


@pytest.mark.parametrize(
    "error, builtin",
    [
        (errors.PluginImportError, ImportError),
        (errors.DuplicateComponentError, ValueError),
        (errors.UnknownComponentError, ValueError),
        (errors.ComponentKindError, TypeError),
    ],
)
def test_every_error_is_a_plugin_error_and_the_builtin_users_expect(error, builtin):
    assert issubclass(error, errors.PluginError)
    assert issubclass(error, builtin)
    assert error.__doc__
    assert getattr(keras_attn, error.__name__) is error
    with pytest.raises(builtin, match="message"):
        raise error("message")


def test_plugin_error_is_exported():
    assert keras_attn.PluginError is errors.PluginError
    assert issubclass(errors.PluginError, Exception)


# -- components for the failure modes -------------------------------------------------


class Twice(keras_attn.Score):
    name = "test_errors_twice"

    def call(self, query, key):
        return 2.0 * ops.matmul(query, ops.swapaxes(key, -1, -2))


class Flat(keras_attn.Normalizer):
    name = "test_errors_flat"

    def normalize(self, logits, mask, training):
        return ops.ones_like(logits) / ops.cast(ops.shape(logits)[-1], logits.dtype)


class Nameless(keras_attn.Score):
    def call(self, query, key):
        return ops.matmul(query, ops.swapaxes(key, -1, -2))


class InheritsItsName(Twice):
    """Subclasses must name themselves, or they would shadow their parent."""


class NamelessLayer(keras.layers.Layer):
    pass


def _plugin(**hooks):
    """A plugin object whose hooks register the given classes: kind -> [classes]."""
    namespace = {}
    for hook_name, classes in hooks.items():

        def impl(register, classes=classes):
            for cls in classes:
                register(cls)

        impl.__name__ = hook_name
        namespace[hook_name] = staticmethod(hookimpl(impl))
    return type("Plugin", (), namespace)


@pytest.fixture
def registered():
    """Registers plugins for one test and unregisters them afterwards."""
    done = []

    def register(plugin, name):
        plugins.register(plugin, name=name)
        done.append(plugin)
        return plugin

    yield register
    for plugin in done:
        plugins.unregister(plugin)


def _assert_not_registered(plugin_name, *names):
    assert plugins.load().pm.get_plugin(plugin_name) is None
    for kind, name in names:
        assert name not in plugins.names(kind)


# -- two plugins, one name ------------------------------------------------------------------


def test_two_plugins_registering_one_name_names_both(registered):
    registered(_plugin(register_scores=[Twice]), "first_plugin")

    class OtherTwice(keras_attn.Score):
        name = "test_errors_twice"

    with pytest.raises(errors.DuplicateComponentError) as info:
        plugins.register(_plugin(register_scores=[OtherTwice]), name="second_plugin")
    message = str(info.value)
    assert "score named 'test_errors_twice'" in message
    assert f"{__name__}.Twice from plugin 'first_plugin'" in message
    assert "OtherTwice from plugin 'second_plugin'" in message
    # The first one keeps its name; the second left nothing behind.
    assert plugins.get("score", "test_errors_twice") is Twice
    _assert_not_registered("second_plugin")


def test_one_plugin_registering_a_name_twice():
    with pytest.raises(errors.DuplicateComponentError, match="'test_errors_twice'"):
        plugins.register(_plugin(register_scores=[Twice, Twice]), name="stutter")
    _assert_not_registered("stutter", ("score", "test_errors_twice"))


def test_a_plugin_taking_a_builtin_name():
    class MySoftmax(keras_attn.Normalizer):
        name = "softmax"

    with pytest.raises(errors.DuplicateComponentError) as info:
        plugins.register(_plugin(register_normalizers=[MySoftmax]), name="shadow")
    assert "plugin 'keras_attn.normalizers' (package keras_attn" in str(info.value)
    assert "plugin 'shadow'" in str(info.value)
    assert plugins.get("normalizer", "softmax") is keras_attn.normalizers.Softmax


def test_the_same_name_in_two_kinds_is_fine(registered):
    class SoftmaxScore(keras_attn.Score):
        name = "softmax"  # a normalizer is called that too

    registered(_plugin(register_scores=[SoftmaxScore]), "two_kinds")
    assert plugins.get("score", "softmax") is SoftmaxScore
    assert plugins.get("normalizer", "softmax") is keras_attn.normalizers.Softmax


# -- wrong kinds, missing names ------------------------------------------------------------


@pytest.mark.parametrize(
    "hook, cls, expected",
    [
        (
            "register_scores",
            Flat,
            "keras_attn.Score (a score). Received: {}.Flat, which is a normalizer",
        ),
        (
            "register_normalizers",
            Twice,
            "keras_attn.Normalizer (a normalizer). Received: {}.Twice, which is a score",
        ),
        ("register_score_mods", keras_attn.patterns.Causal, "which is a pattern"),
        ("register_patterns", keras_attn.score_mods.Softcap, "which is a score_mod"),
        ("register_layers", dict, "builtins.dict, which is not a keras_attn component"),
    ],
)
def test_a_component_of_the_wrong_kind_names_the_plugin(hook, cls, expected):
    with pytest.raises(errors.ComponentKindError) as info:
        plugins.register(_plugin(**{hook: [cls]}), name="confused_plugin")
    message = str(info.value)
    assert message.startswith(f"{hook}: expected a subclass of")
    assert expected.format(__name__) in message
    assert "plugin 'confused_plugin'" in message
    _assert_not_registered("confused_plugin")


def test_register_needs_a_class_not_an_instance():
    class Plugin:
        @hookimpl
        def register_scores(register):
            register(Twice())

    with pytest.raises(errors.ComponentKindError, match="`register` expects a class") as info:
        plugins.register(Plugin, name="instance_plugin")
    assert "plugin 'instance_plugin'" in str(info.value)


@pytest.mark.parametrize(
    "hook, cls, attribute",
    [
        ("register_scores", Nameless, "name"),
        ("register_scores", InheritsItsName, "name"),
        ("register_layers", NamelessLayer, "registry_name"),
    ],
)
def test_a_class_without_a_name(hook, cls, attribute):
    with pytest.raises(errors.ComponentKindError) as info:
        plugins.register(_plugin(**{hook: [cls]}), name="nameless_plugin")
    message = str(info.value)
    assert f"{cls.__qualname__} from plugin 'nameless_plugin' must set" in message
    assert f"`{attribute}`" in message and "Received: " in message
    _assert_not_registered("nameless_plugin")


# -- all or nothing ----------------------------------------------------------------------


def test_a_bad_second_component_leaves_no_first_component():
    # Same hook, then across hooks (the score hook runs before the normalizer hook).
    for hooks in (
        {"register_scores": [Twice, Nameless]},
        {"register_scores": [Twice], "register_normalizers": [Twice]},
    ):
        with pytest.raises(errors.ComponentKindError):
            plugins.register(_plugin(**hooks), name="half_good")
        _assert_not_registered("half_good", ("score", "test_errors_twice"))
        assert keras.saving.get_registered_object("keras_attn.score>test_errors_twice") is None
    # The name is free for a plugin that gets it right.
    good = _plugin(register_scores=[Twice], register_normalizers=[Flat])
    plugins.register(good, name="half_good")
    try:
        assert plugins.get("score", "test_errors_twice") is Twice
        assert plugins.get("normalizer", "test_errors_flat") is Flat
    finally:
        plugins.unregister(good)


def test_a_hook_that_raises_is_reported_with_the_plugin_name():
    class Plugin:
        @hookimpl
        def register_scores(register):
            register(Twice)
            raise RuntimeError("the plugin's own bug")

    with pytest.raises(errors.PluginError) as info:
        plugins.register(Plugin, name="buggy_plugin")
    assert "'buggy_plugin'" in str(info.value) and "the plugin's own bug" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    _assert_not_registered("buggy_plugin", ("score", "test_errors_twice"))


# -- unknown names -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["layer", "score", "score_mod", "pattern", "normalizer"])
def test_an_unknown_name_lists_the_names_and_mentions_plugins(kind):
    with pytest.raises(errors.UnknownComponentError) as info:
        plugins.get(kind, "flash_of_genius")
    message = str(info.value)
    assert message.startswith(f"Unknown {kind} 'flash_of_genius'.")
    available = plugins.names(kind)
    assert available and ", ".join(repr(n) for n in available) in message
    assert "plugin" in message and "not installed" in message
    assert plugins.DISABLE_AUTOLOAD_ENV in message


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"score": "nope"}, errors.UnknownComponentError, "Unknown score 'nope'"),
        ({"score_mods": ["nope"]}, errors.UnknownComponentError, "Unknown score_mod 'nope'"),
        ({"pattern": "nope"}, errors.UnknownComponentError, "Unknown pattern 'nope'"),
        ({"normalizer": "nope"}, errors.UnknownComponentError, "Unknown normalizer 'nope'"),
        (
            {"normalizer": keras_attn.scores.Dot()},
            errors.ComponentKindError,
            "Expected a normalizer, but received a score",
        ),
        (
            {"pattern": keras_attn.normalizers.Softmax()},
            errors.ComponentKindError,
            "Expected a pattern, but received a normalizer",
        ),
    ],
)
def test_a_layer_with_a_bad_component_fails_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_attn.Attention(num_heads=2, **kwargs)


# -- arguments are rejected when given, saying what was received and expected -----------

BAD_ARGUMENTS = [
    # (constructor, kwargs, the words of the message)
    (keras_attn.HardAttention, {"temperature": 0}, "`temperature` must be a number in (0, inf)"),
    (keras_attn.HardAttention, {"temperature": "warm"}, "`temperature` must be a number"),
    (keras_attn.HardAttention, {"gumbel": "yes"}, "`gumbel` must be a bool"),
    (keras_attn.normalizers.Hard, {"temperature": float("inf")}, "`temperature` must be"),
    (keras_attn.normalizers.Hard, {"seed": "s"}, "`seed` must be an integer"),
    (keras_attn.Attention, {"dropout": "a"}, "`dropout` must be a number in [0.0, 1.0)"),
    (keras_attn.Attention, {"dropout": 1.0}, "`dropout` must be a number in [0.0, 1.0)"),
    (keras_attn.Attention, {"use_bias": "no"}, "`use_bias` must be a bool"),
    (keras_attn.Attention, {"flash_attention": "yes"}, "`flash_attention` must be a bool"),
    (keras_attn.Attention, {"seed": 1.5}, "`seed` must be an integer"),
    (keras_attn.scores.ScaledDot, {"scale": "x"}, "`scale` must be a number in (0, inf)"),
    (keras_attn.scores.ScaledDot, {"scale": float("inf")}, "`scale` must be a number"),
    (keras_attn.scores.Cosine, {"scale": "x"}, "`scale` must be a number"),
    (keras_attn.scores.Cosine, {"epsilon": -1.0}, "`epsilon` must be a number in [0, inf)"),
    (keras_attn.scores.Cosine, {"trainable_scale": "yes"}, "`trainable_scale` must be a bool"),
    (keras_attn.scores.Additive, {"units": True}, "`units` must be a positive integer"),
    (keras_attn.score_mods.Softcap, {"cap": float("inf")}, "`cap` must be a number in (0, inf)"),
    (keras_attn.score_mods.RelativePosition, {"bidirectional": "no"}, "`bidirectional` must"),
    (keras_attn.score_mods.RelativePosition, {"num_heads": True}, "`num_heads` must be a pos"),
    (keras_attn.score_mods.RelativePosition, {"num_buckets": True}, "`num_buckets` must be"),
    (keras_attn.patterns.GlobalTokens, {"indices": [True]}, "`indices` must be a non-empty list"),
    (keras_attn.Attention, {"block_sparse": 1}, "`block_sparse` must be one of 'auto'"),
    (keras_attn.Attention, {"score_mods": 3}, "`score_mods` must be a list of score_mods"),
]


@pytest.mark.parametrize(
    "constructor, kwargs, words",
    BAD_ARGUMENTS,
    ids=[f"{c.__name__}-{next(iter(k))}={next(iter(k.values()))!r}" for c, k, _ in BAD_ARGUMENTS],
)
def test_a_bad_argument_is_rejected_when_given(constructor, kwargs, words):
    # A ValueError from the constructor itself (not a TypeError at call or load time),
    # which says what it expected and what it received.
    [(arg, value)] = kwargs.items()
    with pytest.raises(ValueError) as info:
        constructor(**kwargs)
    message = str(info.value)
    assert words in message
    assert f"Received: {arg}={value!r}" in message
    assert "Error when deserializing" not in message


def test_resolve_raises_the_constructors_own_error_not_kerass_wrapping():
    with pytest.raises(ValueError, match=r"Received: temperature=0$"):
        plugins.resolve("normalizer", {"name": "hard", "config": {"temperature": 0}})


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"name": 3}, "must be a registry name (a non-empty string). Received: name=3"),
        ({"name": "dot", "config": [1]}, "must be a dict of constructor arguments. Received:"),
    ],
)
def test_resolve_rejects_a_malformed_spec_dict(spec, words):
    with pytest.raises(errors.ComponentKindError) as info:
        plugins.resolve("score", spec)
    assert words in str(info.value)


class _OneScore:
    @hookimpl
    def register_scores(self, register):
        register(Twice)


def test_registering_a_plugin_twice_names_its_first_name():
    plugin = _OneScore()
    plugins.register(plugin, name="first_name")
    try:
        with pytest.raises(errors.PluginError) as info:
            plugins.register(plugin, name="second_name")
        message = str(info.value)
        assert "already registered, as 'first_name'" in message
        assert "name='second_name'" in message
        with pytest.raises(errors.PluginError, match="Another plugin is already registered"):
            plugins.register(_OneScore(), name="first_name")
    finally:
        plugins.unregister(plugin)
    assert "test_errors_twice" not in plugins.names("score")


@pytest.mark.parametrize(
    "plugin, name, words",
    [
        (None, "none_plugin", "has none. Received: plugin=None"),
        (42, "int_plugin", "has none. Received: plugin=42"),
        (object(), "empty_plugin", "@keras_attn.hookimpl functions"),
        (_OneScore(), 3, "`name` must be a non-empty string. Received: name=3"),
        (_OneScore(), "", "`name` must be a non-empty string. Received: name=''"),
    ],
)
def test_register_rejects_what_is_no_plugin(plugin, name, words):
    with pytest.raises(errors.PluginError) as info:
        plugins.register(plugin, name=name)
    assert words in str(info.value)
    assert "test_errors_twice" not in plugins.names("score")
