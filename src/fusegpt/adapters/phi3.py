"""Phi3: fused qkv_proj and gate_up_proj linears."""

from __future__ import annotations

from .base import Adapter
from .registry import register_adapter


@register_adapter
class Phi3Adapter(Adapter):
    family = "phi3"
    model_types = ("phi3",)
    linear_names = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    linear_norms = {"self_attn.qkv_proj": "input_layernorm", "mlp.gate_up_proj": "post_attention_layernorm"}

    def block_kinds(self) -> list[str]:
        kind = "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        return [kind] * self.num_blocks
