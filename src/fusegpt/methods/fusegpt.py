"""FuseGPT: Macro-Influence selection, learnable fusion into a partial group, group-level distillation.

Iterative mode re-scores the current (fused) model before every removal; one-shot mode scores once and removes
the k lowest-MI blocks in turn (each still fused and distilled).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import faults
from ..distill import ParamGroup, TrainSettings, group_loss, group_window, train_group
from ..fusion import FusedLinear, fused_linears, inject_donor, merge_fused_linears
from ..scoring import macro_influence_scores, output_similarity
from .base import Job, StepReport, register_method

log = logging.getLogger(__name__)

__all__ = [
    "run_fusegpt", "run_fusegpt_global", "fuse_and_remove", "fuse_step", "param_groups", "receivers_for",
    "Selection", "IterativeMI", "OneShotMI", "FixedPlan", "selection_for", "dense_boundary", "plan_boundaries",
    "dense_target_count", "ensure_dense_targets",
]


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
                  y: torch.Tensor, sec: dict[str, float]) -> tuple[float, float]:
    """(configured loss, MSE) of the group on x vs y, counted as evaluation FLOPs."""
    loss = job.config.loss
    with job.measure("eval", sec):
        value = group_loss(job.runner, blocks, kinds, x, y, loss)
        mse = group_loss(job.runner, blocks, kinds, x, y, "mse") if loss != "mse" else value
    return value, mse


# ---- selection policies: which current block goes next ---------------------------------------------------------
class Selection:
    """A selection policy: ``choose(job, step)`` -> (current index of the block to remove, scores by original
    index when it scored at this step, else None). Policies keep no state of their own beyond the job's finished
    steps, so a resumed run chooses exactly what the uninterrupted one would."""

    def choose(self, job: Job, step: int, sec: dict[str, float]) -> tuple[int, dict[int, float] | None]:
        raise NotImplementedError

    def plan(self, job: Job) -> list[int] | None:
        """Every block this policy will remove (original indices, in order) once step 0 has chosen, if it is
        fixed by then (one-shot, a given list); None when later choices depend on the fused model."""
        return None


def _mi_scores(job: Job, step: int, sec: dict[str, float]) -> dict[int, float]:
    cache = job.cache("score", job.calib_ids[: job.config.score_samples])
    with job.measure("scoring", sec):
        scores = macro_influence_scores(cache, desc=f"({step + 1}/{job.num_removals}) scoring")
    return {job.state.orig[i]: s for i, s in enumerate(scores)}


class IterativeMI(Selection):
    """Re-score Macro Influence on the current (fused) model before every removal; remove the lowest."""

    def choose(self, job, step, sec):
        scores = _mi_scores(job, step, sec)
        return job.state.current(min(scores, key=scores.get)), scores


class OneShotMI(Selection):
    """Score once (step 0); remove the k lowest in order of their score."""

    _scores: dict[int, float] | None = None

    def choose(self, job, step, sec):
        scores = _mi_scores(job, step, sec) if step == 0 else None
        self._scores = scores if scores is not None else self._scores
        first = scores if scores is not None else job.state.steps[0].scores
        plan = sorted(first, key=first.get)[: job.num_removals]
        return job.state.current(plan[step]), scores

    def plan(self, job):
        first = job.state.steps[0].scores if job.state.steps else self._scores
        return sorted(first, key=first.get)[: job.num_removals]


class FixedPlan(Selection):
    """Remove the given original blocks in the given order, without scoring (ablations on fixed blocks)."""

    def __init__(self, blocks: list[int]) -> None:
        self.blocks = list(blocks)

    def choose(self, job, step, sec):
        return job.state.current(self.blocks[step]), None

    def plan(self, job):
        return list(self.blocks)


def selection_for(config) -> Selection:
    if config.blocks is not None:
        return FixedPlan(config.blocks)
    return IterativeMI() if config.mode == "iterative" else OneShotMI()


# ---- dense targets: the original model's hidden states where a span ends ----------------------------------------
def dense_boundary(orig: list[int], span_end: int, num_original: int) -> int:
    """The original-model boundary a span ending at current block ``span_end`` stands for: the input of the next
    kept block (``orig[span_end + 1]``), or the last block's output (``num_original``) at the end. The span
    together with the blocks removed right after it covers the original blocks up to that boundary."""
    return orig[span_end + 1] if span_end + 1 < len(orig) else num_original


def plan_boundaries(plan: list[int], num_blocks: int, group_size: int) -> list[int]:
    """Dense boundaries every step of a fixed removal ``plan`` (original indices, local receivers) will need,
    found by replaying the plan's windows without touching the model."""
    orig, out = list(range(num_blocks)), set()
    for b in plan:
        p = orig.index(b)
        recv = group_window(p, len(orig), group_size)
        out.add(dense_boundary(orig, max(recv[-1], p), num_blocks))
        orig.pop(p)
    return sorted(out)


def dense_target_count(config, num_blocks: int) -> int:
    """How many dense boundaries a run keeps (the memory formula's D): the plan's for one-shot or given blocks
    with local receivers, else every boundary."""
    if config.target != "dense":
        return 0
    from ..config import num_removals

    fixed = config.method == "fusegpt" and (config.blocks is not None or config.mode == "oneshot")
    return min(num_removals(config, num_blocks), num_blocks) if fixed else num_blocks


def ensure_dense_targets(job: Job, plan: list[int] | None) -> None:
    """Fill ``job.state.targets`` {original boundary: [N, T, H]} with the dense model's hidden states.

    A fresh run computes them from the calibration cache while the model is still dense (step 0, after the
    selection's first choice); a resumed run reads the copy its checkpoint wrote then. ``plan`` (a fixed removal
    order) limits them to the boundaries its steps will use; None keeps every boundary."""
    if job.state.targets is not None:
        return
    if job.state.steps:  # resumed: the model is no longer dense
        store = job.target_store()
        if job.checkpoint is None or not job.checkpoint.load_targets(store):
            raise RuntimeError("--target dense: this resumed run has no saved dense targets (its run folder was "
                               "written without them); start it again without --resume")
        job.state.targets = store
        return
    L = job.adapter.num_blocks
    wanted = plan_boundaries(plan, L, job.config.group_size) if plan is not None else list(range(1, L + 1))
    cache, store = job.cache("calib", job.calib_ids), job.target_store()
    for b in wanted:
        store.put(b, cache.get(b))
    job.state.targets = store
    log.info("dense targets cached at %d boundaries: %s", len(wanted), wanted)
    if job.checkpoint is not None:
        job.checkpoint.save_targets(store)


# ---- one step ----------------------------------------------------------------------------------------------------
def receivers_for(job: Job, p: int, how: str) -> list[int]:
    """Current indices of the blocks that receive block p: ``local`` = the partial group (the paper's G window),
    ``global`` = the ``global_receivers`` blocks whose outputs are most similar to p's (scoring samples)."""
    L = job.adapter.num_blocks
    if how == "local":
        return group_window(p, L, job.config.group_size)
    cache = job.cache("score", job.calib_ids[: job.config.score_samples])
    sims = output_similarity(cache, p, [i for i in range(L) if i != p])
    return sorted(sorted(sims, key=sims.__getitem__, reverse=True)[: job.config.global_receivers])


def _fuse_and_distill(job: Job, step: int, p: int, recv: list[int], span: list[int], x: torch.Tensor,
                      sec: dict[str, float]):
    """Teacher outputs, donor injection, distillation (with the divergence retry), consolidation."""
    cfg, ad, runner = job.config, job.adapter, job.runner
    k, orig = job.num_removals, job.state.orig
    tag = f"({step + 1}/{k})"
    S = cfg.score_samples
    blocks, kinds = list(ad.blocks), ad.block_kinds()
    receiving = [blocks[i] for i in recv]
    if job.state.targets is not None:  # --target dense: the original model at the span's boundary
        y = job.state.targets.get(dense_boundary(orig, span[-1], job.num_original))
    else:
        with job.measure("teacher", sec):
            y = runner.run([blocks[i] for i in span], [kinds[i] for i in span], x)
    job.note_memory()
    # the student runs the span without p; only the receivers get donors and train (local: span - p == recv)
    student = [blocks[i] for i in span if i != p]
    skinds = [kinds[i] for i in span if i != p]
    inject_donor(ad, blocks[p], receiving, coef_kind=cfg.coef, coef_rank=cfg.coef_rank,
                 lora_rank=0 if cfg.train == "full" else cfg.lora_rank, generator=job.generator,
                 fold_norms=cfg.fold_norms)
    for block in receiving:
        for _, fl in fused_linears(block):
            fl.checkpoint = runner.grad_checkpoint
    before, mse_before = _group_losses(job, student, skinds, x[:S], y[:S], sec)
    faults.point("train", step)
    settings = TrainSettings(loss=cfg.loss, epochs=cfg.epochs, batch_size=cfg.batch_size, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, shuffle=cfg.shuffle, diverge_factor=cfg.diverge_factor,
                             aux_loss=cfg.aux_loss, aux_weight=cfg.aux_weight, warmup=cfg.warmup,
                             clip_grad=cfg.clip_grad)
    groups = param_groups(receiving, cfg.train, cfg.coef_lr, cfg.lr)
    desc = f"{tag} fusing block {orig[p]} into {orig[recv[0]]}..{orig[recv[-1]]}"
    reasons: list[str] = []
    with job.measure("train", sec, flops_factor=6.0):  # forward + backward (~2x forward)
        res = train_group(runner, student, skinds, x, y, groups, settings, generator=job.generator, desc=desc)
        if res.diverged:
            reasons.append(res.reason or "diverged")
            log.warning("%s %s: group restored; retrying at half the learning rates", tag, res.reason)
            half = [ParamGroup(g.name, g.params, g.lr / 2) for g in groups]
            res = train_group(runner, student, skinds, x, y, half, settings, generator=job.generator,
                              desc=desc + " (retry, lr / 2)")
            if res.diverged:
                reasons.append(res.reason or "diverged")
                log.warning("%s %s again: the step keeps plain removal of block %d", tag, res.reason, orig[p])
    after, mse_after = _group_losses(job, student, skinds, x[:S], y[:S], sec)
    if cfg.consolidate:
        for block in receiving:
            merge_fused_linears(block)
    return before, after, mse_before, mse_after, res, reasons


def fuse_step(job: Job, step: int, p: int, recv: list[int], sec: dict[str, float]) -> tuple[StepReport, list[int]]:
    """Fuse current block ``p`` into the receiving blocks ``recv``, distill the group against its original output,
    remove ``p``. Returns the step's report and the current indices (after the removal) of the changed blocks.

    Divergence (a non-finite loss, or one past ``diverge_factor`` x the first step's) restores the group and
    retries once at half the learning rates; if that diverges too, the step keeps plain removal (every fused term
    is zero again) and the report says so.
    """
    cfg, ad, runner = job.config, job.adapter, job.runner
    k, orig = job.num_removals, job.state.orig
    tag = f"({step + 1}/{k})"
    span = list(range(min(recv[0], p), max(recv[-1], p) + 1))
    g0 = span[0]
    blocks = list(ad.blocks)
    receiving = [blocks[i] for i in recv]
    with job.measure("teacher", sec):  # the group's input, from the cache (before the span is loaded)
        x = job.cache("calib", job.calib_ids).get(g0)
    # offloaded models: the span is loaded for the whole step, the receivers are persisted at its end
    with runner.resident([blocks[i] for i in sorted(set(span) | set(recv))], save=receiving):
        before, after, mse_before, mse_after, res, reasons = _fuse_and_distill(job, step, p, recv, span, x, sec)
    group_orig = [orig[i] for i in recv]
    removed = job.remove_block(p, first_changed=g0)
    changed = [i if i < p else i - 1 for i in recv]
    rep = StepReport(
        step=step, removed=removed, group=group_orig, loss_before=before, loss_after=after, mse_before=mse_before,
        mse_after=mse_after, epoch_losses=res.epoch_losses, train_steps=res.steps, nonfinite=res.nonfinite,
        restored=bool(reasons), retried=bool(reasons), fallback=len(reasons) == 2, divergence=reasons, seconds=sec,
    )
    log.info("%s removed block %d; group loss %.4g -> %.4g (%s)", tag, removed, before, after, cfg.loss)
    return rep, changed


def fuse_and_remove(job: Job, *, receivers: str, selection: Selection | None = None) -> list[StepReport]:
    """The FuseGPT loop: choose a block (``selection``, from the config by default), fuse it into its receivers
    (``local`` partial group or ``global``), distill, remove; from the job's next step (> 0 after a resume)."""
    selection = selection or selection_for(job.config)
    for step in range(job.next_step, job.num_removals):
        sec: dict[str, float] = {}
        p, scores = selection.choose(job, step, sec)
        if job.config.target == "dense":
            ensure_dense_targets(job, selection.plan(job) if receivers == "local" else None)
        if scores is not None:
            log.info("(%d/%d) MI: lowest %s", step + 1, job.num_removals,
                     sorted(scores.items(), key=lambda kv: kv[1])[:3])
        rep, changed = fuse_step(job, step, p, receivers_for(job, p, receivers), sec)
        rep.scores = scores
        job.finish_step(rep, changed)
    return job.state.steps


@register_method("fusegpt", kind="fuse", summary="FuseGPT: MI selection, learnable fusion into the local group",
                 streams=True)
def run_fusegpt(job: Job) -> list[StepReport]:
    return fuse_and_remove(job, receivers="local")


@register_method("fusegpt-global", kind="fuse",
                 summary="FuseGPT fusing into the most similar blocks anywhere (global fusion)", streams=True)
def run_fusegpt_global(job: Job) -> list[StepReport]:
    """The paper's global-fusion contrast: the removed block is fused into the ``global_receivers`` blocks whose
    outputs are most similar (mean token cosine, scoring samples) to its own output, anywhere in the network;
    distillation matches the original span from the first to the last of those blocks."""
    return fuse_and_remove(job, receivers="global")
