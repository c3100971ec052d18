"""Learning-rate schedule as a pure function."""

from __future__ import annotations

import math

__all__ = ["cosine_factor"]


def cosine_factor(step: int, total: int) -> float:
    """Cosine annealing from 1 to 0 over ``total`` steps (torch's CosineAnnealingLR with eta_min=0)."""
    if total <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
