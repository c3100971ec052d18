"""The adapter contract: everything fusegpt needs to know about one architecture family.

Core code never touches ``model.model.layers``, ``self_attn`` or ``layer_idx``; it asks an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import nn

__all__ = ["BlockContext", "Adapter", "UnsupportedModelError"]



def _no_cache(fn) -> dict[str, None]:
    """The mask makers' "no KV cache" argument: ``cache`` since transformers 5.2x, ``past_key_values`` before
    (5.17, which llm-compressor pins)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(fn).parameters else "past_key_values": None}

class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass
class BlockContext:
    """What a decoder block needs besides its hidden states, for one sequence length.

    ``per_kind[kind]`` holds keyword arguments (attention mask, position embeddings) for every block of that
    attention kind (e.g. ``"full_attention"`` / ``"sliding_attention"``). Tensors have batch dimension 1 and
    broadcast over any batch.
    """

    seqlen: int
    position_ids: torch.Tensor
    per_kind: dict[str, dict[str, Any]] = field(default_factory=dict)

    def kwargs(self, kind: str) -> dict[str, Any]:
        if kind not in self.per_kind:
            raise KeyError(f"no block context for attention kind {kind!r}; have {sorted(self.per_kind)}")
        return {"position_ids": self.position_ids, **self.per_kind[kind]}

    def to(self, device: torch.device) -> "BlockContext":
        def move(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, tuple):
                return tuple(move(x) for x in v)
            return v

        return BlockContext(
            seqlen=self.seqlen,
            position_ids=self.position_ids.to(device),
            per_kind={k: {n: move(v) for n, v in kw.items()} for k, kw in self.per_kind.items()},
        )


class Adapter:
    """Base adapter for decoder-only Hugging Face models laid out as ``Model.model.{embed_tokens,layers,norm}``.

    Subclasses set ``model_types`` (the ``config.model_type`` values they serve) and ``linear_names`` (the
    fusable linears of one block, as dotted paths inside the block).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    linear_names: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = "base"
    # where block i's tensors live in the checkpoint: f"{blocks_prefix}.{i}.<name>"
    blocks_prefix: ClassVar[str] = "model.layers"
    # the RMSNorm whose output a linear reads (linear name -> norm path in the block); linears fed by something
    # else (o_proj, down_proj) are absent. The norm's gain is ``norm_offset + weight`` (Gemma: 1 + w).
    linear_norms: ClassVar[dict[str, str]] = {}
    norm_offset: ClassVar[float] = 0.0

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.check(model)

    # ---- layout -------------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.inner.layers

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def check(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError when the model does not have the expected layout."""
        inner = getattr(model, "model", None)
        if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the decoder layout the {self.family} adapter expects "
                "(model.model.layers)"
            )

    # ---- inputs -------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, H] hidden states entering block 0."""
        return self.inner.embed_tokens(input_ids)

    def block_kinds(self) -> list[str]:
        """Attention kind of every current block ("full_attention", "sliding_attention", ...)."""
        types = getattr(self.config, "layer_types", None)
        if types is not None:
            return list(types)[: self.num_blocks]
        kind = "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        return [kind] * self.num_blocks

    def _masks(self, dummy: torch.Tensor, position_ids: torch.Tensor, kinds: Iterable[str]) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        out = {}
        for kind in kinds:
            if kind not in makers:
                raise UnsupportedModelError(f"attention kind {kind!r} is not supported by the {self.family} adapter")
            out[kind] = makers[kind](config=self.config, inputs_embeds=dummy, attention_mask=None,
                                     position_ids=position_ids, **_no_cache(makers[kind]))
        return out

    def _position_embeddings(self, dummy: torch.Tensor, position_ids: torch.Tensor, kind: str) -> Any:
        return self.inner.rotary_emb(dummy, position_ids)

    def context(
        self, seqlen: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> BlockContext:
        """Masks and position embeddings for unpadded sequences of ``seqlen`` tokens (batch dim 1)."""
        ref = self.inner.embed_tokens.weight
        device = device or ref.device
        dtype = dtype or ref.dtype
        dummy = torch.zeros(1, seqlen, self.config.hidden_size, device=device, dtype=dtype)
        position_ids = torch.arange(seqlen, device=device).unsqueeze(0)
        kinds = sorted(set(self.block_kinds()))
        masks = self._masks(dummy, position_ids, kinds)
        per_kind = {
            k: {"attention_mask": masks[k], "position_embeddings": self._position_embeddings(dummy, position_ids, k)}
            for k in kinds
        }
        return BlockContext(seqlen=seqlen, position_ids=position_ids, per_kind=per_kind)

    # ---- running ------------------------------------------------------------------------------------------
    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, ctx: BlockContext, kind: str) -> torch.Tensor:
        """One decoder block on [B, T, H] hidden states (no KV cache)."""
        out = block(hidden, use_cache=False, **ctx.kwargs(kind))
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.norm(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [B, T, H] block-stack output -> [B, T, V] logits."""
        return self.model.lm_head(self.final_norm(hidden))

    # ---- linears ------------------------------------------------------------------------------------------
    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The fusable linears of a block, by dotted name (``linear_names`` order)."""
        out = {}
        for name in self.linear_names:
            out[name] = block.get_submodule(name)
        return out

    def input_gain(self, block: nn.Module, linear_name: str) -> torch.Tensor | None:
        """The per-channel gain of the norm that feeds ``linear_name`` in ``block`` ([in_features]), or None."""
        norm = self.linear_norms.get(linear_name)
        if norm is None:
            return None
        return self.norm_offset + block.get_submodule(norm).weight.detach().float()

    def block_macs_per_token(self, block: nn.Module, seqlen: int) -> float:
        """Multiply-accumulates per token of one block: its linears plus attention scores and mixing over
        ``seqlen`` keys (QK^T and AV, full T x T as computed without a KV cache)."""
        lin = 0
        for m in self.block_linears(block).values():
            lin += m.in_features * m.out_features
        heads = self.config.num_attention_heads
        head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // heads
        return float(lin + 2 * seqlen * heads * head_dim)

    def head_macs_per_token(self) -> float:
        """Multiply-accumulates per token of the LM head (hidden x vocabulary)."""
        w = self.model.lm_head.weight
        return float(w.shape[0] * w.shape[1])

    @staticmethod
    def set_submodule(block: nn.Module, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, module)

    # ---- structure ----------------------------------------------------------------------------------------
    def remove_blocks(self, drop: Sequence[int]) -> list[int]:
        """Remove blocks (indices into the current block list) in place and keep the model valid.

        Renumbers every ``layer_idx`` (KV-cache slots), sets ``num_hidden_layers`` and re-indexes ``layer_types``
        with the kept indices. Returns the kept indices.
        """
        n = self.num_blocks
        drop_set = set(int(i) for i in drop)
        bad = [i for i in drop_set if not 0 <= i < n]
        if bad:
            raise IndexError(f"block indices {sorted(bad)} out of range for a model with {n} blocks (0..{n - 1})")
        if len(drop_set) >= n:
            raise ValueError(f"cannot remove all {n} blocks")
        keep = [i for i in range(n) if i not in drop_set]
        old_blocks = list(self.blocks)
        self.inner.layers = nn.ModuleList([old_blocks[i] for i in keep])
        for new_idx, block in enumerate(self.inner.layers):
            self.renumber_block(block, new_idx)
        types = getattr(self.config, "layer_types", None)
        if types is not None:
            self.config.layer_types = [types[i] for i in keep]
        self.config.num_hidden_layers = len(keep)
        return keep

    @staticmethod
    def renumber_block(block: nn.Module, new_idx: int) -> None:
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
