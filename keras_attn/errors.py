"""The exceptions keras_attn raises about plugins and components."""


class PluginError(Exception):
    """Base class of the errors about plugins and the component registries."""


class PluginImportError(PluginError, ImportError):
    """A plugin declared under the ``keras_attn`` entry-point group failed to import."""


class DuplicateComponentError(PluginError, ValueError):
    """Two plugins registered the same name within one kind of component."""


class UnknownComponentError(PluginError, ValueError):
    """No registered component of the requested kind has the requested name."""


class ComponentKindError(PluginError, TypeError):
    """A component of one kind was given where another kind was expected."""


class MissingComponentsError(UnknownComponentError):
    """A saved layer needs components no installed plugin registers.

    Attributes:
        missing: One ``(kind, name, package, version)`` per missing component, where
            ``package`` and ``version`` are what the file recorded (None if nothing).
    """

    def __init__(self, message, missing=()):
        super().__init__(message)
        self.missing = list(missing)
