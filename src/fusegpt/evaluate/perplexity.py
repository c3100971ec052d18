"""Perplexity protocol.

Eval text = a named source (default ``wikitext2``: WikiText-2 raw test rows, CRLF -> LF, joined with "\\n\\n"),
tokenized once with the model's tokenizer, cut into non-overlapping windows of ``seqlen`` tokens; the first
``max_windows`` windows (None = all) are scored. PPL = exp(mean NLL over every next-token prediction in the
windows, i.e. seqlen - 1 per window), computed in fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..data import load_text, split_windows, tokenize_text
from ..device import reuse_large_allocations
from ..distributed import all_reduce_sum, rank, world_size
from ..nll import next_token_nll

__all__ = ["PerplexityResult", "perplexity_windows", "evaluate_perplexity"]


@dataclass
class PerplexityResult:
    source: str
    seqlen: int
    windows: int
    tokens_scored: int
    nll: float
    ppl: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_windows(tokenizer, source: str, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """[W, seqlen] evaluation windows of a source under the protocol above."""
    ids = tokenize_text(tokenizer, load_text(source))
    return split_windows(ids, seqlen, max_windows)


@torch.no_grad()
def nll_sum(model, windows: torch.Tensor, *, batch_size: int = 4, desc: str | None = "perplexity") -> tuple[float, int]:
    """Sum of next-token NLL over [W, T] windows (fp32) and the number of predictions."""
    device = next(model.parameters()).device
    total = 0.0
    count = 0
    windows = windows[rank() :: world_size()]  # under torch.distributed: this rank's windows, sums reduced below
    bar = tqdm(total=windows.shape[0], desc=desc, unit="win", disable=desc is None, leave=False)
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s : s + batch_size].to(device)
        t, c = next_token_nll(model(input_ids=ids, use_cache=False).logits, ids)
        total += t
        count += c
        bar.update(ids.shape[0])
    bar.close()
    total, count = all_reduce_sum([total, count])
    return total, int(count)


@torch.no_grad()
def nll_sum_by_blocks(model, windows: torch.Tensor, store, *, batch_size: int = 4,
                      desc: str | None = "perplexity") -> tuple[float, int]:
    """``nll_sum`` for a model whose blocks live on disk: every window through one loaded block at a time (the
    same blocks, masks and position embeddings as the model's own forward), then the final norm and head."""
    from ..activations import Runner
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    device = next(p for p in model.parameters() if not p.is_meta).device
    runner = Runner.for_model(adapter, windows.shape[1], device=device, batch_size=batch_size)
    runner.store = store
    windows = windows[rank() :: world_size()]
    hidden = runner.embed(windows)
    blocks, kinds = list(adapter.blocks), adapter.block_kinds()
    for block, kind in tqdm(list(zip(blocks, kinds)), desc=desc, unit="block", disable=desc is None, leave=False):
        hidden = runner.run([block], [kind], hidden)
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s : s + batch_size].to(device)
        t, c = next_token_nll(adapter.head(hidden[s : s + batch_size].to(device)), ids)
        total += t
        count += c
    total, count = all_reduce_sum([total, count])
    return total, int(count)


def evaluate_perplexity(
    model,
    tokenizer,
    *,
    source: str = "wikitext2",
    seqlen: int = 256,
    max_windows: int | None = 128,
    batch_size: int = 4,
    desc: str | None = "perplexity",
    windows: torch.Tensor | None = None,
    store=None,
) -> PerplexityResult:
    """WikiText-2 (or another source) perplexity of a causal LM under the protocol in this module's docstring.

    ``windows``: the [W, seqlen] output of :func:`perplexity_windows` for these settings, when several models are
    evaluated on the same text (saves tokenizing it again). ``store``: the BlockStore of a model whose blocks live
    on disk (``--offload disk``); they are then run one at a time.
    """
    t0 = time.perf_counter()
    if windows is None:
        windows = perplexity_windows(tokenizer, source, seqlen, max_windows)
    was_training = model.training
    model.eval()
    if store is not None:  # the memory-first path: large blocks keep going back to the system
        total, count = nll_sum_by_blocks(model, windows, store, batch_size=batch_size, desc=desc)
    else:
        with reuse_large_allocations(True):  # each mini-batch's [B, T, V] logits reuse the last one's pages
            total, count = nll_sum(model, windows, batch_size=batch_size, desc=desc)
    model.train(was_training)
    nll = total / count
    return PerplexityResult(
        source=source,
        seqlen=seqlen,
        windows=int(windows.shape[0]),
        tokens_scored=count,
        nll=nll,
        ppl=math.exp(nll),
        seconds=time.perf_counter() - t0,
    )
