"""The hook specifications: the contract between keras_attn and its plugins."""

import inspect

import pluggy
import pytest

import keras_attn
from keras_attn import hookspecs
from keras_attn import plugins
from keras_attn.errors import PluginError

HOOKS = (
    "register_layers",
    "register_scores",
    "register_score_mods",
    "register_patterns",
    "register_normalizers",
    "register_position_encodings",
)


def _specs():
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, "keras_attn_spec")
    }


def test_the_six_hooks_and_no_others():
    assert sorted(_specs()) == sorted(HOOKS)
    # One hook per kind, as the plugin manager uses them.
    assert sorted(plugins.KINDS.values()) == sorted(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_each_hook_is_a_documented_register_callback(name):
    fn = getattr(hookspecs, name)
    assert fn.__doc__ and fn.__doc__.strip()
    signature = inspect.signature(fn)
    assert list(signature.parameters) == ["register"]
    assert signature.parameters["register"].annotation is hookspecs.Register
    assert signature.return_annotation is None
    # No body beyond the docstring: calling the spec does nothing.
    assert fn(register=lambda cls: pytest.fail("a spec must not call register")) is None


@pytest.mark.parametrize("name", HOOKS)
def test_each_hook_calls_every_implementation(name):
    caller = getattr(plugins.load().pm.hook, name)
    assert caller.spec is not None and caller.spec.namespace is hookspecs
    assert not caller.spec.opts["firstresult"] and not caller.spec.opts["historic"]


def test_markers_belong_to_the_project():
    assert hookspecs.hookspec.project_name == "keras_attn"
    assert hookspecs.hookimpl.project_name == "keras_attn"
    assert keras_attn.hookimpl is hookspecs.hookimpl
    assert plugins.ENTRY_POINT_GROUP == "keras_attn"
    assert plugins.load().pm.project_name == "keras_attn"


def test_module_docstring_states_the_contract():
    assert "register" in hookspecs.__doc__ and "name" in hookspecs.__doc__


# -- what plugins get wrong about the hooks ----------------------------------------------


class Scaled(keras_attn.Score):
    name = "test_hookspecs_scaled"

    def call(self, query, key):
        return query @ key


def test_implementations_of_another_project_are_ignored():
    other = pluggy.HookimplMarker("not_keras_attn")

    class Plugin:
        @other
        def register_scores(register):
            register(Scaled)

    # Another project's hooks are not keras_attn's: a plugin with only those is
    # rejected when registered (it would register nothing), and nothing is registered.
    with pytest.raises(PluginError, match="this one has none"):
        plugins.register(Plugin)
    assert "test_hookspecs_scaled" not in plugins.names("score")


def test_a_misspelled_hook_is_an_error_naming_the_plugin_and_the_hooks():
    class Plugin:
        @keras_attn.hookimpl
        def register_score(register):
            register(Scaled)

    with pytest.raises(PluginError) as info:
        plugins.register(Plugin, name="typo_plugin")
    message = str(info.value)
    assert "'typo_plugin'" in message and "register_score'" in message
    for hook in HOOKS:
        assert hook in message
    assert plugins.load().pm.get_plugin("typo_plugin") is None


def test_an_implementation_with_the_wrong_argument_is_an_error():
    class Plugin:
        @keras_attn.hookimpl
        def register_scores(reg):
            reg(Scaled)

    with pytest.raises(PluginError, match="'bad_argument_plugin' is invalid") as info:
        plugins.register(Plugin, name="bad_argument_plugin")
    assert isinstance(info.value.__cause__, pluggy.PluginValidationError)
    assert "test_hookspecs_scaled" not in plugins.names("score")
    assert plugins.load().pm.get_plugin("bad_argument_plugin") is None
