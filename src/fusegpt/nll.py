"""The one next-token loss (ground layer): cross-entropy of [B, T, V] logits against the ids shifted by one,
in fp32. Scoring, perplexity, healing and the gradient scorers all use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["next_token_loss", "next_token_nll"]


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Differentiable next-token cross-entropy (fp32) of [B, T, V] ``logits`` against [B, T] ``ids``: position t
    predicts token t + 1. ``reduction``: mean or sum over the B x (T - 1) predictions."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL (fp32) of [B, T, V] logits against [B, T] ids, and the number of predictions."""
    return float(next_token_loss(logits, ids, "sum")), ids[:, 1:].numel()
