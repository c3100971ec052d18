"""FuseGPT: Macro-Influence selection, learnable fusion into a partial group, group-level distillation.

Iterative mode re-scores the current (fused) model before every removal; one-shot mode scores once and removes
the k lowest-MI blocks in turn (each still fused and distilled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .. import faults
from ..distill import ParamGroup, TrainSettings, group_loss, group_window, train_group
from ..distill.losses import head_passes
from ..fusion import FusedLinear, fused_linears, inject_donor, merge_fused_linears
from ..options import option, register_options
from ..scoring import ORDERS, output_similarity
from .base import Job, StepReport, register_method

log = logging.getLogger(__name__)

__all__ = [
    "run_fusegpt", "run_fusegpt_global", "fuse_and_remove", "fuse_step", "param_groups", "receivers_for",
    "Selection", "IterativeMI", "OneShotMI", "FixedPlan", "selection_for", "dense_boundary", "plan_boundaries",
    "dense_target_count", "ensure_dense_targets", "ORDERS", "pick_blocks",
]


def pick_blocks(scores: dict[int, float], k: int, removed: list[int] = (), min_gap: int = 1) -> list[int]:
    """The k lowest-scored blocks (original indices, in score order), preferring blocks at least ``min_gap`` away
    from every block already removed or picked (``min_gap`` 2 = never two neighbours, so the groups of two
    removals overlap less); when too few qualify, the lowest of the rest fill up."""
    ranked = sorted(scores, key=scores.get)
    taken = list(removed)
    out = []
    for b in ranked:
        if len(out) < k and all(abs(b - r) >= min_gap for r in taken):
            out.append(b)
            taken.append(b)
    out += [b for b in ranked if b not in out][: k - len(out)]
    return out


def _info(job: Job) -> int:
    """The level of a step's progress messages: INFO, DEBUG for a quiet job (a search's many cheap fusions)."""
    return logging.DEBUG if job.quiet else logging.INFO


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
        if loss == "mse":
            value = mse = group_loss(job.runner, blocks, kinds, x, y, loss)
        else:  # both from one forward of the group
            value, mse = group_loss(job.runner, blocks, kinds, x, y, [loss, "mse"])
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
    """Scores of the config's ``order`` (MI by default) for every current block, by original index."""
    ids = job.calib_ids[: job.config.score_samples]
    cache = job.cache("score", ids)
    with job.measure("scoring", sec):
        scores = ORDERS[job.config.order](cache, ids, f"({step + 1}/{job.num_removals}) scoring")
    return {job.state.orig[i]: s for i, s in enumerate(scores)}


class IterativeMI(Selection):
    """Re-score (Macro Influence, or the config's ``order``) on the current (fused) model before every removal;
    remove the lowest (away from removed blocks by ``min_gap`` when possible)."""

    def choose(self, job, step, sec):
        scores = _mi_scores(job, step, sec)
        removed = [s.removed for s in job.state.steps]
        return job.state.current(pick_blocks(scores, 1, removed, job.config.min_gap)[0]), scores


class OneShotMI(Selection):
    """Score once (step 0); remove the k lowest in order of their score (``min_gap`` apart when possible)."""

    _scores: dict[int, float] | None = None

    def choose(self, job, step, sec):
        scores = _mi_scores(job, step, sec) if step == 0 else None
        self._scores = scores if scores is not None else self._scores
        return job.state.current(self.plan(job)[step]), scores

    def plan(self, job):
        first = job.state.steps[0].scores if job.state.steps else self._scores
        return pick_blocks(first, job.num_removals, min_gap=job.config.min_gap)


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
    """How many dense boundaries a run keeps (the memory formula's D): with --target dense the plan's for one-shot
    or given blocks with local receivers, else every boundary; the final stage adds the last output."""
    final = 1 if config.final_epochs > 0 else 0
    if config.target != "dense":
        return final
    from ..config import num_removals

    fixed = config.method == "fusegpt" and (config.blocks is not None or config.mode in ("oneshot", "joint"))
    return min(num_removals(config, num_blocks) + final, num_blocks) if fixed else num_blocks


# the key of the final stage's dense targets in the target store when it has its own windows (--final-nsamples)
FINAL_TARGET = -1


def _wants_dense(config) -> bool:
    """Does the run need the dense model's hidden states (as group targets, or for the final stage)?"""
    return config.target == "dense" or config.final_epochs > 0


def ensure_dense_targets(job: Job, boundaries: list[int] | None, sec: dict[str, float], *,
                         final: bool = False) -> None:
    """Fill ``job.state.targets`` {original boundary: [N, T, H]} with the dense model's hidden states.

    A fresh run computes them from the calibration cache while the model is still dense (step 0, after the
    selection's first choice); a resumed run reads the copy its checkpoint wrote then. With ``--target dense``,
    ``boundaries`` (known when the removal order is fixed) limits them to those the steps will use (None: every
    boundary); ``final`` adds the last block's output (the final stage's target). The work is teacher work, timed
    and counted into ``sec["teacher"]`` (as ``fusegpt plan`` predicts it)."""
    if job.state.targets is not None:
        return
    with job.measure("teacher", sec):
        _fill_dense_targets(job, boundaries, final)


def _fill_dense_targets(job: Job, boundaries: list[int] | None, final: bool) -> None:
    if job.state.steps:  # resumed: the model is no longer dense
        store = job.target_store()
        if job.checkpoint is None or not job.checkpoint.load_targets(store):
            raise RuntimeError("--target dense: this resumed run has no saved dense targets (its run folder was "
                               "written without them); start it again without --resume")
        job.state.targets = store
        return
    L = job.adapter.num_blocks
    wanted = []
    if job.config.target == "dense":
        wanted = list(boundaries) if boundaries is not None else list(range(1, L + 1))
    own = final and job.final_ids is not None  # the final stage's windows differ from the group stage's
    wanted = sorted(set(wanted) | ({L} if final and not own else set()))
    cache, store = job.cache("calib", job.calib_ids), job.target_store()
    for b in wanted:
        store.put(b, cache.get(b))
    if own:  # its own windows: the cached rows they share with the calibration windows, the extra ones run here
        n = min(job.final_ids.shape[0], job.calib_ids.shape[0])
        parts = [cache.get(L)[:n]]
        if job.final_ids.shape[0] > n:
            runner = job.runner
            parts.append(runner.run_model_blocks(runner.embed(job.final_ids[n:])).to(parts[0].dtype))
        store.put(FINAL_TARGET, torch.cat(parts))
        wanted.append(FINAL_TARGET)
    job.state.targets = store
    log.log(_info(job), "dense targets cached at %d boundaries: %s", len(wanted), wanted)
    if job.checkpoint is not None:
        job.checkpoint.save_targets(store)


# ---- one step ----------------------------------------------------------------------------------------------------
def receivers_for(job: Job, p: int, how: str) -> list[int]:
    """Current indices of the blocks that receive block p: ``local`` = the partial group (the paper's G window),
    ``global`` = the ``--global-receivers`` blocks whose outputs are most similar to p's (scoring samples)."""
    L = job.adapter.num_blocks
    if how == "local":
        return group_window(p, L, job.config.group_size)
    cache = job.cache("score", job.calib_ids[: job.config.score_samples])
    sims = output_similarity(cache, p, [i for i in range(L) if i != p])
    n = job.config.method_options("global").receivers
    return sorted(sorted(sims, key=sims.__getitem__, reverse=True)[:n])


def _fuse_and_distill(job: Job, step: int, p: int, recv: list[int], span: list[int], x: torch.Tensor,
                      sec: dict[str, float]):
    """Teacher outputs, donor injection, distillation (with the divergence retry), consolidation."""
    cfg, ad, runner = job.config, job.adapter, job.runner
    k, orig = job.num_removals, job.state.orig
    tag = f"({step + 1}/{k})"
    blocks, kinds = list(ad.blocks), ad.block_kinds()
    receiving = [blocks[i] for i in recv]
    if cfg.target == "dense":  # the original model at the span's boundary
        y = job.state.targets.get(dense_boundary(orig, span[-1], job.num_original))
    else:
        with job.measure("teacher", sec):
            y = runner.run([blocks[i] for i in span], [kinds[i] for i in span], x)
    job.note_memory()
    # the student runs the span without p; only the receivers get donors and train (local: span - p == recv)
    student = [blocks[i] for i in span if i != p]
    skinds = [kinds[i] for i in span if i != p]
    inject_donor(ad, blocks[p], receiving, coef_kind=cfg.coef, coef_rank=cfg.coef_rank,
                 lora_rank=cfg.group_lora_rank, generator=job.generator,
                 fold_norms=cfg.fold_norms)
    desc = f"{tag} fusing block {orig[p]} into {orig[recv[0]]}..{orig[recv[-1]]}"
    return _distill(job, step, student, skinds, receiving, x, y, sec, desc)


def _distill(job: Job, step: int, student: list[nn.Module], skinds: list[str], receiving: list[nn.Module],
             x: torch.Tensor, y: torch.Tensor, sec: dict[str, float], desc: str):
    """Train the receivers (their fused terms, LoRA, norms) so the student blocks map x to y; on divergence restore
    and retry at half the learning rates, then give up (plain removal); consolidate. Returns (loss before, after,
    MSE before, after, the TrainResult, the divergence reasons)."""
    cfg, runner = job.config, job.runner
    S, tag = cfg.score_samples, f"({step + 1}/{job.num_removals})"
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
    reasons: list[str] = []
    with job.measure("train", sec, flops_factor=6.0):  # forward + backward (~2x forward)
        desc = None if job.quiet else desc  # no progress bars (a search's many cheap fusions)
        res = train_group(runner, student, skinds, x, y, groups, settings, generator=job.generator, desc=desc)
        trained_tokens = res.tokens
        if res.diverged:
            reasons.append(res.reason or "diverged")
            log.warning("%s %s: group restored; retrying at half the learning rates", tag, res.reason)
            half = [ParamGroup(g.name, g.params, g.lr / 2) for g in groups]
            res = train_group(runner, student, skinds, x, y, half, settings, generator=job.generator,
                              desc=None if desc is None else desc + " (retry, lr / 2)")
            trained_tokens += res.tokens
            if res.diverged:
                reasons.append(res.reason or "diverged")
                log.warning("%s %s again: the step keeps plain removal", tag, res.reason)
    passes = head_passes(cfg.loss, cfg.aux_loss, cfg.aux_weight)  # the LM head of head losses, beside the blocks
    job.flops["train"] += 2.0 * passes * trained_tokens * job.adapter.head_macs_per_token()
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
    log.log(_info(job), "%s removed block %d; group loss %.4g -> %.4g (%s)", tag, removed, before, after, cfg.loss)
    return rep, changed


def fuse_and_remove(job: Job, *, receivers: str, selection: Selection | None = None) -> list[StepReport]:
    """The FuseGPT loop: choose a block (``selection``, from the config by default), fuse it into its receivers
    (``local`` partial group or ``global``), distill, remove; from the job's next step (> 0 after a resume)."""
    if job.config.mode == "joint":
        if receivers != "local":
            raise ValueError("--mode joint fuses into the local groups; fusegpt-global needs oneshot or iterative")
        return fuse_joint(job)
    selection = selection or selection_for(job.config)
    for step in range(job.next_step, job.num_removals):
        sec: dict[str, float] = {}
        p, scores = selection.choose(job, step, sec)
        if job.state.targets is None and _wants_dense(job.config):  # once: before the first removal, or on resume
            plan = selection.plan(job) if receivers == "local" else None
            ensure_dense_targets(job, None if plan is None else plan_boundaries(plan, job.num_original,
                                                                                job.config.group_size),
                                 sec, final=job.config.final_epochs > 0)
        if scores is not None:
            log.info("(%d/%d) MI: lowest %s", step + 1, job.num_removals,
                     sorted(scores.items(), key=lambda kv: kv[1])[:3])
        rep, changed = fuse_step(job, step, p, receivers_for(job, p, receivers), sec)
        rep.scores = scores
        job.finish_step(rep, changed)
    if job.config.final_epochs > 0:
        final_stage(job)
    return job.state.steps


# ---- the paper's one-shot: select once, fuse all, distil each joint span once -----------------------------------
def joint_spans(plan: list[int], num_blocks: int, group_size: int) -> list[tuple[list[int], dict[int, list[int]]]]:
    """Spans of the joint one-shot mode, on original indices: every planned block's window (its G receivers and
    itself) on the unpruned model; windows that share a block form one span. Receivers are the window's blocks
    that are not removed. Returns [(span blocks, {removed block: its receivers})] from the first span to the last;
    the removed blocks of a span keep the plan's order."""
    planned = set(plan)
    windows = {b: sorted(set(group_window(b, num_blocks, group_size)) | {b}) for b in plan}
    spans: list[tuple[set[int], list[int]]] = []
    for b in sorted(plan, key=lambda b: windows[b][0]):
        w = set(windows[b])
        if spans and spans[-1][0] & w:
            spans[-1][0].update(w)
            spans[-1][1].append(b)
        else:
            spans.append((w, [b]))
    out = []
    for blocks, members in spans:
        members = sorted(members, key=plan.index)
        out.append((sorted(blocks), {b: [r for r in windows[b] if r not in planned] for b in members}))
    return out


def fuse_joint(job: Job) -> list[StepReport]:
    """The paper's one-shot: score once, pick the k blocks, inject every removed block into its window's kept
    blocks at once, and distil each span (overlapping windows together) in one training run against the span's
    output: the dense model's at the span's end with ``--target dense`` (natural here), else the model's before
    this span's removals. Spans run front to back, so a span's input is the model with the spans before it fused.
    One StepReport per removed block; a span's losses and training are on its first. Resumable per span."""
    cfg = job.config
    k, L0 = job.num_removals, job.num_original
    sec0: dict[str, float] = {}
    if cfg.blocks is not None:
        scores, plan = None, list(cfg.blocks)
    else:
        scores = _mi_scores(job, 0, sec0) if not job.state.steps else None
        first = scores if scores is not None else job.state.steps[0].scores
        plan = pick_blocks(first, k, min_gap=cfg.min_gap)
    spans = joint_spans(plan, L0, cfg.group_size)
    if _wants_dense(cfg):
        ensure_dense_targets(job, [dense_boundary(list(range(L0)), span[-1], L0) for span, _ in spans], sec0,
                             final=cfg.final_epochs > 0)
    done = {s.removed for s in job.state.steps}
    for span, members in spans:
        if all(b in done for b in members):
            continue
        step0 = job.next_step
        sec = sec0 if step0 == 0 else {}
        removed_here = [b for b in members if b not in done]
        if len(removed_here) == len(members):
            before, after, mse_before, mse_after, res, reasons = _joint_span(job, step0, span, members, sec)
        else:  # resumed between the records of one span: its training is done and saved
            before = after = mse_before = mse_after = res = None
            reasons = []
        kept = [b for b in span if b not in members]
        for j, b in enumerate(removed_here):
            step = job.next_step
            g0 = min(job.state.current(r) for r in span if r in job.state.orig)  # caches stay valid before it
            job.remove_block(job.state.current(b), first_changed=g0)
            lead = j == 0 and res is not None
            rep = StepReport(
                step=step, removed=b, group=members[b], scores=scores if step == 0 else None,
                loss_before=before if lead else None, loss_after=after if lead else None,
                mse_before=mse_before if lead else None, mse_after=mse_after if lead else None,
                epoch_losses=res.epoch_losses if lead else [], train_steps=res.steps if lead else 0,
                nonfinite=res.nonfinite if lead else False, restored=bool(reasons) and lead,
                retried=bool(reasons) and lead, fallback=len(reasons) == 2 and lead,
                divergence=reasons if lead else [], seconds=sec if j == 0 else {},
                extra={"joint_span": [span[0], span[-1]], "removed_with": list(members)})
            # the receivers' trained weights go with the span's first record (a later crash replays it whole)
            changed = [job.state.current(r) for r in kept] if j == 0 else []
            job.finish_step(rep, changed)
            log.info("(%d/%d) removed block %d (joint span %d..%d)", step + 1, k, b, span[0], span[-1])
    if cfg.final_epochs > 0:
        final_stage(job)
    return job.state.steps


def _joint_span(job: Job, step: int, span: list[int], members: dict[int, list[int]], sec: dict[str, float]):
    """Inject every removed block of ``span`` into its receivers, distil the span's kept blocks once."""
    cfg, ad, runner = job.config, job.adapter, job.runner
    cur = [job.state.current(b) for b in span]
    blocks, kinds = list(ad.blocks), ad.block_kinds()
    with runner.resident([blocks[i] for i in cur], save=[blocks[job.state.current(b)] for b in span
                                                          if b not in members]):
        with job.measure("teacher", sec):
            x = job.cache("calib", job.calib_ids).get(cur[0])
            if cfg.target == "dense":
                y = job.state.targets.get(dense_boundary(job.state.orig, cur[-1], job.num_original))
            else:
                y = runner.run([blocks[i] for i in cur], [kinds[i] for i in cur], x)
        job.note_memory()
        for b, recv in members.items():
            inject_donor(ad, blocks[job.state.current(b)], [blocks[job.state.current(r)] for r in recv],
                         coef_kind=cfg.coef, coef_rank=cfg.coef_rank,
                         lora_rank=cfg.group_lora_rank, generator=job.generator,
                         fold_norms=cfg.fold_norms)
        kept = [b for b in span if b not in members]
        student = [blocks[job.state.current(b)] for b in kept]
        skinds = [kinds[job.state.current(b)] for b in kept]
        receiving = [blocks[job.state.current(r)] for r in sorted({r for rs in members.values() for r in rs})]
        desc = f"({step + 1}/{job.num_removals}) joint: fusing {list(members)} into {span[0]}..{span[-1]}"
        return _distill(job, step, student, skinds, receiving, x, y, sec, desc)


def final_stage(job: Job) -> None:
    """End-to-end distillation after the last fusion: every block's LoRA and norms learn the dense model's
    next-token distributions (``logit-kl``; or its final hidden states with ``--final-loss``) on the calibration
    windows; merged into plain linears. Recorded in the last step's report (``extra["final"]``,
    ``seconds["final"]``). A resumed run repeats it from the restored model (it is not checkpointed: it runs once,
    after the last recorded step)."""
    from .heal import lora_heal

    ensure_dense_targets(job, None, job.state.steps[-1].seconds, final=True)  # loaded here only on a resume
    cfg, L0, runner = job.config, job.num_original, job.runner
    group_ckpt = runner.grad_checkpoint  # the memory plan decides the final stage's checkpointing on its own memory
    if job.memory_plan is not None and job.memory_plan.final:
        runner.grad_checkpoint = job.memory_plan.final_checkpoint
    try:
        own = job.final_ids is not None  # --final-nsamples: its own windows, their targets under FINAL_TARGET
        res = lora_heal(job, epochs=cfg.final_epochs, lr=cfg.final_lr,
                        teacher=job.state.targets.get(FINAL_TARGET if own else L0),
                        ids=job.final_ids, batch_size=cfg.final_batch, topk=cfg.final_topk, loss=cfg.final_loss,
                        rank=cfg.final_rank, positions=cfg.final_positions,
                        desc=f"final distillation ({cfg.final_loss} vs dense)")
    finally:
        runner.grad_checkpoint = group_ckpt
    last = job.state.steps[-1]
    last.seconds["final"] = res["seconds"]
    last.extra["final"] = {k: res[k] for k in ("nll_before", "nll_after", "epoch_losses", "steps", "nonfinite",
                                               "restored")}
    log.info("final distillation: calibration NLL %.4f -> %.4f (%d steps, %.1f s)", res["nll_before"],
             res["nll_after"], res["steps"], res["seconds"])


@register_method("fusegpt", kind="fuse", summary="FuseGPT: MI selection, learnable fusion into the local group",
                 streams=True)
def run_fusegpt(job: Job) -> list[StepReport]:
    return fuse_and_remove(job, receivers="local")


@dataclass
class GlobalOptions:
    """fusegpt-global: how many blocks receive the removed one."""

    receivers: int = option(2, "fusegpt-global: blocks that receive the removed one (default 2)", minimum=1)


register_options("global", GlobalOptions)


@register_method("fusegpt-global", kind="fuse", options="global",
                 summary="FuseGPT fusing into the most similar blocks anywhere (global fusion)", streams=True)
def run_fusegpt_global(job: Job) -> list[StepReport]:
    """The paper's global-fusion contrast: the removed block is fused into the ``--global-receivers`` blocks whose
    outputs are most similar (mean token cosine, scoring samples) to its own output, anywhere in the network;
    distillation matches the original span from the first to the last of those blocks."""
    return fuse_and_remove(job, receivers="global")
