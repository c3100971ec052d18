"""Latency and throughput of causal LMs: prefill (batch 1) and KV-cache decode (batch 1 and B).

Device-agnostic: the device is synchronised around every timed region. One uncounted warm-up per measurement;
medians and spread over repeats; with several models the repeats are interleaved (A, B, A, B, ...) so that a
noisy machine affects every model alike and ratios hold.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..device import autocast, synchronize

__all__ = ["Timing", "time_prefill", "time_decode", "interleaved"]


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)
    unit_count: float = 1.0  # tokens produced/processed per timed run

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.seconds), max(self.seconds))

    @property
    def tokens_per_second(self) -> float:
        return self.unit_count / self.median

    def to_dict(self) -> dict:
        return {"name": self.name, "median_s": self.median, "min_s": self.spread[0], "max_s": self.spread[1],
                "runs": len(self.seconds), "tokens_per_second": self.tokens_per_second, "seconds": self.seconds}


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def time_prefill(model, ids: torch.Tensor, dtype: torch.dtype | None = None) -> Callable[[], float]:
    """A timer of one prefill forward (with KV cache creation) on ``ids`` [B, T]."""
    device = _device(model)
    ids = ids.to(device)

    @torch.no_grad()
    def run() -> None:
        with autocast(device, dtype):
            model(input_ids=ids, use_cache=True)

    return lambda: _timed(run, device)


def time_decode(model, ids: torch.Tensor, new_tokens: int, dtype: torch.dtype | None = None) -> Callable[[], float]:
    """A timer of greedy generation of exactly ``new_tokens`` tokens with KV cache after a prompt ``ids``;
    the prompt's prefill is timed separately and subtracted, so the figure is decode only."""
    device = _device(model)
    ids = ids.to(device)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = 0

    @torch.no_grad()
    def gen() -> None:
        with autocast(device, dtype):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad)

    prefill = time_prefill(model, ids, dtype)
    return lambda: max(_timed(gen, device) - prefill(), 1e-9)


def interleaved(timers: Sequence[tuple[str, Callable[[], float], float]], repeats: int) -> list[Timing]:
    """Run each (name, timer, tokens) once uncounted, then ``repeats`` rounds A, B, A, B, ..."""
    out = [Timing(name, [], tokens) for name, _, tokens in timers]
    for _, timer, _ in timers:
        timer()  # warm-up
    for _ in range(repeats):
        for t, (_, timer, _) in zip(out, timers):
            t.seconds.append(timer())
    return out
