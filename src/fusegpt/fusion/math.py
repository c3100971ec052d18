"""The fused-weight formula (FuseGPT Sec. 3.3), as pure tensor functions.

W_eff = W + B A + sum_k C_k ⊙ D_k        b_eff = b + sum_k c_k ⊙ d_k

W [out, in] the receiving weight, B [out, r] A [r, in] its LoRA, D_k [out, in] the k-th donor weight (the
effective weight of a removed block's matching linear), C_k its fusion coefficient, broadcastable to [out, in]
(a scalar [1, 1], a per-row vector [out, 1], a full matrix [out, in] or a low-rank product C_B C_A).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["fused_weight", "fused_bias", "rdsc_merge", "average_merge"]


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
