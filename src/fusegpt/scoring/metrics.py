"""Block-importance metrics as pure tensor functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..nll import next_token_nll

__all__ = ["macro_influence", "block_influence", "angular_distance", "next_token_nll", "taylor_importance", "magnitude"]


def macro_influence(h_full: torch.Tensor, h_skip: torch.Tensor) -> float:
    """MI = 1 - mean over tokens of cos(h_L, h_L^(-i)) (FuseGPT Sec. 3.2).

    ``h_full``, ``h_skip``: [N, T, H] final decoder outputs (before the final norm) with and without block i.
    """
    cos = F.cosine_similarity(h_full.float(), h_skip.float(), dim=-1)
    return float(1.0 - cos.mean())


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """ShortGPT's BI = 1 - mean cos(input_i, output_i) over tokens; [N, T, H] each."""
    return float(1.0 - F.cosine_similarity(h_in.float(), h_out.float(), dim=-1).mean())


def angular_distance(h_a: torch.Tensor, h_b: torch.Tensor) -> float:
    """Gromov et al.: arccos(cos(h_a, h_b)) / pi on the last token, averaged over sequences; [N, T, H] each."""
    cos = F.cosine_similarity(h_a[:, -1].float(), h_b[:, -1].float(), dim=-1).clamp(-1, 1)
    return float(torch.arccos(cos).mean() / math.pi)


def taylor_importance(pairs) -> float:
    """Shortened-LLaMA first-order Taylor importance of a block: sum over its weights of |dL/dW * W|.

    ``pairs``: iterable of (weight, accumulated gradient) tensors of one block.
    """
    return float(sum((w.float() * g.float()).abs().sum() for w, g in pairs))


def magnitude(weights) -> float:
    """Sum of |W| over a block's weights (the magnitude baseline of Shortened LLaMA)."""
    return float(sum(w.float().abs().sum() for w in weights))
