"""Llama-style families: Llama (SmolLM2, Llama 2/3), Mistral, Qwen2 (q/k/v biases), Qwen3 (q_norm/k_norm)."""

from __future__ import annotations

from .base import Adapter
from .registry import register_adapter

_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LLAMA_NORMS = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm",
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.up_proj": "post_attention_layernorm",
}


@register_adapter
class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama",)
    linear_names = _LLAMA_LINEARS
    linear_norms = _LLAMA_NORMS


@register_adapter
class MistralAdapter(Adapter):
    """Mistral applies one mask to every block: sliding-window when ``config.sliding_window`` is set."""

    family = "mistral"
    model_types = ("mistral",)
    linear_names = _LLAMA_LINEARS
    linear_norms = _LLAMA_NORMS

    def block_kinds(self) -> list[str]:
        kind = "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        return [kind] * self.num_blocks


@register_adapter
class Qwen2Adapter(Adapter):
    """Qwen2: biases on q/k/v; per-block full/sliding kinds from ``config.layer_types``."""

    family = "qwen2"
    model_types = ("qwen2",)
    linear_names = _LLAMA_LINEARS
    linear_norms = _LLAMA_NORMS


@register_adapter
class Qwen3Adapter(Adapter):
    """Qwen3: RMSNorm on queries and keys (q_norm/k_norm) inside attention; same linears as Llama."""

    family = "qwen3"
    model_types = ("qwen3",)
    linear_names = _LLAMA_LINEARS
    linear_norms = _LLAMA_NORMS
