"""Block scorers of the baselines, run through the activation cache (one score per current block, or per window).

Every scorer returns importances where *lower = remove first*, so one removal driver serves them all.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..activations import ActivationCache, Runner
from ..nll import next_token_loss
from .metrics import angular_distance, block_influence, magnitude, next_token_nll, taylor_importance

__all__ = [
    "block_influence_scores", "angular_window_distances", "lm_nll", "skip_nll_scores", "taylor_scores",
    "magnitude_scores", "output_similarity", "fisher_scores",
]


@torch.no_grad()
def block_influence_scores(cache: ActivationCache) -> list[float]:
    """ShortGPT: BI_i = 1 - mean token cos(input of block i, output of block i)."""
    n = cache.runner.adapter.num_blocks
    return [block_influence(cache.get(i), cache.get(i + 1)) for i in range(n)]


@torch.no_grad()
def angular_window_distances(cache: ActivationCache, n: int) -> list[float]:
    """Gromov et al.: d(l, n) = arccos(cos(x_l, x_{l+n})) / pi on the last token, for every start l.

    x_l is the input of block l (x_L the output of the last block); removing blocks l .. l+n-1 leaves the
    smallest change where d is lowest.
    """
    L = cache.runner.adapter.num_blocks
    if not 1 <= n < L:
        raise ValueError(f"window of {n} blocks does not fit a model of {L} blocks")
    return [angular_distance(cache.get(l), cache.get(l + n)) for l in range(L - n + 1)]


@torch.no_grad()
def lm_nll(runner: Runner, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL of [N, T] ``ids`` given the [N, T, H] output of the last block (final norm + head)."""
    total, count = 0.0, 0
    for s in range(0, hidden.shape[0], runner.batch_size):
        h = hidden[s : s + runner.batch_size].to(runner.device)
        logits = runner.adapter.head(h)
        t, c = next_token_nll(logits, ids[s : s + runner.batch_size].to(runner.device))
        total, count = total + t, count + c
    return total / max(count, 1)


@torch.no_grad()
def skip_nll_scores(cache: ActivationCache, ids: torch.Tensor, *, desc: str | None = None) -> list[float]:
    """Calibration NLL of the model with each block skipped (SLEB; Shortened-LLaMA's PPL criterion).

    Skipping block i runs blocks i+1 .. L-1 from the cached input of block i.
    """
    runner = cache.runner
    n = runner.adapter.num_blocks
    blocks, kinds = list(runner.adapter.blocks), runner.adapter.block_kinds()
    out = []
    for i in tqdm(range(n), desc=desc, disable=desc is None, leave=False):
        start = cache.get(i)
        h = runner.run(blocks[i + 1 :], kinds[i + 1 :], start) if i + 1 < n else start
        out.append(lm_nll(runner, h, ids))
    return out


def _block_gradients(runner: Runner, ids: torch.Tensor, batch: int, on_batch) -> list[list[torch.Tensor]]:
    """Gradients of the next-token NLL w.r.t. every block's linear weights, one mini-batch of ``batch`` sequences
    at a time: ``on_batch(acc, grads)`` folds each mini-batch's gradients (fp32, one list per block) into ``acc``
    (zeros like the weights), which is returned. The loss of a mini-batch is its summed token NLL over all
    ``ids[:, 1:]`` tokens (so with ``batch`` = all, the gradient of the mean NLL)."""
    ad = runner.adapter
    blocks, kinds = list(ad.blocks), ad.block_kinds()
    weights = [[lin.weight for lin in ad.block_linears(b).values()] for b in blocks]
    flat = [w for ws in weights for w in ws]
    was = [w.requires_grad for w in flat]
    acc = [torch.zeros_like(w, dtype=torch.float32) for w in flat]
    tokens = ids[:, 1:].numel()
    try:
        for w in flat:
            w.requires_grad_(True)
            w.grad = None
        for s in range(0, ids.shape[0], batch):
            x = ids[s : s + batch].to(runner.device)
            with torch.no_grad():
                h = ad.embed(x)
            logits = ad.head(runner.forward_blocks(blocks, kinds, h))
            loss = next_token_loss(logits, x, "sum") / tokens
            loss.backward()
            on_batch(acc, [torch.zeros_like(a) if w.grad is None else w.grad.float() for a, w in zip(acc, flat)])
            for w in flat:
                w.grad = None
    finally:
        for w, r in zip(flat, was):
            w.grad = None
            w.requires_grad_(r)
    out, k = [], 0
    for ws in weights:
        out.append(acc[k : k + len(ws)])
        k += len(ws)
    return out


def taylor_scores(runner: Runner, ids: torch.Tensor) -> list[float]:
    """Shortened LLaMA's Taylor criterion: per block, sum |dL/dW * W| over its linear weights, with dL/dW the
    gradient of the mean next-token NLL over the calibration sequences ``ids`` [N, T]."""

    def add(acc, grads):
        for a, g in zip(acc, grads):
            a += g

    grads = _block_gradients(runner, ids, runner.batch_size, add)
    ad = runner.adapter
    return [taylor_importance(zip([lin.weight.detach() for lin in ad.block_linears(b).values()], gs))
            for b, gs in zip(ad.blocks, grads)]


def fisher_scores(runner: Runner, ids: torch.Tensor) -> list[float]:
    """Empirical Fisher information of every block (the paper's metric ablation): per block, the sum over its linear
    weights of the mean over sequences of the squared gradient of that sequence's next-token NLL,
    sum_w (1/N) sum_n (dL_n/dw)^2 (one backward pass per sequence)."""
    n = ids.shape[0]

    def add_squares(acc, grads):  # the loss of one sequence was divided by all N sequences' tokens: undo it
        for a, g in zip(acc, grads):
            a += (g * n).pow(2) / n

    return [float(sum(g.sum() for g in gs)) for gs in _block_gradients(runner, ids, 1, add_squares)]


def magnitude_scores(adapter) -> list[float]:
    """Sum of |W| over each block's linear weights."""
    return [magnitude(lin.weight.detach() for lin in adapter.block_linears(b).values()) for b in adapter.blocks]


@torch.no_grad()
def output_similarity(cache: ActivationCache, p: int, candidates: Sequence[int]) -> dict[int, float]:
    """Mean token cosine between the output of block p and the output of each candidate block."""
    ref = cache.get(p + 1).float()
    return {j: float(F.cosine_similarity(ref, cache.get(j + 1).float(), dim=-1).mean()) for j in candidates}
