"""Architecture adapters: the only code that knows model layouts."""

from .base import Adapter, BlockContext, UnsupportedModelError
from .registry import check_supported, get_adapter, register_adapter, supported_model_types
from . import llama, gemma3, phi3  # noqa: F401  (register the families)

__all__ = [
    "Adapter",
    "BlockContext",
    "UnsupportedModelError",
    "check_supported",
    "get_adapter",
    "register_adapter",
    "supported_model_types",
]
