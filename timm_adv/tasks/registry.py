"""Registry mapping ``--adv-method`` names to task classes."""
from typing import Dict, List, Type

__all__ = ['register_method', 'get_method', 'list_methods']

_METHODS: Dict[str, type] = {}


def register_method(name: str):
    """Class decorator registering an :class:`AdversarialTask` subclass under ``name``."""

    def _register(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f'Adversarial method {name!r} is registered twice.')
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return _register


def list_methods() -> List[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> Type:
    """The task class registered as ``name``; a clear error lists the choices otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f'Unknown --adv-method {name!r}; choose one of: {", ".join(_METHODS)}.') from None
