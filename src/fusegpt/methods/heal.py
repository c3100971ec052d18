"""``heal-lora``: a removal method (``--heal-from``, default SLEB) followed by LoRA fine-tuning of the remaining
model on the same calibration budget (the "SLEB + LoRA" two-stage pipeline of the paper's cost tables).

LoRA (rank ``lora_rank``, B = 0 so the model is unchanged at start) goes on every linear of every remaining
block; the loss is the next-token cross-entropy of the calibration sequences through the full model; Adam with
the cosine schedule, ``epochs`` passes over the ``nsamples`` sequences in batches of ``batch_size``, at ``lr``.
The adapters are merged into plain linears at the end. The extra time is reported as ``seconds["heal"]``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..distill import ParamGroup, TrainSettings, train_group
from ..distill.losses import LossHead, TeacherTopK, get_loss, head_passes, teacher_topk
from ..fusion import FusedLinear, merge_fused_linears, wrap_block
from ..nll import next_token_loss
from ..options import option, register_options
from ..scoring import lm_nll
from .base import Job, StepReport, get_method, method_info, register_method

log = logging.getLogger(__name__)

__all__ = ["run_heal_lora", "lora_heal", "sampled_positions"]


def lora_heal(job: Job, *, epochs: int | None = None, lr: float | None = None, teacher=None, ids=None,
              batch_size: int | None = None, topk: int = 0, loss: str = "logit-kl", rank: int | None = None,
              positions: float = 1.0, desc: str = "LoRA healing") -> dict:
    """LoRA fine-tuning of every block of ``job.model`` on the calibration sequences (in place, merged).

    Without ``teacher`` the loss is the next-token cross-entropy; with ``teacher`` ([N, T, H], the dense model's
    final hidden states of the same sequences) it is the KL of the next-token distributions against the dense
    model's (``logit-kl`` through the frozen final norm and head: end-to-end distillation), or the hidden-state
    ``loss`` named against them (``nmse``, ``mse-norm``, ...: no LM head in the step). The norms train too when
    distilling. ``epochs`` / ``lr`` / ``batch_size`` default to the config's; ``ids`` ([N, T]) to the
    calibration windows. ``topk`` > 0 keeps the teacher's distributions as their ``topk`` most likely tokens and
    the rest's mass, computed once (:func:`fusegpt.distill.losses.teacher_topk`), instead of running the LM head
    on the teacher at every step. ``rank`` = the adapters' rank (default ``--lora-rank``); ``positions`` < 1 trains
    the logit KL on that fraction of each mini-batch's token positions (:func:`sampled_positions`)."""
    cfg, ad, runner = job.config, job.adapter, job.runner
    rank = cfg.lora_rank if rank is None else rank
    if rank < 1:
        raise ValueError("LoRA healing / the final distillation needs --lora-rank >= 1")
    if positions < 1 and (teacher is None or loss != "logit-kl"):
        raise ValueError("sampled positions are for the logit-kl distillation against a teacher")
    if topk > 0 and loss != "logit-kl":
        raise ValueError(f"a top-k teacher keeps next-token distributions, which only the logit-kl loss uses, "
                         f"not {loss!r}")
    epochs = cfg.epochs if epochs is None else epochs
    lr = cfg.lr if lr is None else lr
    ids = job.calib_ids if ids is None else ids
    t = time.perf_counter()
    x = runner.embed(ids)
    score_ids, score_x = ids[: cfg.score_samples], x[: cfg.score_samples]
    before = lm_nll(runner, runner.run_model_blocks(score_x), score_ids)
    blocks, kinds = list(ad.blocks), ad.block_kinds()
    lora, norms = [], []
    for b in blocks:
        for fl in wrap_block(ad, b, lora_rank=rank, generator=job.generator).values():
            lora += fl.lora_parameters()
        norms += [p for n, p in b.named_parameters() if "norm" in n] if teacher is not None else []

    def lm_loss(out: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        logits = ad.head(out)
        return next_token_loss(logits, target_ids)

    settings = TrainSettings(loss=loss, epochs=epochs, batch_size=batch_size or cfg.batch_size,
                             betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, shuffle=cfg.shuffle,
                             warmup=cfg.warmup, clip_grad=cfg.clip_grad)
    groups = [ParamGroup("lora", lora, lr)] + ([ParamGroup("norm", norms, lr)] if norms else [])
    if teacher is not None and topk > 0:
        teacher = teacher_topk(teacher, LossHead.for_runner(runner), topk, device=runner.device)
        job.flops["train"] += 2.0 * teacher.log_tail.numel() * ad.head_macs_per_token()  # the teacher's head, once
    loss_fn = lm_loss if teacher is None else None
    if positions < 1:
        # its own stream (the seed's), so the windows' shuffle order is the same as with every position
        draws = torch.Generator().manual_seed(cfg.seed + POSITION_SEED)
        loss_fn = sampled_positions(get_loss(loss, LossHead.for_runner(runner)), positions, draws)
    m0, w0 = runner.macs, runner.weight_macs
    res = train_group(runner, blocks, kinds, x, ids if teacher is None else teacher, groups, settings,
                      generator=job.generator, desc=desc, loss_fn=loss_fn)
    job.flops["train"] += lora_training_flops(ad, blocks, runner.macs - m0, runner.weight_macs - w0, res.tokens)
    # the LM head (frozen): with a teacher its loss's passes (logit KL: 3, or 2 with a top-k teacher; hidden-state
    # losses: 0); cross-entropy: the student's forward + input gradient
    passes = (head_passes(loss) - (topk > 0)) if teacher is not None else 2
    job.flops["train"] += 2.0 * passes * sampled_count(res.tokens, positions) * ad.head_macs_per_token()
    for b in blocks:
        merge_fused_linears(b)
    assert not any(isinstance(m, FusedLinear) for m in ad.model.modules())
    after = lm_nll(runner, runner.run_model_blocks(score_x), score_ids)
    log.info("LoRA healing: calibration NLL %.4f -> %.4f in %.1f s", before, after, time.perf_counter() - t)
    return {"seconds": time.perf_counter() - t, "nll_before": before, "nll_after": after,
            "epoch_losses": res.epoch_losses, "steps": res.steps, "nonfinite": res.nonfinite,
            "restored": res.restored}


# added to --seed for the stream that draws the final stage's sampled positions
POSITION_SEED = 104729


def sampled_count(tokens: int, fraction: float) -> int:
    """Token positions trained of ``tokens`` at ``fraction`` (at least one)."""
    return tokens if fraction >= 1 else max(1, round(fraction * tokens))


def sampled_positions(fn, fraction: float, generator: torch.Generator):
    """``fn(student, teacher)`` on a random ``fraction`` of the [B, T, ...] mini-batch's token positions, drawn
    anew at every call from ``generator`` (without replacement, in position order): the blocks' outputs at every
    position stay in the step (attention mixes them), only the loss, and the LM head behind it, sees fewer. The
    teacher is a tensor or a :class:`TeacherTopK`, indexed like the student."""

    def loss(student: torch.Tensor, teacher) -> torch.Tensor:
        n = student.shape[0] * student.shape[1]
        pick = torch.randperm(n, generator=generator)[: sampled_count(n, fraction)].sort().values
        t = (teacher.flat()[pick.to(teacher.logp.device)] if isinstance(teacher, TeacherTopK)
             else teacher.reshape(n, -1)[pick.to(teacher.device)])
        return fn(student.reshape(n, -1)[pick.to(student.device)], t)

    return loss


def lora_training_flops(adapter, blocks, macs: float, weight_macs: float, tokens: int) -> float:
    """FLOPs of training LoRA alone on frozen ``blocks`` over ``tokens`` tokens whose forward the runner counted as
    ``macs`` (of which ``weight_macs`` formed W_eff = W + B A): the linears' token products twice (forward and
    the input gradient; the frozen base has no weight gradient), attention three times (its backward is twice its
    forward), W_eff once (forward only), and LoRA's rank-r backward products (FusedLinear.lora_token_macs)."""
    linear = tokens * sum(m.in_features * m.out_features for b in blocks for m in adapter.block_linears(b).values())
    attention = macs - weight_macs - linear
    lora = sum(m.lora_token_macs() for b in blocks for m in b.modules() if isinstance(m, FusedLinear))
    return 2.0 * (2 * linear + 3 * attention + weight_macs + tokens * lora)


def _removal_methods() -> list[str]:
    from .base import method_names

    return [m for m in method_names() if method_info(m).kind in ("drop", "merge")]


@dataclass
class HealOptions:
    """heal-lora: which removal method leaves the model that LoRA fine-tuning heals."""

    base: str = option("sleb", "heal-lora: the drop or merge method whose result is healed (default sleb)",
                       choices=_removal_methods, key="from")


register_options("heal", HealOptions)


@register_method("heal-lora", kind="heal", summary="a removal method followed by LoRA fine-tuning", resumable=False,
                 options="heal")
def run_heal_lora(job: Job) -> list[StepReport]:
    base = job.config.method_options("heal").base
    if method_info(base).kind not in ("drop", "merge"):
        raise ValueError(f"--heal-from must be a drop or merge method, got {base!r} ({method_info(base).kind})")
    t = time.perf_counter()
    steps = get_method(base)(job)
    removal_seconds = time.perf_counter() - t
    heal = lora_heal(job)
    last = steps[-1]
    last.epoch_losses = heal["epoch_losses"]
    last.train_steps = heal["steps"]
    last.nonfinite, last.restored = heal["nonfinite"], heal["restored"]
    last.loss_before, last.loss_after = heal["nll_before"], heal["nll_after"]
    last.seconds["heal"] = heal["seconds"]
    last.extra["heal"] = {"from": base, "removal_seconds": removal_seconds, "loss": "next-token NLL (score samples)"}
    return steps
