"""The fused-weight formula (FuseGPT Sec. 3.3), as pure tensor functions.

W_eff = W + B A + sum_k C_k ⊙ D_k        b_eff = b + sum_k c_k ⊙ d_k

W [out, in] the receiving weight, B [out, r] A [r, in] its LoRA, D_k [out, in] the k-th donor weight (the
effective weight of a removed block's matching linear), C_k its fusion coefficient, broadcastable to [out, in]
(a scalar [1, 1], a per-row vector [out, 1], a full matrix [out, in] or a low-rank product C_B C_A).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["fused_weight", "fused_bias", "fused_linear", "coef_value", "rdsc_merge", "average_merge", "fold_gain",
           "master_dtype", "matmul_dtype", "HALF_DTYPES"]

HALF_DTYPES = (torch.bfloat16, torch.float16)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` computes in here: autocast's where it is on, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype trained tensors keep for weights of ``dtype``: fp32 for bf16/fp16, else the same."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def fused_weight(
    weight: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor] | None,
    terms: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """W + B @ A + sum(C ⊙ D). ``lora`` = (B [out, r], A [r, in]); ``terms`` = [(C, D), ...]."""
    out = weight
    if lora is not None:
        b, a = lora
        out = out + b @ a
    for coef, donor in terms:
        out = out + coef * donor
    return out


def fused_bias(
    bias: torch.Tensor | None, terms: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor | None:
    """b + sum(c ⊙ d); None when the layer has no bias."""
    if bias is None:
        return None
    out = bias
    for coef, donor in terms:
        out = out + coef * donor
    return out


def fold_gain(weight: torch.Tensor, donor_gain: torch.Tensor, receiver_gain: torch.Tensor,
              rel_eps: float = 1e-2) -> torch.Tensor:
    """A donor linear's weight as the receiver's input norm will feed it: ``W diag(g_d / g_r)``.

    The donor computed ``W (g_d * n(x))``; inside the receiver its term reads ``g_r * n(x)``, so scaling input
    channel j by g_d[j] / g_r[j] gives back the donor's own normalisation. Receiver gains smaller in magnitude than
    ``rel_eps`` x their mean magnitude are raised to that floor (keeping their sign), so a dead channel cannot blow
    the ratio up."""
    floor = rel_eps * receiver_gain.abs().mean().clamp_min(1e-12)
    sign = torch.where(receiver_gain < 0, -1.0, 1.0).to(receiver_gain.dtype)
    safe = torch.where(receiver_gain.abs() < floor, sign * floor, receiver_gain)
    return weight * (donor_gain / safe).to(weight.dtype)[None, :]


def rdsc_merge(base: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """LaCo's Reserving-Differences-while-Seeking-Common merge: theta_l + sum_k (theta_{l+k} - theta_l).

    Returns a new tensor; the inputs are not modified (LaCo's public code updates the base in place inside the
    sum, which makes every later difference relative to the already-merged base).
    """
    out = base.detach().clone()
    for o in others:
        out += o.detach() - base.detach()
    return out


def average_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted average of same-shaped tensors (equal weights by default): static fusion of merged layers."""
    if weights is None:
        weights = [1.0 / len(tensors)] * len(tensors)
    if len(weights) != len(tensors) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError("average_merge needs one weight per tensor, summing to 1")
    out = torch.zeros_like(tensors[0])
    for w, t in zip(weights, tensors):
        out += w * t.detach()
    return out


# ---- the fused linear map with a memory-lean backward ------------------------------------------------------------
# Autograd through ``F.linear(x, fused_weight(...))`` keeps, per layer, the effective weight and the dense coefficient
# C = C_B C_A for backward, and forms several [out, in] temporaries (B A, C, C ⊙ D and their sums; as many gradients
# in backward). ``fused_linear`` computes the same map and the same gradients from x and the small factors: it keeps
# x (and, unless ``save_weight`` is False, W_eff), and backward forms one weight-sized gradient G = g^T x from which
# every factor's gradient follows (dW = G, dB = G A^T, dA = B^T G, per donor dC = G ⊙ D, reduced to the coefficient's
# shape, dC_B = dC C_A^T, dC_A = C_B^T dC; db = sum g, dc = db ⊙ d).

def coef_value(kind: str, coef: Sequence[torch.Tensor]) -> torch.Tensor:
    """A coefficient's value broadcastable to [out, in]: ``lowrank`` = C_B @ C_A, otherwise the tensor itself."""
    return coef[0] @ coef[1] if kind == "lowrank" else coef[0]


def _unpack(layout: tuple, ts: Sequence[torch.Tensor | None]):
    has_bias, has_lora, donors = layout
    it = iter(ts)
    w = next(it)
    b = next(it) if has_bias else None
    lora = (next(it), next(it)) if has_lora else None
    out = []
    for kind, dbias in donors:
        coef = (next(it), next(it)) if kind == "lowrank" else (next(it),)
        cb = next(it) if dbias else None
        d = next(it)
        db = next(it) if dbias else None
        out.append((kind, coef, cb, d, db))
    return w, b, lora, out


def _effective(w, b, lora, donors, cdt):
    """(W_eff, b_eff) in the compute dtype ``cdt``. Where ``cdt`` is half precision (autocast on fp32 masters, or
    half weights), the weight is formed in it: the rank-r products and the sum run in bf16/fp16 (accumulated in
    fp32 inside each kernel, rounded once per term), as the matmul that consumes W_eff would round it anyway;
    forming it in fp32 first cost as much time as the tokens' matmuls on a CPU with native bf16. Else (fp32,
    fp64) the formula in the parameters' dtype, then cast."""
    bias = fused_bias(b, [(cb, db) for _, _, cb, _, db in donors if db is not None])
    bias = None if bias is None else bias.to(cdt)
    if cdt not in HALF_DTYPES:
        weight = fused_weight(w, lora, [(coef_value(k, c), d) for k, c, _, d, _ in donors])
        return weight.to(cdt), bias
    # a new tensor either way (w itself is never written to, e.g. bf16 weights), then the donors' terms in place
    if lora is not None:
        weight = torch.addmm(w.to(cdt), lora[0].to(cdt), lora[1].to(cdt))
    else:
        weight = w.to(cdt, copy=True)
    for kind, coef, _, d, _ in donors:
        weight.addcmul_(coef_value(kind, [t.to(cdt) for t in coef]), d.to(cdt))
    return weight, bias


def _reduce_to(grad: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "scalar":
        return grad.sum().reshape(1, 1)
    if kind == "vector":
        return grad.sum(1, keepdim=True)
    return grad


class _FusedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, save_weight, *ts):
        w, b, lora, donors = _unpack(layout, ts)
        dev = x.device.type
        # the dtype F.linear would compute in (autocast's when it is on, else the input's), applied explicitly so
        # backward, which runs outside autocast, uses the same one
        cdt = matmul_dtype(x)
        with torch.no_grad():
            weight, bias = _effective(w, b, lora, donors, cdt)  # W_eff in cdt: what backward's g @ W_eff uses
        xc = x.to(cdt)
        with torch.autocast(device_type=dev, enabled=False):
            y = torch.nn.functional.linear(xc, weight, bias)
        ctx.layout, ctx.cdt, ctx.x_dtype = layout, cdt, x.dtype
        ctx.save_for_backward(xc, weight if save_weight else None, *ts)
        return y

    @staticmethod
    def backward(ctx, g):
        xc, weight, *ts = ctx.saved_tensors
        layout, cdt = ctx.layout, ctx.cdt
        w, b, lora, donors = _unpack(layout, ts)
        need = ctx.needs_input_grad[3:]
        gx = None
        if ctx.needs_input_grad[0]:
            if weight is None:
                with torch.no_grad():
                    weight, _ = _effective(w, b, lora, donors, cdt)
            gx = (g @ weight).to(ctx.x_dtype)
        weight = None
        g2 = g.reshape(-1, g.shape[-1])
        grads: list[torch.Tensor | None] = [None] * len(ts)
        if lora is not None and not donors and not need[0] and (b is None or not need[1]):
            # LoRA alone on a frozen linear (the final stage, heal-lora): the factors' gradients through the rank-r
            # products, dB = g^T (x A^T) and dA = (g B)^T x, instead of the [out, in] gradient G = g^T x
            lb, la = lora
            x2 = xc.reshape(-1, xc.shape[-1])
            ilb = 2 if b is not None else 1
            if need[ilb]:
                grads[ilb] = (g2.t() @ (x2 @ la.t().to(cdt))).to(lb.dtype)
            if need[ilb + 1]:
                grads[ilb + 1] = ((g2 @ lb.to(cdt)).t() @ x2).to(la.dtype)
            return (gx, None, None, *grads)
        i = 0

        def take(n):  # positions of the next n tensors in ``ts``
            nonlocal i
            i += n
            return range(i - n, i)

        gw = gb = None
        # the weight-sized gradient G = g^T x stays in cdt (the dtype of the matmul that forms it); where cdt is
        # half precision, the rank-r products that follow run in it too, and only the factors' gradients are cast
        # to their (fp32 master) dtype. Sums over weight-sized tensors (bias, scalar / vector coefficients)
        # accumulate in fp32.
        mdt = master_dtype(w.dtype)
        pdt = cdt if cdt in HALF_DTYPES else mdt  # the dtype of the weight-side products
        if any(need):
            gw = (g2.t() @ xc.reshape(-1, xc.shape[-1])).to(pdt)
            if b is not None:
                gb = g2.sum(0, dtype=torch.float32 if cdt in HALF_DTYPES else None).to(mdt)
        (iw,) = take(1)
        if need[iw]:
            grads[iw] = gw.to(w.dtype)
        if b is not None:
            (ib,) = take(1)
            if need[ib]:
                grads[ib] = gb.to(b.dtype)
        if lora is not None:
            ilb, ila = take(2)
            lb, la = lora
            if need[ilb]:
                grads[ilb] = (gw @ la.t().to(pdt)).to(lb.dtype)
            if need[ila]:
                grads[ila] = (lb.t().to(pdt) @ gw).to(la.dtype)
        for kind, coef, cb, d, db in donors:
            ic = take(len(coef))
            icb = take(1)[0] if cb is not None else None
            take(1)  # donor weight: a buffer
            if db is not None:
                take(1)
            if any(need[j] for j in ic):
                if kind == "lowrank":
                    gc = gw * d.to(pdt)
                    cB, cA = coef
                    if need[ic[0]]:
                        grads[ic[0]] = (gc @ cA.t().to(pdt)).to(cB.dtype)
                    if need[ic[1]]:
                        grads[ic[1]] = (cB.t().to(pdt) @ gc).to(cA.dtype)
                else:
                    gc = gw.to(mdt) * d.to(mdt)
                    grads[ic[0]] = _reduce_to(gc, kind).to(coef[0].dtype)
                del gc
            if icb is not None and need[icb]:
                grads[icb] = (gb * db).to(cb.dtype)
        return (gx, None, None, *grads)


def fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora: tuple[torch.Tensor, torch.Tensor] | None,
    donors: Sequence[tuple[str, Sequence[torch.Tensor], torch.Tensor | None, torch.Tensor, torch.Tensor | None]],
    *, save_weight: bool = True,
) -> torch.Tensor:
    """x W_eff^T + b_eff with the gradients of every factor, without autograd's [out, in] temporaries.

    ``donors``: (kind, coefficient tensors — (C,) or (C_B, C_A) —, coefficient bias or None, donor weight, donor
    bias or None). ``save_weight=False`` recomputes W_eff in backward instead of keeping it (less memory, one more
    weight formation per step). Follows autocast like ``F.linear``."""
    ts: list[torch.Tensor] = [weight]
    if bias is not None:
        ts.append(bias)
    if lora is not None:
        ts.extend(lora)
    spec = []
    for kind, coef, cb, d, db in donors:
        use_bias = cb is not None and db is not None
        ts.extend(coef)
        if use_bias:
            ts.append(cb)
        ts.append(d)
        if use_bias:
            ts.append(db)
        spec.append((kind, use_bias))
    layout = (bias is not None, lora is not None, tuple(spec))
    return _FusedLinearFn.apply(x, layout, save_weight, *ts)
