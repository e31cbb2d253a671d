"""Saved models that need components which are not installed: one error listing them all.

A ``.keras`` file names each keras_attn component it uses (``{"name": ..., "config":
...}``, with the package that provided it, see `keras_attn.plugins.serialize`). Where a
plugin is missing, the user should see every component the file needs at once, with
the packages to install, not only the first one Keras happens to build.

Two routes lead to the same `MissingComponentsError`:

- `check_file(path)`, explicitly, before loading: it reads the file's ``config.json``
  and checks every layer of the model.
- While ``keras.saving.load_model`` runs: a keras_attn layer checks its own config
  before it builds its components (`check_layer_config`); if something is missing, it
  looks for the whole model's config on the stack (Keras holds it in local variables)
  and lists the missing components of every layer.
"""

import json
import os
import sys
import zipfile

from keras_attn import plugins
from keras_attn.errors import MissingComponentsError


def check_file(path):
    """Raise one error naming every keras_attn component a ``.keras`` file needs but lacks.

    Nothing is loaded: the file's ``config.json`` is read and every layer of the model
    is looked at, the components of keras_attn's layers and the layers that plugins
    register. Installed plugins are loaded first (as on any lookup). Use it before
    ``keras.saving.load_model``, e.g. to tell a user which packages to install; it
    also names a plugin's missing layer class, which ``load_model`` reports with
    Keras's own error when that layer comes before every keras_attn layer.

    Args:
        path: Path of a ``.keras`` file (a zip archive holding ``config.json``).

    Returns:
        None, when every component the file needs is installed.

    Raises:
        MissingComponentsError: listing each missing component once, with its kind, the
            package the file recorded for it and the layers that use it.
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not a ``.keras`` file (not a zip archive, or no
            ``config.json`` in it, or that is not JSON).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such .keras file. Received: path={path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            "Expected a .keras file (a zip archive holding config.json), as written by "
            f"`model.save(...)`; this file is not a zip archive. Received: path={path!r}"
        )
    with zipfile.ZipFile(path) as archive:
        try:
            text = archive.read("config.json")
        except KeyError:
            raise ValueError(
                "Expected a .keras file (a zip archive holding config.json); this archive "
                f"has no config.json but {sorted(archive.namelist())[:5]}. "
                f"Received: path={path!r}"
            ) from None
    try:
        config = json.loads(text)
    except ValueError as e:
        raise ValueError(
            f"The config.json of this .keras file is not JSON ({e}). Received: path={path!r}"
        ) from None
    check_model_config(config, owner=f"The model in {path!r}")


def check_model_config(config, owner="The model being loaded"):
    """Raise one error naming every keras_attn component a serialized model needs but lacks.

    Looks at every layer of `config` (a model's serialized config, as in a ``.keras``
    file's ``config.json``): the components of keras_attn's layers, and layers that
    plugins register (Keras names them ``keras_attn.layer>NAME``).

    Args:
        config: A serialized Keras object (a dict, e.g. ``json.loads`` of config.json).
        owner: How the message names the model.

    Raises:
        MissingComponentsError: listing each missing component once, with its kind, the
            package the file recorded for it and the layers that need it.
    """
    registry = plugins.load()
    needed_by = {}
    order = []
    for outer, inner in _layer_configs(config):
        layer_name = inner.get("name") if isinstance(inner.get("name"), str) else None
        registered = outer.get("registered_name")
        found = []
        if isinstance(registered, str) and registered.startswith("keras_attn.layer>"):
            name = registered.split(">", 1)[1]
            if name not in registry.entries["layer"]:
                found.append(("layer", name, None, None))
        # Only what keras_attn wrote: spec dicts (another library's layer may have an
        # argument called `score` or `pattern` too).
        specs = {
            kind: [s for v in values for s in (v if isinstance(v, list) else [v]) if _is_spec(s)]
            for kind, values in _layer_specs(inner).items()
        }
        found += missing_components(specs)
        for item in found:
            key = item[:2]
            if key not in needed_by:
                order.append(item)
                needed_by[key] = []
            if layer_name and layer_name not in needed_by[key]:
                needed_by[key].append(layer_name)
    if order:
        _raise_missing(order, owner, needed_by)


def check_layer_config(config, owner=None):
    """`check_installed` on a layer's config, before the layer is built from it.

    Where the layer is being loaded as part of a model (``keras.saving.load_model``),
    a missing component makes the error list every missing component of the whole
    model, with the layers that need each (`check_model_config`), not only this
    layer's: Keras builds the layers one at a time, and would otherwise stop at the
    first.

    Args:
        config: The layer's config (``get_config()``), whose component arguments
            (``score``, ``score_mods``, ``pattern``, ...) are checked.
        owner: How the message names the layer when only its own components are listed.

    Raises:
        MissingComponentsError: a component of the layer (or of the model being loaded)
            is not installed.
    """
    if not missing_components(_layer_specs(config)):
        return
    model_config = _config_being_loaded()
    if model_config is not None:
        check_model_config(model_config)
    check_installed(_layer_specs(config), owner)


def missing_components(specs):
    """The components named in `specs` that no registered plugin provides.

    Args:
        specs: A mapping of kind (``"score"``, ``"pattern"``, ...) to one spec or a list
            of specs, as `keras_attn.plugins.resolve` takes them (names, config dicts
            or instances). Combined patterns (``union``, ``intersection``) are looked into.

    Returns:
        A list of ``(kind, name, package, version)``, in order, without repeats;
        ``package`` and ``version`` are what the spec recorded (or None).

    Raises:
        ValueError: a key of `specs` is not a component kind.
    """
    registry = plugins.load()
    missing = []

    def visit(kind, spec):
        if isinstance(spec, (list, tuple)):
            for s in spec:
                visit(kind, s)
            return
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            return  # an instance, or not a spec at all (`resolve` will say so)
        name = spec["name"]
        if name not in registry.entries[kind]:
            item = (kind, name, spec.get("package"), spec.get("version"))
            if item not in missing:
                missing.append(item)
        elif kind == "pattern":
            visit(kind, list((spec.get("config") or {}).get("patterns") or []))

    for kind, spec in specs.items():
        plugins.check_kind(kind)
        visit(kind, spec)
    return missing


def check_installed(specs, owner=None):
    """Raise one error naming every component of `specs` that is not installed.

    A layer loaded from a ``.keras`` file calls this before it builds any component,
    so that the user sees all of them at once, with the packages that provide them
    where the file recorded them (see `keras_attn.plugins.serialize`), instead of the
    first one only.

    Args:
        specs: As for `missing_components`.
        owner: How to name what needs them in the message (e.g. ``"layer 'attention'"``).

    Raises:
        MissingComponentsError: listing each missing component's kind, name and package.
    """
    missing = missing_components(specs)
    if missing:
        _raise_missing(missing, owner or "This model")


def _layer_specs(config):
    """The component specs of one layer's config, by kind.

    The component arguments are those named after a kind: ``score``, ``score_mods``
    (a list), ``pattern``, ``normalizer``, ``position_encoding``, ...
    """
    specs = {}
    for kind in plugins.KINDS:
        for arg in (kind, kind + "s"):
            if kind != "layer" and config.get(arg) is not None:
                specs.setdefault(kind, []).append(config[arg])
    return specs


def _config_being_loaded():
    """The whole config Keras is loading on this thread's stack, or None.

    Read only on the error path (a component is missing), to list all of them: the
    file's ``config.json`` text where ``keras.saving.load_model`` (or
    ``model_from_json``) holds it, else the outermost config being deserialized
    (which Keras may already have taken apart).
    """
    text = outermost = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("keras."):
            for local in ("config_json", "json_string"):
                if isinstance(frame.f_locals.get(local), (str, bytes)):
                    text = frame.f_locals[local]
            config = frame.f_locals.get("config")
            if frame.f_code.co_name == "deserialize_keras_object" and isinstance(config, dict):
                outermost = config
        frame = frame.f_back
    if text is not None:
        try:
            return json.loads(text)
        except ValueError:
            pass
    return outermost


def _is_spec(value):
    return (
        isinstance(value, dict)
        and isinstance(value.get("name"), str)
        and set(value) <= plugins.SPEC_KEYS
    )


def _layer_configs(config):
    """Every ``(layer config, inner config)`` pair in a serialized Keras object, depth first."""
    if isinstance(config, dict):
        inner = config.get("config")
        if isinstance(config.get("class_name"), str) and isinstance(inner, dict):
            yield config, inner
        for value in config.values():
            yield from _layer_configs(value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            yield from _layer_configs(value)


def _raise_missing(missing, owner, needed_by=None):
    lines = []
    for kind, name, package, version in missing:
        if package:
            source = f"provided by package {package}" + (f" {version}" if version else "")
        else:
            source = "providing package not recorded in the file"
        layers = (needed_by or {}).get((kind, name))
        used = f"; used by {', '.join(repr(n) for n in layers)}" if layers else ""
        lines.append(f"  - {kind} {name!r} ({source}{used})")
    packages = sorted({p for _, _, p, _ in missing if p})
    install = (
        f"install {' '.join(packages)} (pip install {' '.join(packages)})"
        if packages
        else "install the packages that provide them"
    )
    raise MissingComponentsError(
        f"{owner} needs {len(missing)} keras_attn component(s) that are not installed:\n"
        + "\n".join(lines)
        + f"\nTo load it, {install}, whose keras_attn plugins register these names, "
        "or register an in-process plugin with keras_attn.plugins.register(...). "
        "If they are installed, plugin autoloading may be off "
        f"({plugins.DISABLE_AUTOLOAD_ENV}).",
        missing,
    )
