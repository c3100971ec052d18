"""Analytic multiply-accumulates per token (linears + attention), per block and for the whole model."""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters import get_adapter

__all__ = ["MacsReport", "model_macs"]


@dataclass
class MacsReport:
    context: int  # attention context the attention MACs assume
    per_block: list[float]  # MACs per token of each decoder block
    blocks: float
    lm_head: float
    total: float


def model_macs(model, context: int) -> MacsReport:
    """MACs per token at an attention context of ``context`` keys (embedding lookup counts 0)."""
    ad = get_adapter(model)
    per_block = [ad.block_macs_per_token(b, context) for b in ad.blocks]
    head = model.get_output_embeddings()
    lm = float(head.in_features * head.out_features) if head is not None else 0.0
    return MacsReport(context=context, per_block=per_block, blocks=sum(per_block), lm_head=lm,
                      total=sum(per_block) + lm)
