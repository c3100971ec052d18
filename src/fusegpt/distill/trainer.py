"""Group-level distillation: train the fused group so its output matches the original group's."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations import Runner
from ..attention import cpu_training_attention
from ..device import trim_heap
from ..distributed import all_reduce_grads, gather_batch, split_batch, world_size
from ..fusion.math import master_dtype
from .losses import LossHead, build_loss, get_loss
from .schedule import lr_factor

__all__ = ["TrainSettings", "TrainResult", "ParamGroup", "train_group", "group_loss"]


@dataclass
class ParamGroup:
    name: str
    params: list[nn.Parameter]
    lr: float


@dataclass
class TrainSettings:
    loss: str = "mse"
    epochs: int = 4
    batch_size: int = 8
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    shuffle: bool = True
    # a loss above this factor times the first step's loss counts as divergence (0 = only non-finite losses)
    diverge_factor: float = 0.0
    # an auxiliary loss added with this weight (None / 0 = none)
    aux_loss: str | None = None
    aux_weight: float = 0.0
    # linear learning-rate warm-up over this fraction of the steps, then cosine; gradient-norm clipping (0 = off)
    warmup: float = 0.0
    clip_grad: float = 0.0

    def loss_fn(self, runner: Runner) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The configured loss (+ auxiliary term) as one ``fn(student, teacher)`` for this runner's model."""
        return build_loss(self.loss, aux=self.aux_loss, aux_weight=self.aux_weight, head=LossHead.for_runner(runner))


@dataclass
class TrainResult:
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    nonfinite: bool = False
    diverged: bool = False  # non-finite, or grew past diverge_factor x the first loss
    reason: str | None = None
    restored: bool = False
    seconds: float = 0.0
    tokens: int = 0  # tokens passed forward+backward through the group


@torch.no_grad()
def group_loss(runner: Runner, blocks: Sequence[nn.Module], kinds: Sequence[str], inputs: torch.Tensor,
               targets: torch.Tensor, loss: str | Sequence[str]) -> float | list[float]:
    """Mean loss of the group on [N, T, H] inputs vs. targets (no gradients), mini-batched. A list of loss names
    returns one mean per name, all from the same forward passes."""
    names = [loss] if isinstance(loss, str) else list(loss)
    head = LossHead.for_runner(runner)
    fns = [get_loss(name, head) for name in names]
    totals, n = [0.0] * len(fns), 0
    for s in range(0, inputs.shape[0], runner.batch_size):
        x = inputs[s : s + runner.batch_size].to(runner.device)
        y = targets[s : s + runner.batch_size].to(runner.device)
        out = runner.forward_blocks(blocks, kinds, x)
        for i, fn in enumerate(fns):
            totals[i] += float(fn(out, y)) * x.shape[0]
        n += x.shape[0]
    means = [t / max(n, 1) for t in totals]
    return means[0] if isinstance(loss, str) else means


def _drop_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def train_group(
    runner: Runner,
    blocks: Sequence[nn.Module],
    kinds: Sequence[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    groups: Sequence[ParamGroup],
    settings: TrainSettings,
    *,
    generator: torch.Generator | None = None,
    desc: str | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Adam + cosine schedule (optionally after a linear warm-up; optional gradient-norm clipping) over ``epochs``
    passes of mini-batches.

    ``inputs`` / ``targets``: [N, T, H] on the offload device. Blocks run in eval mode (no dropout), like the
    teacher. A non-finite loss stops training and restores
    every trained parameter to its value before training (``result.restored``). ``loss_fn(output, target)``
    replaces the named ``settings.loss`` (``targets`` may then be anything indexable by sample, e.g. token ids).
    A loss that grows past ``settings.diverge_factor`` times the first step's loss is divergence too: training
    stops and the parameters are restored the same way (``result.diverged``, ``result.reason``).
    """
    res = TrainResult()
    params = [p for g in groups for p in g.params]
    if settings.epochs == 0 or not params:
        return res
    t0 = time.perf_counter()
    snapshot = [p.detach().clone() for p in params]
    # fp32 masters: half-precision parameters (norms of a model loaded in bf16) train in fp32 and are cast back
    stored = [p.dtype for p in params]
    for p in params:
        if master_dtype(p.dtype) != p.dtype:
            p.data = p.data.to(master_dtype(p.dtype))
        p.requires_grad_(True)
    opt = torch.optim.Adam(
        [{"params": g.params, "lr": g.lr} for g in groups if g.params],
        betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay,
    )
    base_lrs = [pg["lr"] for pg in opt.param_groups]
    fn = loss_fn or settings.loss_fn(runner)
    n = inputs.shape[0]
    per_epoch = (n + settings.batch_size - 1) // settings.batch_size
    total_steps = settings.epochs * per_epoch
    warmup = int(round(settings.warmup * total_steps))
    # the blocks stay in eval mode: the teacher ran in eval mode, so the student must compute the same function
    # (training mode would switch dropout on for models whose config has it)
    bar = tqdm(total=total_steps, desc=desc, disable=desc is None, leave=False)
    start = 0.0  # the first step's loss
    # while these blocks train, transformers' SDPA runs the written-out attention where it applies (a CPU in half
    # precision: its backward is several times faster there than the flash kernel's; fusegpt.attention)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        stack.callback(_drop_grads, params)
        stack.enter_context(cpu_training_attention())
        for epoch in range(settings.epochs):
            order = torch.randperm(n, generator=generator) if settings.shuffle else torch.arange(n)
            running, seen = 0.0, 0
            for s in range(0, n, settings.batch_size):
                idx = order[s : s + settings.batch_size]
                # data parallel: this rank runs its part of the mini-batch; the loss is the whole mini-batch's
                x = inputs[split_batch(idx)].to(runner.device)
                y = targets[idx].to(runner.device)
                for pg, lr in zip(opt.param_groups, base_lrs):
                    pg["lr"] = lr * lr_factor(res.steps, total_steps, warmup)
                out = gather_batch(runner.forward_blocks(blocks, kinds, x))
                loss = fn(out, y)
                if not torch.isfinite(loss):
                    res.nonfinite = True
                    res.reason = f"non-finite loss at step {res.steps + 1}"
                    break
                value = float(loss.detach())
                start = value if res.steps == 0 else start
                if settings.diverge_factor > 0 and res.steps > 0 and value > settings.diverge_factor * start:
                    res.diverged = True
                    res.reason = (f"loss {value:.4g} at step {res.steps + 1} > {settings.diverge_factor:g} x the "
                                  f"first step's {start:.4g}")
                    break
                opt.zero_grad(set_to_none=True)
                # every rank holds the same loss; the gather's backward sums the ranks' gradients for each part
                (loss / world_size()).backward()
                all_reduce_grads(params)
                if settings.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.clip_grad)
                opt.step()
                del loss
                trim_heap()
                res.steps += 1
                res.tokens += idx.numel() * x.shape[1]
                running += value * x.shape[0]
                seen += x.shape[0]
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{value:.4g}")
            if res.nonfinite or res.diverged:
                break
            res.epoch_losses.append(running / max(seen, 1))
            if on_epoch is not None:
                on_epoch(epoch, res.epoch_losses[-1])
        if not (res.nonfinite or res.diverged) and not all(torch.isfinite(p).all() for p in params):
            res.nonfinite = True
            res.reason = "non-finite parameters after training"
    res.diverged = res.diverged or res.nonfinite
    if res.diverged:
        with torch.no_grad():
            for p, old in zip(params, snapshot):
                p.copy_(old)
        res.restored = True
    for p, dt in zip(params, stored):
        if p.dtype != dt:
            p.data = p.data.to(dt)
    for p in params:
        p.requires_grad_(False)
    res.seconds = time.perf_counter() - t0
    return res
