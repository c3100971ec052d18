"""Static weight-merging baselines (no training).

- ``laco``: Layer Collapse (Yang et al. 2024), RDSC merge: layer l absorbs the C-1 layers after it as
  theta_l + sum_k (theta_{l+k} - theta_l) for the attention and MLP projections (norms keep layer l's); a merge
  is accepted when the mean token cosine between the merged model's and the original model's final hidden
  states (calibration samples) stays above the threshold T. The
  scan starts at the top (l = L - C) and moves down by 1 after a rejection and by I after an acceptance, as in
  the paper's Algorithm 1. To remove exactly the requested number of blocks, the last merge takes only as many
  layers as are still needed, and a scan that ends short restarts from the top with T lowered by 0.05 (each
  threshold used is reported).
- ``merge-average``: the "static fusion (average)" rung: blocks are selected by Macro Influence like
  ``fusegpt`` (same ``mode``), and each removed block is averaged into its predecessor (its successor for
  block 0): theta_n <- (theta_n + theta_p) / 2 for every parameter (MKA/LaCo-style merging, fixed weights).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..fusion import average_merge, rdsc_merge
from ..options import option, register_options
from ..scoring import macro_influence
from .base import Job, StepReport, register_method
from .drop import remove_by_scores, scorer_of

log = logging.getLogger(__name__)

__all__ = ["merged_block_params", "run_laco", "run_merge_average"]


def _params(block: nn.Module, linears: dict[str, nn.Module] | None) -> dict[str, torch.Tensor]:
    if linears is None:
        return dict(block.named_parameters())
    return {f"{n}.{pn}": p for n, lin in linears.items() for pn, p in lin.named_parameters(recurse=False)}


def merged_block_params(blocks: list[nn.Module], how: str, adapter=None) -> dict[str, torch.Tensor]:
    """New parameter values for ``blocks[0]`` merged with the others: ``rdsc`` or ``average``.

    With an ``adapter``, only the block's linears (weights and biases) are merged and norms keep the base
    block's values (LaCo's code merges the attention and MLP projections); without one, every parameter.
    Every block must have the same parameter names and shapes (plain decoder blocks of one model).
    """
    lin = (lambda b: adapter.block_linears(b)) if adapter is not None else (lambda b: None)  # noqa: E731
    base = _params(blocks[0], lin(blocks[0]))
    others = [_params(b, lin(b)) for b in blocks[1:]]
    for o in others:
        if set(o) != set(base) or any(o[n].shape != base[n].shape for n in base):
            raise ValueError("blocks to merge differ in parameters; merge plain blocks of one model")
    if how == "rdsc":
        return {n: rdsc_merge(base[n], [o[n] for o in others]) for n in base}
    if how == "average":
        return {n: average_merge([base[n]] + [o[n] for o in others]) for n in base}
    raise ValueError(f"unknown merge {how!r}")


@torch.no_grad()
def _load(block: nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(block.named_parameters())
    for n, v in values.items():
        params[n].copy_(v)


@dataclass
class LacoOptions:
    """LaCo (Yang et al. 2024): C layers merged into one, I layers skipped after an accepted merge, threshold T."""

    layers: int = option(4, "laco: consecutive layers merged into one (C, default 4)", minimum=2)
    interval: int = option(2, "laco: layers skipped after an accepted merge (I, default 2)", minimum=1)
    threshold: float = option(0.65, "laco: accept a merge while the hidden-state cosine stays above T (default 0.65)",
                              minimum=-1.0, maximum=1.0)


register_options("laco", LacoOptions)


@register_method("laco", kind="merge", summary="LaCo layer collapse (RDSC merge, similarity threshold)",
                 resumable=False, options="laco")
@torch.no_grad()
def run_laco(job: Job) -> list[StepReport]:
    cfg, ad, runner = job.config, job.adapter, job.runner
    opt = cfg.method_options("laco")
    k = job.num_removals
    cache = job.cache("score", job.calib_ids[: cfg.score_samples])
    reference = cache.get(ad.num_blocks).clone()  # the original model's final hidden states
    orig = list(range(ad.num_blocks))
    threshold = opt.threshold
    steps: list[StepReport] = []
    removed = 0
    l = ad.num_blocks - opt.layers
    trials = 0
    t0 = time.perf_counter()
    while removed < k:
        c = min(opt.layers, k - removed + 1)  # layers merged into one (removes c - 1)
        L = ad.num_blocks
        l = min(l, L - c)
        if l < 0:
            threshold = round(threshold - 0.05, 4)
            log.info("LaCo: scan ended with %d of %d blocks removed; threshold lowered to %.2f", removed, k, threshold)
            l = L - c
            continue
        blocks, kinds = list(ad.blocks), ad.block_kinds()
        values = merged_block_params(blocks[l : l + c], "rdsc", ad)
        trial = copy.deepcopy(blocks[l])
        _load(trial, values)
        h = runner.run([trial] + blocks[l + c :], [kinds[l]] + kinds[l + c :], cache.get(l))
        sim = 1.0 - macro_influence(reference, h)
        trials += 1
        if sim > threshold:
            _load(blocks[l], values)
            gone = orig[l + 1 : l + c]
            ad.remove_blocks(list(range(l + 1, l + c)))
            del orig[l + 1 : l + c]
            cache.truncate(l + 1)
            log.info("LaCo: merged blocks %s into %d (similarity %.4f > %.2f)", gone, orig[l], sim, threshold)
            for b in gone:
                rep = StepReport(step=len(steps), removed=b,
                                 extra={"merged_into": orig[l], "similarity": sim, "threshold": threshold})
                steps.append(rep)
                if job.on_step is not None:
                    job.on_step(rep)
            removed += len(gone)
            l -= opt.interval
        else:
            l -= 1
    if steps:
        steps[0].seconds = {"search": time.perf_counter() - t0}
        steps[0].extra["trials"] = trials
    return steps


@register_method("merge-average", kind="merge", summary="MI selection, removed block averaged into its neighbour")
def run_merge_average(job: Job) -> list[StepReport]:
    ad = job.adapter

    def before_remove(p: int) -> tuple[int, dict]:
        n = p - 1 if p > 0 else p + 1
        blocks = list(ad.blocks)
        _load(blocks[n], merged_block_params([blocks[n], blocks[p]], "average"))
        return n, {"merged_into": job.state.orig[n]}

    return remove_by_scores(job, scorer_of("mi"), iterative=job.config.mode == "iterative", name="MI",
                            before_remove=before_remove)
