"""Group-distillation losses: student and teacher are [B, T, H] group outputs (the residual stream).

Two kinds, one registry:

- hidden-state losses ``fn(student, teacher)`` compare the residual streams directly (``mse``, ``nmse``,
  ``cosine``, ``kl-batch``, ``kl-hidden``);
- head losses ``fn(student, teacher, head)`` look at the streams through the model's frozen final norm (and LM
  head): ``mse-norm`` (MSE after the final norm), ``logit-kl`` (KL of next-token distributions). A few very large
  residual channels dominate every raw hidden-state distance; the final norm rescales them the way the model's own
  prediction does, and the logits are what the model is judged on. ``head`` is a :class:`LossHead` (the adapter's
  final norm and LM head, run under the compute dtype's autocast); no gradient reaches its weights.

:func:`build_loss` turns a name (and an optional weighted auxiliary loss) into one ``fn(student, teacher)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..device import autocast

__all__ = ["LOSSES", "LossHead", "build_loss", "get_loss", "register_loss", "head_passes"]

LossFn = Callable[..., torch.Tensor]
LOSSES: dict[str, LossFn] = {}
_NEEDS_HEAD: set[str] = set()
_HEAD_PASSES: dict[str, int] = {}


def register_loss(name: str, *, head: bool = False, passes: int = 0) -> Callable[[LossFn], LossFn]:
    """Register a loss; ``head=True``: it is called as ``fn(student, teacher, head)``. ``passes``: forward-pass
    equivalents of the LM head per trained token (for the FLOP count; recomputation not counted)."""

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = fn
        if head:
            _NEEDS_HEAD.add(name)
        _HEAD_PASSES[name] = passes
        return fn

    return deco


# tokens per logits chunk of the head losses (the memory formula's final-stage term holds one chunk of these)
LOGIT_CHUNK = 512


@dataclass
class LossHead:
    """The frozen end of the model for head losses: ``norm(h)`` = final norm, ``logits(h)`` = final norm + LM head.
    ``autocast`` is a context factory (the runner's compute dtype); ``chunk`` = tokens per logits chunk (a chunk's
    [chunk, V] logits are freed once its gradient is known, so memory holds one chunk, not [B, T, V])."""

    norm_fn: Callable[[torch.Tensor], torch.Tensor]
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    autocast: Callable[[], Any] = contextlib.nullcontext
    chunk: int = LOGIT_CHUNK

    @classmethod
    def for_runner(cls, runner) -> "LossHead":
        return cls(runner.adapter.final_norm, runner.adapter.head,
                   lambda: autocast(runner.device, runner.compute_dtype))

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.norm_fn(h)


# ---- hidden-state losses -------------------------------------------------------------------------------------
@register_loss("kl-batch")
def kl_batch(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The reference loss: KL(softmax(teacher) || softmax(student)) with softmax over the *batch* axis (dim 0),
    'batchmean' reduction (sum / B)."""
    return F.kl_div(F.log_softmax(student.float(), dim=0), F.softmax(teacher.float(), dim=0), reduction="batchmean")


@register_loss("kl-hidden")
def kl_hidden(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL with softmax over the hidden axis, averaged over tokens."""
    s = F.log_softmax(student.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)


@register_loss("mse")
def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float())


@register_loss("nmse")
def nmse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-token normalised MSE: mean over tokens of ||s - t||^2 / ||t||^2 (every token counts the same, whatever
    the scale of its residual stream)."""
    s, t = student.float(), teacher.float()
    return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()


@register_loss("cosine")
def cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - mean token cosine similarity."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


# ---- head losses ---------------------------------------------------------------------------------------------
@register_loss("mse-norm", head=True)
def mse_norm(student: torch.Tensor, teacher: torch.Tensor, head: LossHead) -> torch.Tensor:
    """MSE after the frozen final norm (the scale the LM head sees)."""
    with torch.no_grad():
        t = head.norm(teacher).float()
    return F.mse_loss(head.norm(student).float(), t)


def _chunked_kl(s: torch.Tensor, t: torch.Tensor, logits_fn, compute, chunk: int,
                grad: torch.Tensor | None = None) -> torch.Tensor:
    """Summed KL(teacher || student) of the next-token distributions of [tokens, H] ``s`` / ``t``, ``chunk`` tokens
    at a time. With ``grad`` ([tokens, H], written in place) also d KL / d s, from d KL / d student logits =
    softmax(student) - softmax(teacher), known as soon as both distributions are: each chunk's [chunk, V] logits
    are freed at once and never recomputed."""
    total = torch.zeros((), dtype=torch.float32, device=s.device)
    for i in range(0, s.shape[0], chunk):
        sc = s[i : i + chunk].detach().requires_grad_(grad is not None)
        with torch.set_grad_enabled(grad is not None), compute():
            ls = logits_fn(sc)
        with torch.no_grad():
            with compute():
                lt = logits_fn(t[i : i + chunk])
            log_ps, log_pt = F.log_softmax(ls.float(), -1), F.log_softmax(lt.float(), -1)
            del lt
            total += F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)
            if grad is None:
                continue
            d = log_ps.exp_().sub_(log_pt.exp_())  # softmax(s) - softmax(t), in place
            del log_pt
        (grad[i : i + chunk],) = torch.autograd.grad(ls, sc, d.to(ls.dtype))
    return total


class _HeadKL(torch.autograd.Function):
    """Summed logit KL whose gradient is computed in the forward pass (:func:`_chunked_kl`, the way fused
    linear-cross-entropy kernels do it); backward only scales the stored [tokens, H] gradient. The head's own
    parameters get no gradient (it is frozen)."""

    @staticmethod
    def forward(ctx, s, t, logits_fn, compute, chunk):
        grad = torch.empty_like(s)
        total = _chunked_kl(s, t, logits_fn, compute, chunk, grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


@register_loss("logit-kl", head=True, passes=3)  # student forward + input gradient (2), teacher forward (1)
def logit_kl(student: torch.Tensor, teacher: torch.Tensor, head: LossHead) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions through the frozen final norm + LM head, mean over
    tokens. Chunked over tokens, with the gradient computed in the forward pass when the student needs one, so the
    [tokens, V] logits of one chunk are held at a time and the head runs 3 times per token, not 4."""
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1]).detach()
    if torch.is_grad_enabled() and s.requires_grad:
        total = _HeadKL.apply(s, t, head.logits_fn, head.autocast, head.chunk)
    else:
        total = _chunked_kl(s, t, head.logits_fn, head.autocast, head.chunk)
    return total / s.shape[0]


# ---- lookup --------------------------------------------------------------------------------------------------
def get_loss(name: str, head: LossHead | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``name`` as ``fn(student, teacher)`` (head losses bound to ``head``; the others ignore it)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; use one of {sorted(LOSSES)}")
    fn = LOSSES[name]
    if name in _NEEDS_HEAD:
        if head is None:
            raise ValueError(f"loss {name!r} looks through the model's final norm / LM head: pass head=LossHead")
        return lambda s, t: fn(s, t, head)
    return fn


def head_passes(name: str, aux: str | None = None, aux_weight: float = 0.0) -> int:
    """LM-head forward-pass equivalents per trained token of ``name`` (+ ``aux`` when weighted): what a training
    step spends in the head besides the blocks (logit-kl: 3; hidden-state losses: 0)."""
    return _HEAD_PASSES.get(name, 0) + (_HEAD_PASSES.get(aux, 0) if aux and aux_weight else 0)


def build_loss(name: str, *, aux: str | None = None, aux_weight: float = 0.0,
               head: LossHead | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``name`` plus ``aux_weight`` x ``aux`` (when both are set) as one ``fn(student, teacher)``."""
    main = get_loss(name, head)
    if not aux or aux_weight == 0:
        return main
    extra = get_loss(aux, head)
    return lambda s, t: main(s, t) + aux_weight * extra(s, t)
