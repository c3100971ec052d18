"""FuseGPT: Macro-Influence selection, learnable fusion into a partial group, group-level distillation.

Iterative mode re-scores the current (fused) model before every removal; one-shot mode scores once and removes
the k lowest-MI blocks in turn (each still fused and distilled).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..activations import ActivationCache
from ..distill import ParamGroup, TrainSettings, group_loss, group_window, train_group
from ..fusion import FusedLinear, inject_donor, merge_fused_linears
from ..scoring import macro_influence_scores, output_similarity
from .base import Job, StepReport, register_method

log = logging.getLogger(__name__)

__all__ = ["run_fusegpt", "run_fusegpt_global", "fuse_and_remove", "param_groups"]


def param_groups(receivers: list[nn.Module], train: str, coef_lr: float, lr: float) -> list[ParamGroup]:
    """What distillation trains (everything else in the group stays frozen).

    coef: the fusion coefficients; coef+lora: + LoRA on receiving weights + norm weights (the reference);
    full: coefficients + every receiving-block weight (linears, biases, norms).
    """
    coefs, lora, rest = [], [], []
    for block in receivers:
        fused_ids = set()
        for m in block.modules():
            if isinstance(m, FusedLinear):
                coefs += m.coefficient_parameters()
                lora += m.lora_parameters()
                fused_ids |= {id(p) for p in m.parameters()}
                if train == "full":
                    rest += m.base_parameters()
        for name, p in block.named_parameters():
            if id(p) in fused_ids:
                continue
            if train == "full" or (train == "coef+lora" and "norm" in name):
                rest.append(p)
    groups = [ParamGroup("coef", coefs, coef_lr)]
    if train == "coef+lora":
        groups += [ParamGroup("lora", lora, lr), ParamGroup("norm", rest, lr)]
    elif train == "full":
        groups += [ParamGroup("base", rest, lr)]
    return [g for g in groups if g.params]


def _group_losses(job: Job, blocks: list[nn.Module], kinds: list[str], x: torch.Tensor,
                  y: torch.Tensor) -> tuple[float, float]:
    """(configured loss, MSE) of the group on x vs y, counted as evaluation FLOPs."""
    runner, loss = job.runner, job.config.loss
    m0 = runner.macs
    value = group_loss(runner, blocks, kinds, x, y, loss)
    mse = group_loss(runner, blocks, kinds, x, y, "mse") if loss != "mse" else value
    job.flops["eval"] += 2 * (runner.macs - m0)
    return value, mse


@register_method("fusegpt", kind="fuse", summary="FuseGPT: MI selection, learnable fusion into the local group")
def run_fusegpt(job: Job) -> list[StepReport]:
    return fuse_and_remove(job, receivers="local")


@register_method("fusegpt-global", kind="fuse",
                 summary="FuseGPT fusing into the most similar blocks anywhere (global fusion)")
def run_fusegpt_global(job: Job) -> list[StepReport]:
    """The paper's global-fusion contrast: the removed block is fused into the ``global_receivers`` blocks whose
    outputs are most similar (mean token cosine, scoring samples) to its own output, anywhere in the network;
    distillation matches the original span from the first to the last of those blocks."""
    return fuse_and_remove(job, receivers="global")


def fuse_and_remove(job: Job, *, receivers: str) -> list[StepReport]:
    """The FuseGPT loop; ``receivers``: ``local`` (the partial group around the removed block) or ``global``."""
    cfg, ad, runner = job.config, job.adapter, job.runner
    k = job.num_removals
    orig = list(range(ad.num_blocks))  # original index of every current block
    S = cfg.score_samples
    score_cache = ActivationCache(runner, job.calib_ids[:S])
    cal_cache = ActivationCache(runner, job.calib_ids)
    settings = TrainSettings(loss=cfg.loss, epochs=cfg.epochs, batch_size=cfg.batch_size, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, shuffle=cfg.shuffle)
    lora_rank = 0 if cfg.train == "full" else cfg.lora_rank
    plan: list[int] = []
    steps: list[StepReport] = []
    for step in range(k):
        tag = f"({step + 1}/{k})"
        sec: dict[str, float] = {}
        rep_scores = None
        # ---- score --------------------------------------------------------------------------------------------
        if cfg.blocks is not None:
            plan = list(cfg.blocks)
        elif cfg.mode == "iterative" or step == 0:
            t, m0 = time.perf_counter(), runner.macs
            scores = macro_influence_scores(score_cache, desc=f"{tag} scoring")
            job.flops["scoring"] += 2 * (runner.macs - m0)
            sec["scoring"] = time.perf_counter() - t
            rep_scores = {orig[i]: s for i, s in enumerate(scores)}
            if cfg.mode == "oneshot":
                plan = [orig[i] for i in sorted(range(len(scores)), key=scores.__getitem__)[:k]]
            log.info("%s MI: lowest %s", tag, sorted(rep_scores.items(), key=lambda kv: kv[1])[:3])
        if plan:
            p = orig.index(plan[step])
        else:
            p = min(range(len(scores)), key=scores.__getitem__)
        # ---- group and teacher --------------------------------------------------------------------------------
        L = ad.num_blocks
        if receivers == "local":
            recv = group_window(p, L, cfg.group_size)
        else:
            sims = output_similarity(score_cache, p, [i for i in range(L) if i != p])
            recv = sorted(sorted(sims, key=sims.__getitem__, reverse=True)[: cfg.global_receivers])
        span = list(range(min(recv[0], p), max(recv[-1], p) + 1))
        g0 = span[0]
        blocks, kinds = list(ad.blocks), ad.block_kinds()
        t, m0 = time.perf_counter(), runner.macs
        x = cal_cache.get(g0)
        y = runner.run([blocks[i] for i in span], [kinds[i] for i in span], x)
        job.flops["teacher"] += 2 * (runner.macs - m0)
        sec["teacher"] = time.perf_counter() - t
        # ---- fuse and distill ---------------------------------------------------------------------------------
        t = time.perf_counter()
        # the student runs the span without p; only the receivers get donors and train (local: span - p == recv)
        student = [blocks[i] for i in span if i != p]
        skinds = [kinds[i] for i in span if i != p]
        receiving = [blocks[i] for i in recv]
        inject_donor(ad, blocks[p], receiving, coef_kind=cfg.coef, coef_rank=cfg.coef_rank, lora_rank=lora_rank,
                     generator=job.generator)
        before, mse_before = _group_losses(job, student, skinds, x[:S], y[:S])
        m0 = runner.macs
        desc = f"{tag} fusing block {orig[p]} into {orig[recv[0]]}..{orig[recv[-1]]}"
        res = train_group(runner, student, skinds, x, y, param_groups(receiving, cfg.train, cfg.coef_lr, cfg.lr),
                          settings, generator=job.generator, desc=desc)
        job.flops["train"] += 3 * 2 * (runner.macs - m0)  # forward + backward (~2x forward)
        after, mse_after = _group_losses(job, student, skinds, x[:S], y[:S])
        if res.nonfinite:
            log.warning("%s non-finite loss: training stopped and the group restored to its state before it", tag)
        if cfg.consolidate:
            for block in receiving:
                merge_fused_linears(block)
        sec["train"] = time.perf_counter() - t
        group_orig = [orig[i] for i in recv]
        # ---- remove -------------------------------------------------------------------------------------------
        ad.remove_blocks([p])
        removed = orig.pop(p)
        score_cache.truncate(g0 + 1)
        cal_cache.truncate(g0 + 1)
        rep = StepReport(
            step=step, removed=removed, scores=rep_scores, group=group_orig,
            loss_before=before, loss_after=after, mse_before=mse_before, mse_after=mse_after,
            epoch_losses=res.epoch_losses, train_steps=res.steps, nonfinite=res.nonfinite, restored=res.restored,
            seconds=sec,
        )
        log.info("%s removed block %d; group loss %.4g -> %.4g (%s)", tag, removed, before, after, cfg.loss)
        steps.append(rep)
        if job.on_step is not None:
            job.on_step(rep)
    return steps
