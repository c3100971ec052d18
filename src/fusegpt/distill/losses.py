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
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..device import autocast

__all__ = ["LOSSES", "LossHead", "TeacherTopK", "build_loss", "get_loss", "register_loss", "head_passes",
           "teacher_topk"]

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
# bytes of one fp32 [rows, V] block of the KL's elementwise passes: a chunk's logits come from one matmul (the head's
# weight read once per chunk), then its log-softmaxes, exp, difference and gradient run a few rows at a time, so the
# four fp32 [rows, V] temporaries stay in cache instead of each pass streaming [chunk, V] through memory
KL_BLOCK_BYTES = 2 * 2**20


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


@dataclass
class TeacherTopK:
    """The teacher's next-token distributions kept as their ``k`` most likely tokens: ``logp`` / ``idx`` [..., k]
    (log-probabilities and token ids) and ``log_tail`` [...] (log of the mass of every other token). Computed
    once (:func:`teacher_topk`), it replaces the teacher's LM-head pass at every step; the logit KL is then taken
    between the two distributions coarsened to these k + 1 outcomes. Indexable by sample like a tensor."""

    logp: torch.Tensor
    idx: torch.Tensor
    log_tail: torch.Tensor

    def __getitem__(self, key) -> "TeacherTopK":
        return TeacherTopK(self.logp[key], self.idx[key], self.log_tail[key])

    def to(self, device) -> "TeacherTopK":
        return TeacherTopK(self.logp.to(device), self.idx.to(device), self.log_tail.to(device))

    def flat(self) -> "TeacherTopK":
        """Tokens in one axis: [tokens, k] / [tokens]."""
        k = self.logp.shape[-1]
        return TeacherTopK(self.logp.reshape(-1, k), self.idx.reshape(-1, k), self.log_tail.reshape(-1))

    @property
    def shape(self) -> torch.Size:
        return self.log_tail.shape


@torch.no_grad()
def teacher_topk(hidden: torch.Tensor, head: LossHead, k: int, device: torch.device | str | None = None) -> TeacherTopK:
    """The top-``k`` next-token distributions of the teacher's [N, T, H] final hidden states through ``head``, in
    chunks of ``head.chunk`` tokens run on ``device`` (the head's; default ``hidden``'s), kept on ``hidden``'s
    device (the offload device, beside the hidden states)."""
    n, t, width = hidden.shape
    flat = hidden.reshape(-1, width)
    logp = idx = tail = None  # written chunk by chunk (a list + torch.cat would hold the result twice at the end)
    for i in range(0, flat.shape[0], head.chunk):
        with head.autocast():
            lt = head.logits_fn(flat[i : i + head.chunk].to(device or hidden.device))
        lp = F.log_softmax(lt.float(), -1)
        del lt
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)
        if logp is None:
            kk = top.values.shape[-1]
            logp = torch.empty(n * t, kk, dtype=torch.float32, device=hidden.device)
            idx = torch.empty(n * t, kk, dtype=torch.int32, device=hidden.device)  # vocabularies are far below 2^31
            tail = torch.empty(n * t, dtype=torch.float32, device=hidden.device)
        at = slice(i, i + lp.shape[0])
        logp[at], idx[at] = top.values, top.indices.to(torch.int32)
        lp.scatter_(-1, top.indices, float("-inf"))
        tail[at] = torch.logsumexp(lp, -1)  # -inf when the top k hold every token
        del lp
    return TeacherTopK(logp.view(n, t, -1), idx.view(n, t, -1), tail.view(n, t))


def _topk_kl(log_ps: torch.Tensor, t: TeacherTopK, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed KL(teacher || student) over the k + 1 outcomes of ``t`` (the top k tokens, the rest as one) for
    [tokens, V] student log-probabilities; with ``grad`` also d KL / d student logits = q - p~, where p~ is the
    teacher's probability on its top k and its tail mass spread over the other tokens in the student's proportions
    (p_tail q_j / q_tail). ``log_ps`` is consumed."""
    idx = t.idx.long()
    lq_k = log_ps.gather(-1, idx)
    # the student's tail: 1 - its top-k mass (summed in fp64), or, where that leaves less than 1e-4 and the
    # subtraction would lose digits, the log-sum-exp of the other tokens
    lq_tail = torch.log1p(-lq_k.double().exp().sum(-1).clamp_max(1.0)).float()
    low = (lq_tail < math.log(1e-4)).nonzero().squeeze(1)
    if low.numel():
        lq_tail[low] = torch.logsumexp(log_ps[low].scatter_(-1, idx[low], float("-inf")), -1)
    p_k, p_tail = t.logp.exp(), t.log_tail.exp()
    live = p_tail > 0  # the teacher's tail is empty when its top k hold every token
    kl = (p_k * (t.logp - lq_k)).sum() + torch.where(live, p_tail * (t.log_tail - lq_tail), 0.0).sum()
    if not grad:
        return kl, None
    ratio = torch.where(live, p_tail / lq_tail.exp().clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    d = log_ps.exp_().mul_((1.0 - ratio).unsqueeze(-1))  # tail tokens: q_j - p_tail q_j / q_tail
    d.scatter_(-1, idx, lq_k.exp() - p_k)  # top k: q_j - p_j
    return kl, d


def _kl_rows(ls: torch.Tensor, lt: torch.Tensor, d: torch.Tensor | None, block_bytes: int) -> torch.Tensor:
    """Summed KL(softmax(lt) || softmax(ls)) of [n, V] student / teacher logits, in fp32, on a CPU a block of rows at
    a time (``block_bytes`` of fp32 per [rows, V] temporary); with ``d`` ([n, V], written) also softmax(ls) -
    softmax(lt), the KL's gradient with respect to the student logits."""
    total = torch.zeros((), dtype=torch.float32, device=ls.device)
    # a CPU's caches are what the blocks are for; on an accelerator each block would be one more round of kernel
    # launches, so the chunk stays whole there
    rows = max(1, block_bytes // (4 * ls.shape[-1])) if ls.device.type == "cpu" else ls.shape[0]
    for j in range(0, ls.shape[0], rows):
        log_ps = F.log_softmax(ls[j : j + rows].float(), -1)
        log_pt = F.log_softmax(lt[j : j + rows].float(), -1)
        # sum p_t (log p_t - log p_s) as one dot product over two in-place passes (F.kl_div formed three more
        # arrays: exp, difference, product)
        p_t = log_pt.exp()
        total += torch.dot(p_t.view(-1), log_pt.sub_(log_ps).view(-1))
        if d is not None:
            d[j : j + rows] = log_ps.exp_().sub_(p_t)  # softmax(s) - softmax(t)
    return total


def _chunked_kl(s: torch.Tensor, t: torch.Tensor | TeacherTopK, logits_fn, compute, chunk: int,
                grad: torch.Tensor | None = None) -> torch.Tensor:
    """Summed KL(teacher || student) of the next-token distributions of [tokens, H] ``s`` and ``t`` ([tokens, H]
    teacher hidden states, or a flat :class:`TeacherTopK`), ``chunk`` tokens at a time. With ``grad`` ([tokens, H],
    written in place) also d KL / d s, from d KL / d student logits = softmax(student) - softmax(teacher) (top-k:
    :func:`_topk_kl`), known as soon as both distributions are: each chunk's [chunk, V] logits are freed at once
    and never recomputed."""
    total = torch.zeros((), dtype=torch.float32, device=s.device)
    for i in range(0, s.shape[0], chunk):
        sc = s[i : i + chunk].detach().requires_grad_(grad is not None)
        with torch.set_grad_enabled(grad is not None), compute():
            ls = logits_fn(sc)
        with torch.no_grad():
            if isinstance(t, TeacherTopK):
                kl, d = _topk_kl(F.log_softmax(ls.float(), -1), t[i : i + chunk], grad is not None)
                total += kl
                if d is None:
                    continue
            else:
                with compute():
                    lt = logits_fn(t[i : i + chunk])
                d = None if grad is None else torch.empty_like(ls)
                total += _kl_rows(ls, lt, d, KL_BLOCK_BYTES)
                del lt
                if d is None:
                    continue
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
def logit_kl(student: torch.Tensor, teacher: torch.Tensor | TeacherTopK, head: LossHead) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions through the frozen final norm + LM head, mean over
    tokens. Chunked over tokens, with the gradient computed in the forward pass when the student needs one, so the
    [tokens, V] logits of one chunk are held at a time and the head runs 3 times per token, not 4 (2 when the
    teacher comes as a precomputed :class:`TeacherTopK`)."""
    s = student.reshape(-1, student.shape[-1])
    t = teacher.flat() if isinstance(teacher, TeacherTopK) else teacher.reshape(-1, teacher.shape[-1]).detach()
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
