"""Compression methods behind one registry (``fusegpt compress --method NAME``)."""

from .base import Job, StepReport, get_method, method_names, register_method
from . import fusegpt  # noqa: F401  (registers "fusegpt")

__all__ = ["Job", "StepReport", "get_method", "method_names", "register_method"]
