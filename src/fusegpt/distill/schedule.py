"""Learning-rate schedule as a pure function."""

from __future__ import annotations

import math

__all__ = ["cosine_factor", "lr_factor"]


def cosine_factor(step: int, total: int) -> float:
    """Cosine annealing from 1 to 0 over ``total`` steps (torch's CosineAnnealingLR with eta_min=0)."""
    if total <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def lr_factor(step: int, total: int, warmup: int = 0) -> float:
    """Linear warm-up over the first ``warmup`` steps ((step + 1) / warmup), then cosine annealing from 1 to 0 over
    the remaining ``total - warmup`` steps; ``warmup = 0`` is :func:`cosine_factor`."""
    if warmup <= 0:
        return cosine_factor(step, total)
    if step < warmup:
        return (step + 1) / warmup
    return cosine_factor(step - warmup, total - warmup)
