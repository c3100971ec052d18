"""Gemma3 (text): alternating sliding/full attention with a different RoPE per layer type."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, UnsupportedModelError
from .registry import register_adapter


@register_adapter
class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    linear_names = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    # Gemma3 normalises the MLP input with pre_feedforward_layernorm (post_attention_layernorm acts on the
    # attention output); its RMSNorm scales by (1 + weight)
    linear_norms = {
        "self_attn.q_proj": "input_layernorm",
        "self_attn.k_proj": "input_layernorm",
        "self_attn.v_proj": "input_layernorm",
        "mlp.gate_proj": "pre_feedforward_layernorm",
        "mlp.up_proj": "pre_feedforward_layernorm",
    }
    norm_offset = 1.0

    def check(self, model) -> None:
        super().check(model)
        if getattr(model.config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("Gemma3 with use_bidirectional_attention=True is not supported")

    def _position_embeddings(self, dummy: torch.Tensor, position_ids: torch.Tensor, kind: str) -> Any:
        return self.inner.rotary_emb(dummy, position_ids, kind)
