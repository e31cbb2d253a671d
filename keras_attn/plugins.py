"""The plugin manager and the component registries.

keras_attn keeps one registry per kind of component (layer, score, score_mod,
pattern, normalizer, position_encoding). The registries are filled through the hooks of
``keras_attn.hookspecs``: first by keras_attn's own modules (it is its own first
plugin), then by every plugin declared under the ``keras_attn`` entry-point group,
then by plugins registered in-process with ``register``.

The registries are built lazily, on the first lookup (`get`, `resolve`, `entries`,
building a layer, ...), as pytest and llm load their plugins: importing keras_attn
registers nothing. The built-in modules are imported by name at that moment, so no
module imports the registry at import time only to be imported by it. Keras finds
the built-in classes in a ``.keras`` file without the registry (they are
Keras-serializable by `keras_attn.components.builtin`); a plugin's components are
found through the layers that name them, whose constructors look them up. Setting
``KERAS_ATTN_DISABLE_PLUGIN_AUTOLOAD=1`` skips the entry points.

The registry sits below the components: it imports none of them. `KINDS` names the
kinds and their hooks; the class of each kind is declared by `keras_attn.components`
when it is imported (`define_kind`), which every built-in plugin does, so any lookup
(`base_class` included) finds it whichever module was imported first.
"""

import dataclasses
import importlib
import importlib.metadata
import inspect
import logging
import os
import sys
import threading

import keras
import pluggy

from keras_attn import hookspecs
from keras_attn.errors import ComponentKindError
from keras_attn.errors import DuplicateComponentError
from keras_attn.errors import PluginError
from keras_attn.errors import PluginImportError
from keras_attn.errors import UnknownComponentError

logger = logging.getLogger("keras_attn")

ENTRY_POINT_GROUP = "keras_attn"
DISABLE_AUTOLOAD_ENV = "KERAS_ATTN_DISABLE_PLUGIN_AUTOLOAD"

# kind -> the hook of `keras_attn.hookspecs` that registers components of that kind
KINDS = {
    "layer": "register_layers",
    "score": "register_scores",
    "score_mod": "register_score_mods",
    "pattern": "register_patterns",
    "normalizer": "register_normalizers",
    "position_encoding": "register_position_encodings",
}

# kind -> the class every component of that kind subclasses; `keras_attn.components`
# declares its own (`define_kind`) when it is imported.
_base_classes = {"layer": keras.layers.Layer}

# keras_attn's own plugins, registered through the same hooks as third parties:
# plugin name -> the module that implements its hook.
BUILTIN_PLUGINS = {
    "keras_attn.scores": "keras_attn.scores",
    "keras_attn.score_mods": "keras_attn.score_mods",
    "keras_attn.patterns": "keras_attn.patterns",
    "keras_attn.normalizers": "keras_attn.normalizers",
    "keras_attn.position_encodings": "keras_attn.position_encodings",
    "keras_attn.layers": "keras_attn.layers.plugin",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered component class and the plugin that provides it."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str | None = None
    version: str | None = None
    # The name keras_attn registered `cls` under with Keras, if it did (`None` when the
    # class was already Keras-serializable), so that `unregister` can take it back.
    keras_name: str | None = dataclasses.field(default=None, compare=False)


def define_kind(kind, base):
    """Declare the class every component of `kind` subclasses.

    `keras_attn.components` declares its base classes (`keras_attn.Score`, ...) this way
    when it is imported, so that the registry, below it, never imports it.

    Args:
        kind: One of the keys of `KINDS`, e.g. ``"score"``.
        base: The base class, e.g. ``keras_attn.Score``.

    Raises:
        ValueError: `kind` is not a component kind.
        TypeError: `base` is not a class.
    """
    check_kind(kind)
    if not isinstance(base, type):
        raise TypeError(f"The base class of the {kind}s must be a class. Received: base={base!r}")
    _base_classes[kind] = base


def base_class(kind):
    """The class every component of `kind` subclasses, e.g. ``keras_attn.Score``.

    Raises:
        ValueError: `kind` is not a component kind.
    """
    check_kind(kind)
    if kind not in _base_classes:
        # Nothing has imported keras_attn.components yet (only this module was): the
        # built-in plugins import it, and it declares its classes (`define_kind`).
        _builtins()
    return _base_classes[kind]


def public_name(cls):
    """How a base class is written in messages: ``keras_attn.Score``, ``keras.layers.Layer``."""
    if cls is keras.layers.Layer:
        return "keras.layers.Layer"
    if cls.__module__ == "keras_attn.components":
        return f"keras_attn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def kind_of(obj):
    """The kind of a component class or instance, or None if it is none of them.

    Layers are checked last: scores, score_mods, normalizers and position encodings
    are layers too.
    """
    cls = obj if isinstance(obj, type) else type(obj)
    for kind in ("score", "score_mod", "pattern", "normalizer", "position_encoding", "layer"):
        # A kind not declared yet has no class to subclass: keras_attn.components,
        # which defines it, has not been imported.
        base = _base_classes.get(kind)
        if base is not None and issubclass(cls, base):
            return kind
    return None


def check_kind(kind):
    """Raise unless `kind` is one of the component kinds (the keys of `KINDS`).

    Args:
        kind: A kind name, e.g. ``"score"``.

    Raises:
        ValueError: `kind` is not one of ``"layer"``, ``"score"``, ``"score_mod"``,
            ``"pattern"``, ``"normalizer"``, ``"position_encoding"``; the message lists them.
    """
    if kind not in KINDS:
        raise ValueError(
            f"Unknown component kind. Expected one of {sorted(KINDS)}. Received: kind={kind!r}"
        )


class Registry:
    """The plugin manager together with what its plugins registered.

    Attributes:
        pm: The ``pluggy.PluginManager`` of the ``keras_attn`` project: every
            registered plugin (built-in, entry point, in-process) under its name.
        entries: ``{kind: {name: Entry}}``, what the plugins registered.
    """

    def __init__(self):
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.entries = {kind: {} for kind in KINDS}

    def add_plugin(self, plugin, name, distribution=None, version=None):
        """Register `plugin` and everything its hooks register, or nothing at all."""
        if self.pm.is_registered(plugin):
            raise PluginError(
                f"This plugin is already registered, as {self.pm.get_name(plugin)!r}: a plugin "
                "is registered once, under one name (unregister it first to rename it). "
                f"Received: plugin={plugin!r}, name={name!r}"
            )
        if self.pm.get_plugin(name) is not None:
            raise PluginError(
                f"Another plugin is already registered as {name!r} "
                f"({self.pm.get_plugin(name)!r}): plugin names are unique. Choose another "
                f"name. Received: plugin={plugin!r}, name={name!r}"
            )
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"The keras_attn plugin {name!r} is invalid: {e}") from e
        try:
            self._check_hook_names(plugin, name)
            staged = self._collect(plugin, name, distribution, version)
        except PluginError:
            self.pm.unregister(plugin)
            raise
        except Exception as e:
            self.pm.unregister(plugin)
            raise PluginError(
                f"The keras_attn plugin {name!r} failed while registering its "
                f"components: {type(e).__name__}: {e}"
            ) from e
        for entry in staged:
            keras_name = _make_keras_serializable(entry)
            self.entries[entry.kind][entry.name] = dataclasses.replace(entry, keras_name=keras_name)

    def _check_hook_names(self, plugin, plugin_name):
        # pluggy accepts an implementation of a hook nobody specified; here it is
        # almost surely a typo (`register_score`), which would otherwise do nothing.
        callers = self.pm.get_hookcallers(plugin) or ()
        unknown = sorted(caller.name for caller in callers if caller.spec is None)
        if unknown:
            known = ", ".join(KINDS.values())
            raise PluginError(
                f"The keras_attn plugin {plugin_name!r} implements unknown hooks "
                f"{unknown}. The hooks are: {known}."
            )

    def _collect(self, plugin, plugin_name, distribution, version):
        where = _describe_plugin(plugin_name, distribution, version)
        staged = []
        for kind, hook_name in KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                if impl.plugin is not plugin:
                    continue

                def register(cls, kind=kind, hook_name=hook_name):
                    entry = Entry(
                        kind,
                        _registry_name(cls, kind, hook_name, where),
                        cls,
                        plugin_name,
                        distribution,
                        version,
                    )
                    self._check_unique(entry, staged)
                    staged.append(entry)

                impl.function(register=register)
        return staged

    def _check_unique(self, entry, staged):
        for other in (*staged, self.entries[entry.kind].get(entry.name)):
            if other is not None and other.kind == entry.kind and other.name == entry.name:
                raise DuplicateComponentError(
                    f"Two plugins register a {entry.kind} named {entry.name!r}: "
                    f"{_describe(other)} and {_describe(entry)}. Uninstall one of "
                    "them, or rename the component in one of them."
                )

    def remove_plugin(self, plugin):
        name = self.pm.get_name(plugin)
        if name is None:
            raise PluginError(f"Not a registered keras_attn plugin. Received: plugin={plugin!r}")
        self.pm.unregister(plugin)
        for entries in self.entries.values():
            for key in [k for k, e in entries.items() if e.plugin == name]:
                _forget_keras_serializable(entries.pop(key))


def _registry_name(cls, kind, hook_name, where):
    base = base_class(kind)
    if not isinstance(cls, type):
        raise ComponentKindError(
            f"{hook_name}: `register` expects a class. Received: {cls!r} from {where}."
        )
    if not issubclass(cls, base):
        actual = kind_of(cls)
        what = f"a {actual}" if actual else "not a keras_attn component"
        raise ComponentKindError(
            f"{hook_name}: expected a subclass of {public_name(base)} "
            f"(a {kind}). Received: {cls.__module__}.{cls.__qualname__}, which is "
            f"{what}, from {where}."
        )
    name = cls.__dict__.get("name") if kind != "layer" else _layer_name(cls)
    if not isinstance(name, str) or not name:
        attribute = "registry_name` (or `name" if kind == "layer" else "name"
        raise ComponentKindError(
            f"{hook_name}: {cls.__module__}.{cls.__qualname__} from {where} must set "
            f"a class attribute `{attribute}` (a non-empty string, its registry name). "
            f"Received: {attribute.split('`')[0]}={name!r}"
        )
    return name


def _layer_name(cls):
    # Layers keep `name` for the Keras layer name, so the registry name may also be
    # given as `registry_name`; a plain `name` class attribute works as well.
    name = cls.__dict__.get("registry_name", cls.__dict__.get("name"))
    return name if isinstance(name, str) else None


def _describe_plugin(plugin_name, distribution=None, version=None):
    where = f"plugin {plugin_name!r}"
    if distribution:
        where += f" (package {distribution} {version})"
    return where


def _describe(entry):
    where = _describe_plugin(entry.plugin, entry.distribution, entry.version)
    return f"{entry.cls.__module__}.{entry.cls.__qualname__} from {where}"


def _make_keras_serializable(entry):
    """Let Keras find the class when it deserializes it on its own.

    Returns the name it was registered under, or None if Keras already knew it.
    """
    registered = keras.saving.get_registered_name(entry.cls)
    if keras.saving.get_registered_object(registered) is entry.cls:
        return None
    keras.saving.register_keras_serializable(package=f"keras_attn.{entry.kind}", name=entry.name)(
        entry.cls
    )
    return keras.saving.get_registered_name(entry.cls)


def _forget_keras_serializable(entry):
    # An unregistered plugin is gone for Keras too, as if it were not installed.
    custom_objects = keras.saving.get_custom_objects()
    if entry.keras_name and custom_objects.get(entry.keras_name) is entry.cls:
        del custom_objects[entry.keras_name]


_lock = threading.RLock()
_registry = None
_autoloaded = False


def _builtin_registry():
    from keras_attn import __version__

    registry = Registry()
    for plugin_name, module_name in BUILTIN_PLUGINS.items():
        registry.add_plugin(
            importlib.import_module(module_name), plugin_name, "keras_attn", __version__
        )
    return registry


def _builtins():
    """The `Registry`, with at least keras_attn's built-in plugins (no entry points yet)."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = _builtin_registry()
        return _registry


def load():
    """The `Registry`, built on the first call: built-ins, then entry-point plugins.

    Every lookup (`get`, `entries`, `resolve`, ...) goes through it, so a test rarely
    needs it; a plugin's test may use it to look at the plugin manager, e.g.
    ``plugins.load().pm.get_plugin("my_plugin")``.

    Returns:
        The `Registry` (its ``pm`` and ``entries``).

    Raises:
        PluginImportError: an entry-point plugin failed to import (it is tried again on
            the next call).
        PluginError: an entry-point plugin is invalid (see `register`).
    """
    global _autoloaded
    with _lock:
        _builtins()
        if not _autoloaded:
            if _autoload_enabled():
                for ep in _entry_points():
                    # A plugin that loaded before another one failed is not loaded
                    # twice when the next lookup tries again.
                    if _registry.pm.get_plugin(ep.name) is None:
                        _load_entry_point(_registry, ep)
            _autoloaded = True
        return _registry


def _autoload_enabled():
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")


def reset():
    """Forget every plugin but the built-ins; entry points load again on the next lookup.

    For tests (of keras_attn and of plugins) that install or remove plugins while
    running, e.g. after adding an entry point to ``importlib.metadata``: Keras
    forgets the classes it was told about by the removed plugins, and the next lookup
    loads the entry points that are installed then.
    """
    global _registry, _autoloaded
    with _lock:
        if _registry is not None:
            for name, plugin in list(_registry.pm.list_name_plugin()):
                if name not in BUILTIN_PLUGINS:
                    _registry.remove_plugin(plugin)
        _registry = None
        _autoloaded = False
        _registry = _builtin_registry()


def _entry_points():
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _load_entry_point(registry, ep):
    dist = getattr(ep, "dist", None)
    dist_name = dist.metadata["Name"] if dist is not None else None
    version = dist.version if dist is not None else None
    try:
        plugin = ep.load()
    except Exception as e:
        package = f" (package {dist_name} {version})" if dist_name else ""
        raise PluginImportError(
            f"The keras_attn plugin {ep.name!r}{package} failed to import "
            f"{ep.value!r}: {type(e).__name__}: {e}. Fix or uninstall that package, "
            f"or set {DISABLE_AUTOLOAD_ENV}=1 to skip plugin autoloading."
        ) from e
    registry.add_plugin(plugin, ep.name, dist_name, version)
    logger.debug("loaded keras_attn plugin %r from %s %s", ep.name, dist_name, version)


def register(plugin, name=None):
    """Register an in-process plugin: a module or object with hook implementations.

    Its components are available at once. Registering is all or nothing: if one of
    its components is invalid or its name is taken, none of them is registered.

    Args:
        plugin: A module, class or object with ``@keras_attn.hookimpl`` functions.
        name: The plugin's name, shown by ``keras-attn plugins`` and in errors.
            Defaults to the module or class name.

    Returns:
        The plugin, so ``register`` can be used as a class decorator.

    Raises:
        PluginError: `plugin` has no ``@keras_attn.hookimpl`` function, `name` is not a
            non-empty string, the plugin is already registered (the message gives the
            name it has) or another plugin has that name.
    """
    if name is None:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
    if not isinstance(name, str) or not name:
        raise PluginError(f"A plugin's `name` must be a non-empty string. Received: name={name!r}")
    with _lock:
        registry = load()
        if not registry.pm.is_registered(plugin) and not _hookimpl_names(registry.pm, plugin):
            hooks = ", ".join(KINDS.values())
            raise PluginError(
                "A keras_attn plugin is a module, class or object with "
                f"@keras_attn.hookimpl functions ({hooks}); this one has none. "
                f"Received: plugin={plugin!r}"
            )
        registry.add_plugin(plugin, name, *_distribution_of(plugin))
    return plugin


def _distribution_of(plugin):
    """``(package, version)`` of the installed distribution holding `plugin`'s module.

    ``(None, None)`` for a plugin defined in a script, a notebook or a test file:
    no installed package provides it, and a ``.keras`` file can then only say so.
    """
    module = plugin.__name__ if inspect.ismodule(plugin) else getattr(plugin, "__module__", None)
    if not isinstance(module, str) or module == "__main__":
        module = type(plugin).__module__
    top = module.split(".")[0] if isinstance(module, str) else None
    if not top or top == "__main__":
        return None, None
    source = getattr(sys.modules.get(module), "__file__", None)
    if not source:
        return None, None
    try:
        source = os.path.realpath(source)
        for package in importlib.metadata.packages_distributions().get(top) or ():
            distribution = importlib.metadata.distribution(package)
            # The module's own file must belong to the distribution (several packages
            # may ship a top-level `tests`, and a checkout may shadow an install).
            if any(os.path.realpath(f.locate()) == source for f in distribution.files or ()):
                return distribution.metadata["Name"], distribution.version
    except Exception:  # a broken installation must not stop a registration
        pass
    return None, None


def _hookimpl_names(pm, plugin):
    """The names of `plugin`'s attributes marked with ``@keras_attn.hookimpl``."""
    if plugin is None or isinstance(plugin, (str, bytes, int, float, bool)):
        return []
    found = []
    for attr in dir(plugin):
        try:
            if pm.parse_hookimpl_opts(plugin, attr) is not None:
                found.append(attr)
        except Exception:  # noqa: BLE001 - an attribute that fails to read is no hook
            continue
    return found


def unregister(plugin):
    """Remove an in-process plugin and the components it registered.

    Keras forgets their classes too: a model that uses them no longer loads, as
    where the plugin is not installed.
    """
    with _lock:
        load().remove_plugin(plugin)


def entries(kind=None):
    """Every registered component (of one kind if given), as a list of `Entry`."""
    registry = load()
    kinds = [kind] if kind is not None else list(KINDS)
    for k in kinds:
        check_kind(k)
    return [e for k in kinds for e in sorted(registry.entries[k].values(), key=lambda e: e.name)]


def names(kind):
    """The registered names of one kind, sorted."""
    return [e.name for e in entries(kind)]


def get(kind, name):
    """The registered class of `kind` called `name`.

    Raises:
        UnknownComponentError: if there is none; the message lists the names there are.
    """
    check_kind(kind)
    entry = load().entries[kind].get(name)
    if entry is None:
        available = ", ".join(repr(n) for n in names(kind)) or "none"
        raise UnknownComponentError(
            f"Unknown {kind} {name!r}. Registered {kind}s: {available}. If {name!r} "
            "comes from a plugin, that plugin is not installed (or plugin "
            f"autoloading is off: {DISABLE_AUTOLOAD_ENV})."
        )
    return entry.cls


def get_entry(kind, name):
    """The `Entry` of the registered component of `kind` called `name`."""
    get(kind, name)
    return load().entries[kind][name]


def resolve(kind, spec, **defaults):
    """Turn a component spec into a component instance.

    Args:
        kind: One of ``"layer"``, ``"score"``, ``"score_mod"``, ``"pattern"``,
            ``"normalizer"``, ``"position_encoding"``.
        spec: A registry name, a config dict ``{"name": ..., "config": {...}}``
            (as written by `serialize`, whose ``"package"`` and ``"version"`` keys
            are accepted and ignored), or an instance, which is returned as is.
        **defaults: Keyword arguments for the constructor when `spec` is a name
            (e.g. ``dtype``); ignored for instances.

    Raises:
        ComponentKindError: `spec` is a component of another kind, or not a spec.
        UnknownComponentError: no component of that kind has that name.
    """
    base = base_class(kind)
    if isinstance(spec, base) and not (kind == "layer" and kind_of(spec) != "layer"):
        return spec
    if isinstance(spec, str):
        cls = get(kind, spec)
        try:
            return cls(**defaults)
        except TypeError as e:
            raise TypeError(
                f"The {kind} {spec!r} cannot be built from its name alone: {e}. "
                f"Pass an instance or a config dict instead, e.g. "
                f"{{'name': {spec!r}, 'config': {{...}}}}."
            ) from e
    if isinstance(spec, dict) and "name" in spec:
        _check_spec_dict(kind, spec)
        cls = get(kind, spec["name"])
        config = dict(spec.get("config") or {})
        for key, value in defaults.items():
            config.setdefault(key, value)
        try:
            return cls.from_config(config)
        except TypeError as e:
            # Keras's Layer.from_config wraps what the constructor raised (e.g. its
            # "`temperature` must be ... Received: temperature=0") into a TypeError
            # holding the whole config: raise the constructor's own error instead.
            original = e.__context__
            if original is not None and str(e).startswith("Error when deserializing class"):
                raise original from None
            raise
    actual = kind_of(spec) if spec is not None else None
    if isinstance(spec, type) and actual == kind:
        raise ComponentKindError(
            f"Expected a {kind} instance, a registry name or a config dict, but received "
            f"the class {spec.__qualname__}. Pass an instance, e.g. {spec.__qualname__}(), "
            f"or its registry name. Received: {spec!r}"
        )
    if actual is not None:
        raise ComponentKindError(
            f"Expected a {kind}, but received a {actual}. A {kind} is a registry "
            f"name, a config dict or an instance of {base.__name__}. "
            f"Received: {kind}={spec!r} (a {actual})"
        )
    raise ComponentKindError(
        f"Expected a {kind}: a registry name (one of {names(kind)}), a config dict "
        f"{{'name': ..., 'config': {{...}}}} or an instance of {base.__name__}. "
        f"Received: {spec!r}"
    )


def _check_spec_dict(kind, spec):
    unknown = sorted(set(spec) - SPEC_KEYS, key=str)
    if unknown:
        raise ComponentKindError(
            f"A {kind} config dict has the keys 'name' (one of {names(kind)}) and "
            f"'config' (and 'package' and 'version', as saved); unexpected keys {unknown}. "
            f"Received: {spec!r}"
        )
    if not isinstance(spec["name"], str) or not spec["name"]:
        raise ComponentKindError(
            f"The 'name' of a {kind} config dict must be a registry name (a non-empty "
            f"string). Received: name={spec['name']!r}"
        )
    config = spec.get("config")
    if config is not None and not isinstance(config, dict):
        raise ComponentKindError(
            f"The 'config' of a {kind} config dict must be a dict of constructor "
            f"arguments. Received: config={config!r}"
        )


def serialize(component):
    """The config dict of a component instance, which `resolve` turns back into it."""
    kind = kind_of(component)
    if kind is None:
        raise ComponentKindError(f"Not a keras_attn component: {component!r}")
    name = registry_name(component)
    try:
        get(kind, name)
    except UnknownComponentError as e:
        raise UnknownComponentError(
            f"{type(component).__qualname__} is not registered, so it cannot be "
            f"serialized by name. Register it through a plugin hook. ({e})"
        ) from None
    spec = {"name": name, "config": component.get_config()}
    package, version = _provider(get_entry(kind, name))
    if package is not None:
        # Recorded so that a file loaded where the plugin is missing can say what to install.
        spec.update(package=package, version=version)
    return spec


# The keys of a serialized component spec (`serialize`).
SPEC_KEYS = frozenset({"name", "config", "package", "version"})


def _provider(entry):
    """The distribution (package) and version that provide a registered component.

    Known for keras_attn's built-ins and entry-point plugins; None for in-process
    plugins (`register`), which belong to no installed package.
    """
    return entry.distribution, entry.version


def registry_name(component):
    cls = component if isinstance(component, type) else type(component)
    for klass in cls.__mro__:
        for attr in ("registry_name", "name"):
            value = klass.__dict__.get(attr)
            if isinstance(value, str) and value:
                return value
    return None
