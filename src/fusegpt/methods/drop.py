"""Drop-only baselines: score blocks, remove the least important, leave every other weight untouched.

- ``drop-mi``: FuseGPT's Macro Influence, plain removal (the paper's "MI selection, no fusion" rung); follows
  ``mode`` (one-shot or iterative re-scoring) like ``fusegpt``.
- ``shortgpt``: ShortGPT's Block Influence, BI_i = 1 - mean cos(input_i, output_i), one-shot.
- ``angular``: Gromov et al., the contiguous window of n blocks with the smallest angular distance between its
  input and output (last token), removed at once.
- ``sleb``: SLEB, iterative: remove the block whose removal gives the lowest calibration NLL, re-score.
- ``ppl-oneshot``: Shortened LLaMA's PPL criterion: the same NLL-without-block score, computed once.
- ``taylor``: Shortened LLaMA's first-order Taylor criterion, sum |dL/dW * W| per block, one-shot.
- ``magnitude``: sum |W| per block, one-shot; ``random``: a seeded random choice.

All scorers run on the first ``score_samples`` calibration sequences through the activation cache.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ..activations import ActivationCache
from ..scoring import (
    angular_window_distances, block_influence_scores, macro_influence_scores, magnitude_scores, skip_nll_scores,
    taylor_scores,
)
from .base import Job, StepReport, register_method

log = logging.getLogger(__name__)

__all__ = ["remove_by_scores", "remove_plan"]

Scorer = Callable[[Job, ActivationCache, torch.Tensor, str], list[float]]


def remove_plan(job: Job, plan: list[int], *, scores: dict[int, float] | None = None,
                seconds: dict[str, float] | None = None, extra: dict | None = None) -> list[StepReport]:
    """Remove original blocks ``plan`` in order (no scoring); the first report carries ``scores``."""
    ad = job.adapter
    orig = list(range(ad.num_blocks))
    steps = []
    for step, b in enumerate(plan):
        ad.remove_blocks([orig.index(b)])
        orig.remove(b)
        rep = StepReport(step=step, removed=b, scores=scores if step == 0 else None,
                         seconds=(seconds or {}) if step == 0 else {}, extra=(extra or {}) if step == 0 else {})
        steps.append(rep)
        if job.on_step is not None:
            job.on_step(rep)
    return steps


def remove_by_scores(job: Job, scorer: Scorer, *, iterative: bool, name: str,
                     before_remove: Callable[[int, list[int]], tuple[int, dict]] | None = None) -> list[StepReport]:
    """Score (lower = less important), remove the lowest; re-score after every removal when ``iterative``.

    ``before_remove(p, orig)`` (current index p; ``orig[i]`` = original index of current block i) may change the
    model's weights before block p goes; it returns the first changed current block index and extra report
    fields.
    """
    ad, k = job.adapter, job.num_removals
    ids = job.calib_ids[: job.config.score_samples]
    cache = ActivationCache(job.runner, ids)
    orig = list(range(ad.num_blocks))
    steps: list[StepReport] = []
    plan: list[int] = []
    for step in range(k):
        rep_scores, sec = None, {}
        if iterative or step == 0:
            t, m0 = time.perf_counter(), job.runner.macs
            scores = scorer(job, cache, ids, f"({step + 1}/{k}) {name}")
            job.flops["scoring"] += 2 * (job.runner.macs - m0)
            sec["scoring"] = time.perf_counter() - t
            rep_scores = {orig[i]: s for i, s in enumerate(scores)}
            ranked = sorted(range(len(scores)), key=scores.__getitem__)
            plan = [orig[i] for i in ranked[: k - step]]
        p = orig.index(plan.pop(0))
        first, extra = before_remove(p, orig) if before_remove is not None else (p, {})
        ad.remove_blocks([p])
        cache.truncate(min(first, p) + 1)
        removed = orig.pop(p)
        rep = StepReport(step=step, removed=removed, scores=rep_scores, seconds=sec, extra=extra)
        log.info("(%d/%d) %s removed block %d", step + 1, k, name, removed)
        steps.append(rep)
        if job.on_step is not None:
            job.on_step(rep)
    return steps


# ---- scorers (lower = remove first) ---------------------------------------------------------------------------
def _mi(job: Job, cache: ActivationCache, ids: torch.Tensor, desc: str) -> list[float]:
    return macro_influence_scores(cache, desc=desc)


def _bi(job: Job, cache: ActivationCache, ids: torch.Tensor, desc: str) -> list[float]:
    return block_influence_scores(cache)


def _nll(job: Job, cache: ActivationCache, ids: torch.Tensor, desc: str) -> list[float]:
    return skip_nll_scores(cache, ids, desc=desc)


def _taylor(job: Job, cache: ActivationCache, ids: torch.Tensor, desc: str) -> list[float]:
    return taylor_scores(job.runner, ids)


def _magnitude(job: Job, cache: ActivationCache, ids: torch.Tensor, desc: str) -> list[float]:
    return magnitude_scores(job.adapter)


def _scored(scorer: Scorer, iterative: bool | None, label: str) -> Callable[[Job], list[StepReport]]:
    """A drop method from a scorer; ``iterative=None`` follows the config's ``mode``."""

    def run(job: Job) -> list[StepReport]:
        it = job.config.mode == "iterative" if iterative is None else iterative
        return remove_by_scores(job, scorer, iterative=it, name=label)

    return run


# name, scorer, iterative (None = config mode), label, summary
_SCORED = [
    ("drop-mi", _mi, None, "MI", "Macro Influence selection, plain removal (no fusion)"),
    ("shortgpt", _bi, False, "BI", "ShortGPT Block Influence, one-shot"),
    ("sleb", _nll, True, "SLEB NLL", "SLEB: iterative removal of the block whose removal costs least NLL"),
    ("ppl-oneshot", _nll, False, "PPL", "Shortened LLaMA PPL criterion, one-shot"),
    ("taylor", _taylor, False, "Taylor", "Shortened LLaMA first-order Taylor criterion, one-shot"),
    ("magnitude", _magnitude, False, "magnitude", "sum |W| per block, one-shot"),
]
for _name, _scorer, _iterative, _label, _summary in _SCORED:
    register_method(_name, kind="drop", summary=_summary)(_scored(_scorer, _iterative, _label))


@register_method("random", kind="drop", summary="seeded random blocks")
def run_random(job: Job) -> list[StepReport]:
    L = job.adapter.num_blocks
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(job.config.seed)).tolist()
    return remove_plan(job, perm[: job.num_removals])


@register_method("angular", kind="drop", summary="Gromov et al. angular distance, best contiguous window")
def run_angular(job: Job) -> list[StepReport]:
    n = job.num_removals
    cache = ActivationCache(job.runner, job.calib_ids[: job.config.score_samples])
    t = time.perf_counter()
    d = angular_window_distances(cache, n)
    start = min(range(len(d)), key=d.__getitem__)
    log.info("angular distance: best window of %d starts at block %d (d = %.4f)", n, start, d[start])
    return remove_plan(job, list(range(start, start + n)), scores=dict(enumerate(d)),
                       seconds={"scoring": time.perf_counter() - t},
                       extra={"window_start": start, "scores_are": "distance of the window starting at each block"})
