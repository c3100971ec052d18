"""The method registry and what every method receives (a Job) and returns (StepReports)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..activations import ActivationCache, Runner, cache_dtype, entry_store
from ..adapters import Adapter
from ..config import CompressConfig

__all__ = [
    "Job", "RunState", "StepReport", "register_method", "get_method", "method_names", "method_info", "MethodInfo",
]


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
    # divergence handling (fuse methods): the first attempt diverged and training was retried at half the learning
    # rate; ``fallback``: the retry diverged too and the step kept plain removal (every fused term zero)
    retried: bool = False
    fallback: bool = False
    divergence: list[str] = field(default_factory=list)  # the reason of every diverged attempt
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunState:
    """Where a removal run stands: the original index of every current block, the finished steps and the activation
    caches kept across steps. Methods, resume and the search read and change it through :class:`Job`."""

    orig: list[int]
    steps: list[StepReport] = field(default_factory=list)
    caches: dict[str, ActivationCache] = field(default_factory=dict)
    # --target dense: the original model's hidden states by boundary (an activations.entry_store), else None
    targets: Any = None

    def current(self, original: int) -> int:
        """Current index of an original block (ValueError if it was removed)."""
        return self.orig.index(original)


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
    flops: dict[str, float] = field(default_factory=lambda: {"scoring": 0.0, "teacher": 0.0, "train": 0.0, "eval": 0.0,
                                                             "search": 0.0})
    state: RunState | None = None
    checkpoint: Any = None  # a methods.checkpoint.Checkpoint when the run is resumable
    work_dir: Path | None = None  # where activations live with offload = disk
    memory_plan: Any = None  # fusegpt.memory.MemoryEstimate of the run (its bound)
    memory_predicted: dict | None = None  # the largest per-step prediction (with the entries really resident)
    # windows that share no token with calib_ids, for methods that measure candidates on unseen text (searches)
    heldout_ids: torch.Tensor | None = None
    # the final stage's windows when --final-nsamples differs from --nsamples (None: calib_ids)
    final_ids: torch.Tensor | None = None
    quiet: bool = False  # no progress bars, step messages at DEBUG (the cheap fusions inside a search)

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = RunState(orig=list(range(self.adapter.num_blocks)))

    @property
    def model(self):
        return self.adapter.model

    @property
    def num_original(self) -> int:
        """Blocks of the model before the first removal."""
        return len(self.state.orig) + len(self.state.steps)

    def target_store(self):
        """An empty store for dense targets: memory, or files in the work folder with offload = disk."""
        disk = None
        if self.config.offload == "disk":
            if self.work_dir is None:
                raise ValueError("offload = disk needs a work folder (Job.work_dir)")
            disk = self.work_dir / "targets"
        return entry_store(disk)

    @property
    def next_step(self) -> int:
        """Index of the next removal (> 0 after a resume)."""
        return len(self.state.steps)

    def cache(self, name: str, input_ids: torch.Tensor) -> ActivationCache:
        """The activation cache ``name`` over ``input_ids``, kept across steps (created on first use)."""
        if name not in self.state.caches:
            cfg, runner = self.config, self.runner
            dtype = cache_dtype(cfg.cache_dtype, runner.compute_dtype)
            disk = None
            if cfg.offload == "disk":
                if self.work_dir is None:
                    raise ValueError("offload = disk needs a work folder (Job.work_dir)")
                disk = self.work_dir / "activations"
            self.state.caches[name] = ActivationCache(runner, input_ids, max_resident=cfg.cache_entries or None,
                                                      dtype=dtype, disk=disk)
        return self.state.caches[name]

    def note_memory(self) -> None:
        """Predict this step's memory from the formula with the cache entries resident now; keep the largest."""
        if self.memory_plan is None or self.memory_plan.inputs is None:
            return
        c = self.state.caches
        est = self.memory_plan.at_step(c["calib"].resident if "calib" in c else 0,
                                       c["score"].resident if "score" in c else 0).to_dict()
        if self.memory_predicted is None or est["total"] > self.memory_predicted["total"]:
            self.memory_predicted = est

    def close(self) -> None:
        """Free the activation caches (and their files)."""
        for cache in self.state.caches.values():
            cache.close()
        self.state.caches.clear()
        if self.state.targets is not None:
            self.state.targets.close()
            self.state.targets = None

    def remove_block(self, p: int, *, first_changed: int | None = None) -> int:
        """Remove current block ``p``; every cache keeps its entries before the first changed block (``p`` or an
        earlier block whose weights changed in this step). Returns the original index."""
        self.adapter.remove_blocks([p])
        keep = min(p, p if first_changed is None else first_changed) + 1
        for cache in self.state.caches.values():
            cache.truncate(keep)
        return self.state.orig.pop(p)

    def finish_step(self, rep: StepReport, changed: list[int] = ()) -> None:
        """Record a finished removal: ``changed`` = current indices (after the removal) of the blocks whose weights
        changed; with a checkpoint the step is persisted before this returns."""
        self.state.steps.append(rep)
        if self.checkpoint is not None:
            self.checkpoint.save(self, rep, list(changed))
        if self.on_step is not None:
            self.on_step(rep)

    @contextlib.contextmanager
    def measure(self, key: str, seconds: dict[str, float], *, flops_key: str | None = None,
                flops_factor: float = 2.0) -> Iterator[None]:
        """Time a phase into ``seconds[key]`` and count its model FLOPs (``flops_factor`` x the forward MACs the
        runner counted; 2 = forward, 6 = forward + backward) into ``flops[flops_key or key]``."""
        t, m0 = time.perf_counter(), self.runner.macs
        try:
            yield
        finally:
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t
            k = flops_key or key
            self.flops[k] = self.flops.get(k, 0.0) + flops_factor * (self.runner.macs - m0)


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
    resumable: bool = True  # continues after a crash from its last finished step (else --resume starts it again)
    streams: bool = False  # works with --offload disk (touches weights only through the runner's loaded blocks)
    options: str | None = None  # the group of per-method options it reads (fusegpt.options), e.g. "laco"
    # held-out calibration windows it needs besides --nsamples (a search's fitness), from the config; None = none
    heldout: Callable[[CompressConfig], int] | None = None


_METHODS: dict[str, Callable[[Job], list[StepReport]]] = {}
_INFO: dict[str, MethodInfo] = {}
KINDS = ("drop", "merge", "fuse", "heal")


def register_method(name: str, *, kind: str = "fuse", summary: str = "", resumable: bool = True,
                    streams: bool = False, options: str | None = None,
                    heldout: Callable[[CompressConfig], int] | None = None) -> Callable:
    """Register a method; ``options`` names the group of per-method options it reads (registered with
    :func:`fusegpt.options.register_options`; the method reads them as ``job.config.method_options(group)``)."""
    if kind not in KINDS:
        raise ValueError(f"method kind must be one of {KINDS}, got {kind!r}")

    def deco(fn: Callable[[Job], list[StepReport]]) -> Callable[[Job], list[StepReport]]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = fn
        _INFO[name] = MethodInfo(name, kind, summary or (fn.__doc__ or "").strip().split("\n")[0], resumable,
                                 streams, options, heldout)
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
