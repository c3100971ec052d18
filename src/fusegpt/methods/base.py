"""The method registry and what every method receives (a Job) and returns (StepReports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..activations import Runner
from ..adapters import Adapter
from ..config import CompressConfig

__all__ = ["Job", "StepReport", "register_method", "get_method", "method_names", "method_info", "MethodInfo"]


@dataclass
class StepReport:
    """One removal. Block indices are those of the original model."""

    step: int
    removed: int
    scores: dict[int, float] | None = None  # metric per original block index, on scored steps
    group: list[int] = field(default_factory=list)  # receiving blocks
    loss_before: float | None = None  # distillation loss of the group on the scoring samples (= plain removal)
    loss_after: float | None = None
    mse_before: float | None = None
    mse_after: float | None = None
    epoch_losses: list[float] = field(default_factory=list)
    train_steps: int = 0
    nonfinite: bool = False
    restored: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """Everything a method works with; methods mutate ``adapter.model`` in place."""

    adapter: Adapter
    runner: Runner
    config: CompressConfig
    calib_ids: torch.Tensor  # [N, T]
    generator: torch.Generator
    num_removals: int
    on_step: Callable[[StepReport], None] | None = None
    flops: dict[str, float] = field(default_factory=lambda: {"scoring": 0.0, "teacher": 0.0, "train": 0.0, "eval": 0.0})

    @property
    def model(self):
        return self.adapter.model


@dataclass(frozen=True)
class MethodInfo:
    """What a method is, for reports and the compare harness.

    kind: ``drop`` (plain removal: the model's remaining weights are untouched, so two drop methods that pick
    the same blocks give the same model), ``merge`` (static weight merging, no training), ``fuse`` (learned
    fusion) or ``heal`` (removal + fine-tuning).
    """

    name: str
    kind: str
    summary: str


_METHODS: dict[str, Callable[[Job], list[StepReport]]] = {}
_INFO: dict[str, MethodInfo] = {}
KINDS = ("drop", "merge", "fuse", "heal")


def register_method(name: str, *, kind: str = "fuse", summary: str = "") -> Callable:
    if kind not in KINDS:
        raise ValueError(f"method kind must be one of {KINDS}, got {kind!r}")

    def deco(fn: Callable[[Job], list[StepReport]]) -> Callable[[Job], list[StepReport]]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = fn
        _INFO[name] = MethodInfo(name, kind, summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_info(name: str) -> MethodInfo:
    get_method(name)
    return _INFO[name]


def get_method(name: str) -> Callable[[Job], list[StepReport]]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _METHODS[name]
