"""Compression methods behind one registry (``fusegpt compress --method NAME``)."""

from .base import Job, MethodInfo, StepReport, get_method, method_info, method_names, register_method
from . import fusegpt, drop, merge, heal, search  # noqa: F401,E401  (register every method)

__all__ = ["Job", "MethodInfo", "StepReport", "get_method", "method_info", "method_names", "register_method"]
