"""Block-wise, memory-bounded execution through one activation cache.

The inputs of block 0 are computed once by the adapter (embedding; no exception tricks). Any slice of blocks then
runs on cached hidden states, a mini-batch at a time: the hidden states live on an offload device (CPU) and only the
current mini-batch and the blocks being run sit on the compute device. Scoring, fusion and distillation all go
through :func:`run_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .adapters import Adapter, BlockContext
from .device import autocast

__all__ = ["Runner", "ActivationCache"]


@dataclass
class Runner:
    """Runs decoder blocks on cached hidden states.

    ``device``: where blocks compute; ``offload``: where cached hidden states live; ``batch_size``: sequences per
    forward; ``compute_dtype``: autocast dtype (None = the blocks' own dtype).
    """

    adapter: Adapter
    ctx: BlockContext
    device: torch.device
    offload: torch.device
    batch_size: int = 8
    compute_dtype: torch.dtype | None = None
    macs: float = 0.0  # forward multiply-accumulates run so far (block linears + attention)

    def _count(self, block: nn.Module, hidden: torch.Tensor) -> None:
        self.macs += hidden.shape[0] * hidden.shape[1] * self.adapter.block_macs_per_token(block, hidden.shape[1])

    @classmethod
    def for_model(
        cls,
        adapter: Adapter,
        seqlen: int,
        *,
        device: torch.device,
        offload: torch.device | None = None,
        batch_size: int = 8,
        compute_dtype: torch.dtype | None = None,
    ) -> "Runner":
        ctx = adapter.context(seqlen, device=device)
        return cls(adapter, ctx, device, offload or torch.device("cpu"), batch_size, compute_dtype)

    def refresh_context(self) -> None:
        """Recompute masks and position embeddings (after blocks were removed, kinds may change)."""
        self.ctx = self.adapter.context(self.ctx.seqlen, device=self.device)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[N, T] token ids -> [N, T, H] inputs of block 0, on the offload device."""
        outs = []
        for s in range(0, input_ids.shape[0], self.batch_size):
            ids = input_ids[s : s + self.batch_size].to(self.device)
            outs.append(self.adapter.embed(ids).to(self.offload))
        return torch.cat(outs)

    def forward_blocks(
        self, blocks: Sequence[nn.Module], kinds: Sequence[str], hidden: torch.Tensor
    ) -> torch.Tensor:
        """Differentiable: one mini-batch [B, T, H] (on the compute device) through ``blocks`` in order."""
        with autocast(self.device, self.compute_dtype):
            for block, kind in zip(blocks, kinds, strict=True):
                self._count(block, hidden)
                hidden = self.adapter.call_block(block, hidden, self.ctx, kind)
        return hidden

    @torch.no_grad()
    def run(
        self,
        blocks: Sequence[nn.Module],
        kinds: Sequence[str],
        hidden: torch.Tensor,
        *,
        keep_each: bool = False,
        on_block: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run ``blocks`` on [N, T, H] cached hidden states, block by block over all samples.

        Returns the final [N, T, H] output (offload device, input dtype), or with ``keep_each`` the list of every
        block's output. ``on_block(i, out)`` is called after block i.
        """
        if len(blocks) != len(kinds):
            raise ValueError("blocks and kinds differ in length")
        outs: list[torch.Tensor] = []
        current = hidden
        for i, (block, kind) in enumerate(zip(blocks, kinds)):
            nxt = torch.empty_like(current, device=self.offload)
            for s in range(0, current.shape[0], self.batch_size):
                h = current[s : s + self.batch_size].to(self.device)
                self._count(block, h)
                with autocast(self.device, self.compute_dtype):
                    out = self.adapter.call_block(block, h, self.ctx, kind)
                nxt[s : s + self.batch_size] = out.to(device=self.offload, dtype=nxt.dtype)
            current = nxt
            if keep_each:
                outs.append(current)
            if on_block is not None:
                on_block(i, current)
        return outs if keep_each else current

    def run_model_blocks(
        self, hidden: torch.Tensor, start: int = 0, stop: int | None = None, *, keep_each: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run the model's own blocks ``start:stop`` (current indices)."""
        blocks = list(self.adapter.blocks)[start:stop]
        kinds = self.adapter.block_kinds()[start:stop]
        if not blocks:
            return [] if keep_each else hidden
        return self.run(blocks, kinds, hidden, keep_each=keep_each)


class ActivationCache:
    """Inputs of every block of the current model for a fixed set of sequences, filled lazily.

    ``get(i)`` is the [N, T, H] input of current block i (``get(num_blocks)`` = the output of the last block);
    entries are computed from the last valid one and kept on the runner's offload device. After blocks ``>= j``
    change (fusion) or are removed, :meth:`truncate` (j + 1) keeps the still-valid prefix, so later calls reuse it.
    """

    def __init__(self, runner: Runner, input_ids: torch.Tensor) -> None:
        self.runner = runner
        self.entries: list[torch.Tensor] = [runner.embed(input_ids)]

    @property
    def valid(self) -> int:
        """How many leading entries are valid (inputs of blocks 0 .. valid-1)."""
        return len(self.entries)

    def get(self, i: int) -> torch.Tensor:
        n = self.runner.adapter.num_blocks
        if not 0 <= i <= n:
            raise IndexError(f"block input {i} out of range 0..{n}")
        if i >= len(self.entries):
            start = len(self.entries) - 1
            outs = self.runner.run_model_blocks(self.entries[-1], start, i, keep_each=True)
            self.entries.extend(outs)
        return self.entries[i]

    def truncate(self, keep: int) -> None:
        """Keep the first ``keep`` entries (at least the embeddings)."""
        del self.entries[max(1, keep):]
