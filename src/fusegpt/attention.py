"""Attention for training on a CPU in half precision: the softmax written out, with a hand-written backward.

PyTorch's CPU flash-attention kernel (what transformers' ``sdpa`` runs) has a slow backward: for the ``cpu``
preset's shapes (4 x 256 tokens, 9 query / 3 key-value heads of 64, bf16) 10.5 ms against 1.7 ms for its forward,
several times the arithmetic. Written out, the same attention is four batched matmuls and a few passes over the
[T, S] scores, and the probabilities kept for backward are small at these lengths (4.7 MB per block).
:func:`training_attention` swaps it in for transformers' ``sdpa`` implementation while distillation trains
(:func:`cpu_training_attention`), only where it applies: a CPU, autograd recording, half-precision compute, no
dropout / soft-capping / position bias / KV cache, and scores small enough to keep. Everything else (scoring,
evaluation, GPUs, long sequences) still runs the stock kernel.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .fusion.math import HALF_DTYPES, matmul_dtype

__all__ = ["attention", "cpu_training_attention", "training_attention", "MAX_SAVED_BYTES"]

# the most bytes of half-precision probabilities one call may keep for backward (else the stock kernel runs)
MAX_SAVED_BYTES = 64 * 2**20


_CAUSAL: dict[tuple, torch.Tensor] = {}


def _causal(t: int, s: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The additive causal mask of T queries ending at the last of S keys: -inf above the diagonal, else 0 (one
    per shape, kept: adding it is several times faster than a broadcast masked_fill)."""
    key = (t, s, str(device), dtype)
    if key not in _CAUSAL:
        if len(_CAUSAL) > 16:
            _CAUSAL.clear()
        hide = torch.ones(t, s, dtype=torch.bool, device=device).triu_(s - t + 1)
        _CAUSAL[key] = torch.zeros(t, s, dtype=dtype, device=device).masked_fill_(hide, float("-inf"))
    return _CAUSAL[key]


class _Attention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v with grouped key-value heads, the probabilities in the compute dtype.

    q [B, H, T, D], k / v [B, KV, S, D] (H a multiple of KV), ``mask``: None = causal, a bool tensor broadcastable
    to [B, 1, T, S] (True = attend) or an additive float one. Returns [B, H, T, D] in ``cdt``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, cdt):
        b, h, t, d = q.shape
        kv, s = k.shape[1], k.shape[2]
        g = h // kv
        acc = torch.promote_types(cdt, torch.float32)  # softmax and its backward: at least fp32
        with torch.autocast(q.device.type, enabled=False):
            qg = q.to(cdt).reshape(b, kv, g * t, d)  # the g query heads that share a key-value head, stacked
            kc, vc = k.to(cdt), v.to(cdt)
            scores = torch.matmul(qg, kc.transpose(-1, -2)).to(acc).mul_(scale)
            view = scores.view(b, kv, g, t, s)
            if mask is None:
                view.add_(_causal(t, s, q.device, acc))
            elif mask.dtype == torch.bool:
                view.masked_fill_(~mask.unsqueeze(2), float("-inf"))
            else:
                view.add_(mask.unsqueeze(2).to(acc))
            p = torch.softmax(scores, -1).to(cdt)
            del scores, view
            out = torch.matmul(p, vc)
        ctx.save_for_backward(qg, kc, vc, p, out)
        ctx.scale, ctx.shape, ctx.dtypes = scale, (b, h, t, d), (q.dtype, k.dtype, v.dtype)
        return out.view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad):
        qg, kc, vc, p, out = ctx.saved_tensors
        b, h, t, d = ctx.shape
        kv = kc.shape[1]
        with torch.autocast(grad.device.type, enabled=False):
            go = grad.to(p.dtype).reshape(b, kv, -1, d)
            dv = torch.matmul(p.transpose(-1, -2), go)  # sums the g query heads of each key-value head
            acc = torch.promote_types(p.dtype, torch.float32)
            dp = torch.matmul(go, vc.transpose(-1, -2)).to(acc)
            # softmax backward: dS = P (dP - rowsum(dO * O)), masked entries have P = 0
            delta = (go.to(acc) * out.to(acc)).sum(-1, keepdim=True)
            ds = dp.sub_(delta).mul_(p).mul_(ctx.scale).to(p.dtype)
            del dp, delta
            dq = torch.matmul(ds, kc).view(b, h, t, d)
            dk = torch.matmul(ds.transpose(-1, -2), qg)
        qdt, kdt, vdt = ctx.dtypes
        return dq.to(qdt), dk.to(kdt), dv.to(vdt), None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, H, T, D] attention of q [B, H, T, D] over k / v [B, KV, S, D] (``mask`` None = causal; see
    :class:`_Attention`), computed in ``dtype`` (default: autocast's where it is on, else q's)."""
    dtype = matmul_dtype(q) if dtype is None else dtype
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not share {k.shape[1]} key-value heads evenly")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _Attention.apply(q, k, v, mask, scale, dtype)


def _applies(query, key, value, mask, dropout, kwargs) -> torch.dtype | None:
    """The compute dtype when the written-out attention should run for this call, else None."""
    dev = query.device.type
    if dev != "cpu" or not torch.is_grad_enabled():
        return None
    if not (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    if dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return None
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return None
    b, h, t, _ = query.shape
    s = key.shape[2]
    if t != s or h % key.shape[1]:
        return None
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1):
        return None
    cdt = matmul_dtype(query)
    if cdt not in HALF_DTYPES or b * h * t * s * 2 > MAX_SAVED_BYTES:
        return None
    return cdt


def training_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' attention-function signature: the written-out attention where it applies (see the module
    docstring), else transformers' own ``sdpa_attention_forward``. Returns ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cdt = _applies(query, key, value, attention_mask, dropout, kwargs)
    if cdt is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is None and not causal:  # no mask and not causal: every key is visible
        mask = torch.ones(1, 1, query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
    out = attention(query, key, value, mask, scaling, cdt)
    return out.transpose(1, 2), None


@contextlib.contextmanager
def cpu_training_attention() -> Iterator[None]:
    """Within the block, transformers' ``sdpa`` attention runs :func:`training_attention` (restored after)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    had = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    old = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = training_attention
    try:
        yield
    finally:
        if had:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = old
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
