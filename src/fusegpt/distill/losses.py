"""Group-distillation losses: student and teacher are [B, T, H] group outputs."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "get_loss", "register_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return deco


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


@register_loss("cosine")
def cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - mean token cosine similarity."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; use one of {sorted(LOSSES)}")
    return LOSSES[name]
