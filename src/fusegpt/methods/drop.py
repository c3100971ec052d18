"""Drop-only baselines: score blocks, remove the least important, leave every other weight untouched.

- ``drop-mi``: FuseGPT's Macro Influence, plain removal (the paper's "MI selection, no fusion" rung); follows
  ``mode`` (one-shot or iterative re-scoring) like ``fusegpt``.
- ``shortgpt``: ShortGPT's Block Influence, BI_i = 1 - mean cos(input_i, output_i), one-shot.
- ``angular``: Gromov et al., the contiguous window of n blocks with the smallest angular distance between its
  input and output (last token), removed at once.
- ``sleb``: SLEB, iterative: remove the block whose removal gives the lowest calibration NLL, re-score.
- ``ppl-oneshot``: Shortened LLaMA's PPL criterion: the same NLL-without-block score, computed once.
- ``taylor``: Shortened LLaMA's first-order Taylor criterion, sum |dL/dW * W| per block, one-shot.
- ``fisher``: empirical Fisher information, sum over a block's weights of the mean squared per-sequence gradient.
- ``magnitude``: sum |W| per block, one-shot; ``random``: a seeded random choice.

All scorers run on the first ``score_samples`` calibration sequences through the activation cache.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ..activations import ActivationCache
from ..scoring import ORDERS, angular_window_distances, magnitude_scores, taylor_scores
from .base import Job, StepReport, register_method

log = logging.getLogger(__name__)

__all__ = ["remove_by_scores", "remove_plan", "scorer_of"]

Scorer = Callable[[Job, ActivationCache, torch.Tensor, str], list[float]]


def remove_plan(job: Job, plan: list[int], *, scores: dict[int, float] | None = None,
                seconds: dict[str, float] | None = None, extra: dict | None = None) -> list[StepReport]:
    """Remove original blocks ``plan`` in order (no scoring); the first report carries ``scores``."""
    for step in range(job.next_step, len(plan)):
        removed = job.remove_block(job.state.current(plan[step]))
        job.finish_step(StepReport(step=step, removed=removed, scores=scores if step == 0 else None,
                                   seconds=(seconds or {}) if step == 0 else {},
                                   extra=(extra or {}) if step == 0 else {}))
    return job.state.steps


def remove_by_scores(job: Job, scorer: Scorer, *, iterative: bool, name: str,
                     before_remove: Callable[[int], tuple[int | None, dict]] | None = None) -> list[StepReport]:
    """Score (lower = less important), remove the lowest; re-score after every removal when ``iterative``.

    ``before_remove(p)`` (current index p) may change the model's weights before block p goes; it returns the
    current index of the block it changed (or None) and extra report fields. Continues from the job's next step.
    """
    k = job.num_removals
    ids = job.calib_ids[: job.config.score_samples]
    cache = job.cache("score", ids)
    for step in range(job.next_step, k):
        rep_scores, sec = None, {}
        if iterative or step == 0:
            with job.measure("scoring", sec):
                scores = scorer(job, cache, ids, f"({step + 1}/{k}) {name}")
            rep_scores = {job.state.orig[i]: s for i, s in enumerate(scores)}
        # the plan of the last scoring: its k - r lowest blocks in order; steps since then took the first ones
        r, last = next((i, s.scores) for i, s in reversed(list(enumerate(job.state.steps)))
                       if s.scores is not None) if rep_scores is None else (step, rep_scores)
        plan = sorted(last, key=last.get)[: k - r]
        p = job.state.current(plan[step - r])
        changed, extra = before_remove(p) if before_remove is not None else (None, {})
        removed = job.remove_block(p, first_changed=changed)
        kept_changed = [] if changed is None else [changed if changed < p else changed - 1]
        log.info("(%d/%d) %s removed block %d", step + 1, k, name, removed)
        job.finish_step(StepReport(step=step, removed=removed, scores=rep_scores, seconds=sec, extra=extra),
                        kept_changed)
    return job.state.steps


# ---- scorers (lower = remove first) ---------------------------------------------------------------------------
def scorer_of(name: str) -> Scorer:
    """A scorer from the shared block orders (scoring.ORDERS)."""
    return lambda job, cache, ids, desc: ORDERS[name](cache, ids, desc)


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


# name, scorer, iterative (None = config mode), label, summary, works with --offload disk
_SCORED = [
    ("drop-mi", scorer_of("mi"), None, "MI", "Macro Influence selection, plain removal (no fusion)", True),
    ("shortgpt", scorer_of("bi"), False, "BI", "ShortGPT Block Influence, one-shot", True),
    ("sleb", scorer_of("nll"), True, "SLEB NLL", "SLEB: iterative removal of the block whose removal costs least NLL",
     True),
    ("ppl-oneshot", scorer_of("nll"), False, "PPL", "Shortened LLaMA PPL criterion, one-shot", True),
    ("taylor", _taylor, False, "Taylor", "Shortened LLaMA first-order Taylor criterion, one-shot", False),
    ("fisher", scorer_of("fisher"), False, "Fisher", "empirical Fisher information (squared gradients), one-shot",
     False),
    ("magnitude", _magnitude, False, "magnitude", "sum |W| per block, one-shot", False),
]
for _name, _scorer, _iterative, _label, _summary, _streams in _SCORED:
    register_method(_name, kind="drop", summary=_summary, streams=_streams)(_scored(_scorer, _iterative, _label))


@register_method("random", kind="drop", summary="seeded random blocks", streams=True)
def run_random(job: Job) -> list[StepReport]:
    L = job.adapter.num_blocks
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(job.config.seed)).tolist()
    return remove_plan(job, perm[: job.num_removals])


@register_method("angular", kind="drop", summary="Gromov et al. angular distance, best contiguous window",
                 streams=True)
def run_angular(job: Job) -> list[StepReport]:
    n = job.num_removals
    cache = job.cache("score", job.calib_ids[: job.config.score_samples])
    t = time.perf_counter()
    d = angular_window_distances(cache, n)
    start = min(range(len(d)), key=d.__getitem__)
    log.info("angular distance: best window of %d starts at block %d (d = %.4f)", n, start, d[start])
    return remove_plan(job, list(range(start, start + n)), scores=dict(enumerate(d)),
                       seconds={"scoring": time.perf_counter() - t},
                       extra={"window_start": start, "scores_are": "distance of the window starting at each block"})
