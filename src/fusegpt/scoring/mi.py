"""Macro Influence of every block through the activation cache (prefix reuse)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..activations import ActivationCache
from ..distributed import gather_scores, shard
from .metrics import macro_influence

__all__ = ["macro_influence_scores"]


@torch.no_grad()
def macro_influence_scores(cache: ActivationCache, *, desc: str | None = "scoring") -> list[float]:
    """MI of every current block on the cache's sequences.

    Skipping block i starts from the cached input of block i and runs blocks i+1 .. L-1; the reference output is
    the cached output of the last block. Cached inputs before the first block changed since the last call are
    reused (see :class:`ActivationCache`). Under torch.distributed each rank scores every N-th candidate and the
    scores are gathered (``fusegpt.distributed``).
    """
    runner = cache.runner
    n = runner.adapter.num_blocks
    blocks = list(runner.adapter.blocks)
    kinds = runner.adapter.block_kinds()
    h_full = cache.get(n)
    mine = {}
    for i in tqdm(shard(range(n)), desc=desc, disable=desc is None, leave=False):  # all of them in one process
        start = cache.get(i)
        h_skip = runner.run(blocks[i + 1 :], kinds[i + 1 :], start) if i + 1 < n else start
        mine[i] = macro_influence(h_full, h_skip)
    return gather_scores(n, mine)
