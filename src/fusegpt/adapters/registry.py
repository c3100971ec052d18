"""Adapter registry keyed by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from .base import Adapter, UnsupportedModelError

_REGISTRY: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    for model_type in cls.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not cls:
            raise ValueError(f"model_type {model_type!r} already registered to {_REGISTRY[model_type].__name__}")
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def check_supported(config) -> None:
    """Refuse an unsupported architecture from its config alone (before any weight is loaded)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
        )


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded model; a clear error naming the supported families otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    return cls(model)
