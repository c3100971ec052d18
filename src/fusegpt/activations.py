"""Block-wise, memory-bounded execution through one activation cache.

The inputs of block 0 are computed once by the adapter (embedding; no exception tricks). Any slice of blocks then
runs on cached hidden states, a mini-batch at a time: the hidden states live on an offload device (CPU) and only the
current mini-batch and the blocks being run sit on the compute device. Scoring, fusion and distillation all go
through :func:`run_blocks`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from .adapters import Adapter, BlockContext
from .device import autocast, trim_heap
from .offload import is_materialized

__all__ = ["Runner", "ActivationCache", "cache_dtype", "entry_store"]


def cache_dtype(setting: str, compute: torch.dtype | None) -> torch.dtype:
    """Storage dtype of cached activations: ``auto`` = the compute dtype (fp32 when computing in fp32)."""
    return compute if setting == "auto" and compute is not None else torch.float32


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
    grad_checkpoint: bool = False  # recompute each block's forward in backward (see forward_blocks)
    macs: float = 0.0  # forward multiply-accumulates run so far (block linears + attention + weight_macs)
    # of which forming fused weights (FusedLinear.weight_macs: B A and C_B C_A, out x in x rank, once per call)
    weight_macs: float = 0.0
    store: Any = None  # an offload.BlockStore when blocks live off the compute device (loaded while used)

    def resident(self, blocks: Sequence[nn.Module], *, save: Sequence[nn.Module] = ()):
        """Context in which ``blocks`` are on the compute device (a no-op for a model held there whole);
        ``save`` = blocks changed inside it, persisted on the way out."""
        if self.store is None:
            return contextlib.nullcontext()
        return self.store.resident(blocks, save=save)

    def _count(self, block: nn.Module, hidden: torch.Tensor) -> None:
        self.macs += hidden.shape[0] * hidden.shape[1] * self.adapter.block_macs_per_token(block, hidden.shape[1])
        # a fused block's forward also forms its effective weights (the same products again in backward, twice:
        # the gradients of both factors, so forward + backward is 3x this, like the tokens' products)
        w = sum(m.weight_macs() for m in block.modules() if hasattr(m, "weight_macs"))
        self.macs += w
        self.weight_macs += w

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
    def embed(self, input_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[N, T] token ids -> [N, T, H] inputs of block 0, on the offload device (in ``dtype``, default the
        embeddings' own)."""
        out = None  # written in place, mini-batch by mini-batch: a list + torch.cat would hold the result twice
        for s in range(0, input_ids.shape[0], self.batch_size):
            ids = input_ids[s : s + self.batch_size].to(self.device)
            h = self.adapter.embed(ids)
            if out is None:
                out = torch.empty((input_ids.shape[0], *h.shape[1:]), dtype=dtype or h.dtype, device=self.offload)
            out[s : s + h.shape[0]] = h.to(device=self.offload, dtype=out.dtype)
            del h
        return out

    def forward_blocks(
        self, blocks: Sequence[nn.Module], kinds: Sequence[str], hidden: torch.Tensor
    ) -> torch.Tensor:
        """Differentiable: one mini-batch [B, T, H] (on the compute device) through ``blocks`` in order.

        With ``grad_checkpoint`` and gradients on, each block keeps only its input for the backward pass and runs
        its forward again there (activation memory of one block instead of all; the same arithmetic)."""
        ckpt = self.grad_checkpoint and torch.is_grad_enabled()
        with self.resident(blocks), autocast(self.device, self.compute_dtype):
            for block, kind in zip(blocks, kinds, strict=True):
                self._count(block, hidden)
                if ckpt:
                    hidden = torch.utils.checkpoint.checkpoint(
                        self.adapter.call_block, block, hidden, self.ctx, kind, use_reentrant=False)
                else:
                    hidden = self.adapter.call_block(block, hidden, self.ctx, kind)
        return hidden

    @torch.no_grad()
    def run(
        self,
        blocks: Sequence[nn.Module],
        kinds: Sequence[str],
        hidden: torch.Tensor,
    ) -> torch.Tensor:
        """Run ``blocks`` on [N, T, H] hidden states, one mini-batch at a time through all of them.

        Returns the final [N, T, H] output (offload device, input dtype); memory: the output plus one mini-batch.
        """
        if len(blocks) != len(kinds):
            raise ValueError("blocks and kinds differ in length")
        if self.store is not None and len(blocks) > 1 and not all(is_materialized(b) for b in blocks):
            # offloaded blocks: one block at a time over all sequences, so only that block is loaded
            for block, kind in zip(blocks, kinds):
                hidden = self.run([block], [kind], hidden)
            return hidden
        out = torch.empty_like(hidden, device=self.offload)
        with self.resident(blocks):
            self._run_batches(blocks, kinds, hidden, out)
        return out

    def _run_batches(self, blocks, kinds, hidden: torch.Tensor, out: torch.Tensor) -> None:
        for s in range(0, hidden.shape[0], self.batch_size):
            h = hidden[s : s + self.batch_size].to(self.device)
            for block, kind in zip(blocks, kinds):
                self._count(block, h)
                with autocast(self.device, self.compute_dtype):
                    h = self.adapter.call_block(block, h, self.ctx, kind)
            out[s : s + self.batch_size] = h.to(device=self.offload, dtype=out.dtype)
            del h
            trim_heap()

    def run_model_blocks(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run the model's own blocks ``start:stop`` (current indices)."""
        blocks = list(self.adapter.blocks)[start:stop]
        kinds = self.adapter.block_kinds()[start:stop]
        return self.run(blocks, kinds, hidden) if blocks else hidden


class _DiskEntries:
    """Entries as raw files in a work folder: written once, read back on demand (nothing stays mapped, so the
    process's resident memory holds only the entries in use)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta: dict[int, tuple[torch.Size, torch.dtype]] = {}
        self._uid = f"{os.getpid()}-{id(self):x}"

    def _path(self, i: int) -> Path:
        return self.folder / f"act-{self._uid}-{i}.bin"

    def put(self, i: int, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
        raw.numpy().tofile(self._path(i))
        self.meta[i] = (t.shape, t.dtype)

    def get(self, i: int) -> torch.Tensor:
        shape, dtype = self.meta[i]
        return torch.from_file(str(self._path(i)), shared=False, size=shape.numel(), dtype=dtype).view(shape)

    def drop(self, i: int) -> None:
        self.meta.pop(i, None)
        self._path(i).unlink(missing_ok=True)

    def keys(self) -> list[int]:
        return sorted(self.meta)

    def close(self) -> None:
        for i in list(self.meta):
            self.drop(i)


class _MemoryEntries:
    def __init__(self) -> None:
        self.data: dict[int, torch.Tensor] = {}

    def put(self, i: int, t: torch.Tensor) -> None:
        self.data[i] = t

    def get(self, i: int) -> torch.Tensor:
        return self.data[i]

    def drop(self, i: int) -> None:
        self.data.pop(i, None)

    def keys(self) -> list[int]:
        return sorted(self.data)

    def close(self) -> None:
        self.data.clear()


def entry_store(disk: str | os.PathLike | None = None):
    """A keyed store of [N, T, H] tensors (``put`` / ``get`` / ``keys`` / ``drop`` / ``close``): in memory, or as
    files in the folder ``disk`` (read back on demand)."""
    return _DiskEntries(Path(disk)) if disk is not None else _MemoryEntries()


class ActivationCache:
    """Inputs of the blocks of the current model for a fixed set of sequences, filled lazily, memory-bounded.

    ``get(i)`` is the [N, T, H] input of current block i (``get(num_blocks)`` = the output of the last block),
    computed forward from the nearest kept entry before it. At most ``max_resident`` entries are kept (None = all):
    checkpoints every k = ceil(L / (max_resident - 1)) blocks and the most recently computed entry (the embeddings
    are recomputed from the token ids when needed), so a sequential sweep (scoring) costs one block per entry and
    any other entry at most k - 1 blocks;
    recomputing runs the same blocks on the same mini-batches, so values never depend on what was kept. The
    memory of the cache is ``max_resident x N x T x H x bytes(dtype)``, whatever the model's depth.

    ``dtype``: storage dtype (None = the embeddings' dtype; the compute dtype, e.g. bf16, halves it);
    ``disk``: a work folder where entries live as files instead of memory (read back when used). After blocks
    ``>= j`` change (fusion) or are removed, :meth:`truncate` (j + 1) keeps the still-valid entries.
    """

    def __init__(self, runner: Runner, input_ids: torch.Tensor, *, max_resident: int | None = None,
                 dtype: torch.dtype | None = None, disk: str | os.PathLike | None = None) -> None:
        if max_resident is not None and max_resident < 3:
            raise ValueError(f"an activation cache keeps at least 3 entries (embeddings, a checkpoint, the most "
                             f"recent), got {max_resident}")
        self.runner = runner
        self.max_resident = max_resident
        self.input_ids = input_ids
        self.store = entry_store(disk)
        if max_resident is None:
            first = runner.embed(input_ids, dtype)
            self.dtype = first.dtype
            self.store.put(0, first)
        else:  # bounded caches recompute the embeddings when needed (cheap): one window gives shape and dtype
            first = runner.embed(input_ids[:1])
            self.dtype = dtype or first.dtype
        self.shape = (*input_ids.shape, first.shape[-1])
        self.recent: int | None = None  # index of the most recent non-checkpoint entry
        self.computed_blocks = 0  # block forwards (over all sequences) run to fill entries

    @property
    def valid(self) -> int:
        """1 + the highest index held (entries 0 .. valid - 1 are valid or recomputable without loss)."""
        return max(self.store.keys(), default=0) + 1

    @property
    def resident(self) -> int:
        return len(self.store.keys())

    def entry_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def _every(self) -> int | None:
        if self.max_resident is None:
            return None
        n = self.runner.adapter.num_blocks
        return max(1, math.ceil(n / (self.max_resident - 1)))

    def _keep(self, i: int) -> bool:
        """Is entry i a checkpoint (kept until truncated)? Unbounded: every entry; bounded: multiples of k > 0."""
        every = self._every()
        return every is None or (i > 0 and i % every == 0)

    def _load(self, i: int) -> torch.Tensor:
        if i in self.store.keys():
            return self.store.get(i)
        if i != 0:
            raise KeyError(i)
        return self.runner.embed(self.input_ids, self.dtype)

    def get(self, i: int) -> torch.Tensor:
        n = self.runner.adapter.num_blocks
        if not 0 <= i <= n:
            raise IndexError(f"block input {i} out of range 0..{n}")
        keys = self.store.keys()
        if i in keys:
            return self.store.get(i)
        start = max((k for k in keys if k < i), default=0)
        blocks = list(self.runner.adapter.blocks)
        kinds = self.runner.adapter.block_kinds()
        h = self._load(start)
        for j in range(start, i):
            h = self.runner.run([blocks[j]], [kinds[j]], h).to(self.dtype)
            self.computed_blocks += 1
            if j + 1 < i and self._keep(j + 1):
                self.store.put(j + 1, h)
        if not self._keep(i) and self.recent is not None and self.recent != i:
            self.store.drop(self.recent)
        if not self._keep(i):
            self.recent = i
        self.store.put(i, h)
        return h

    def truncate(self, keep: int) -> None:
        """Drop the entries from index ``keep`` on (at least the embeddings stay)."""
        for k in self.store.keys():
            if k >= max(1, keep):
                self.store.drop(k)
        if self.recent is not None and self.recent >= max(1, keep):
            self.recent = None
        # checkpoint spacing follows the (smaller) depth: entries that are no longer checkpoints go
        for k in self.store.keys():
            if k != self.recent and not self._keep(k):
                self.store.drop(k)

    def close(self) -> None:
        """Free every entry (and remove its files)."""
        self.store.close()
