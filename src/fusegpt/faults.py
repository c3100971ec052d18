"""Fault injection for crash tests: ``FUSEGPT_FAULT=<point>:<step>`` kills the process (SIGKILL, no clean-up,
like an out-of-memory kill or a pre-empted machine) when a run reaches that point of that step (0-based).

Points: ``train`` (fuse methods: after the donor is injected, before distillation). Unset in normal use.
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAULT_ENV", "point"]

FAULT_ENV = "FUSEGPT_FAULT"


def point(name: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
