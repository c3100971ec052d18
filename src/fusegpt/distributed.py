"""Data parallelism through torch.distributed: ``torchrun --nproc-per-node N -m fusegpt compress ...``.

One process per device (NCCL on GPUs, gloo on CPUs), every process holding the model and the activation caches
(the streaming engine bounds both). What is split:

- Macro Influence: the candidates (block i goes to rank i mod N); every score is gathered to every rank
  (a float64 sum with zeros elsewhere: exact);
- distillation: every mini-batch of B windows is split in N equal parts; each rank runs its part through the
  group, the outputs are gathered with autograd (``torch.distributed.nn.functional.all_gather``) so every rank
  computes the loss of the whole mini-batch (exact for losses that couple samples, such as ``kl-batch``, whose
  softmax runs over the batch), and the parameter gradients are summed over ranks: the same update as one process
  with the same global batch, up to the order of floating-point sums;
- perplexity: the evaluation windows (sums of NLL and token counts reduced).

The rest (teacher outputs, group losses on the scoring windows, the generators' draws) is computed identically
on every rank, so the ranks stay in step and the same seed gives the same blocks. Rank 0 alone writes (the run
folder, the export, the reports); every rank reads a resumed run's state.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

__all__ = ["init_from_env", "world_size", "rank", "is_main", "shard", "split_batch", "gather_batch",
           "all_reduce_grads", "all_reduce_sum", "gather_scores", "broadcast_from_main", "smallest_over_ranks",
           "barrier", "shutdown",
           "DistributedError"]


class DistributedError(ValueError):
    """A setting that data parallelism cannot honour (e.g. a batch the processes cannot split evenly)."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); True when distributed. GPUs: NCCL, and this
    process's device is ``cuda:LOCAL_RANK``; otherwise gloo."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def shutdown() -> None:
    d = _dist()
    if d is not None:
        d.destroy_process_group()


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d is not None else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def shard(items: Sequence) -> list:
    """This rank's items: every world_size-th, starting at its rank."""
    return list(items)[rank() :: world_size()]


def check_divisible(batch_size: int, nsamples: int, n: int | None = None, what: str = "--nsamples",
                    batch_what: str = "--batch-size") -> None:
    """Refuse mini-batches that ``n`` processes (default: this run's) cannot split evenly (``what`` / ``batch_what``:
    the flags that set ``nsamples`` / ``batch_size``)."""
    n = world_size() if n is None else n
    if n < 1:
        raise DistributedError(f"the process count must be >= 1, got {n}")
    if n > 1 and (batch_size % n or nsamples % n):
        raise DistributedError(f"{n} processes split every mini-batch evenly: {batch_what} ({batch_size}) and "
                               f"{what} ({nsamples}) must be multiples of {n}")


def split_batch(idx: torch.Tensor) -> torch.Tensor:
    """This rank's equal part of a mini-batch's sample indices."""
    n = world_size()
    if n == 1:
        return idx
    if idx.numel() % n:
        raise DistributedError(f"a mini-batch of {idx.numel()} samples does not split over {n} processes")
    return idx.tensor_split(n)[rank()]


def gather_batch(part: torch.Tensor) -> torch.Tensor:
    """Every rank's part of a mini-batch, concatenated in rank order, differentiable (the backward pass hands each
    rank the gradient of its own part, summed over the ranks' identical losses)."""
    if world_size() == 1:
        return part
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(part.contiguous()), dim=0)


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks (one flat buffer; a missing gradient counts as zero)."""
    d = _dist()
    if d is None:
        return
    params = list(params)
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    d.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _reduce_device(d) -> torch.device:
    """Where a reduction's tensor must live: this rank's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if d.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sums of Python numbers over the ranks (float64)."""
    d = _dist()
    if d is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device(d))
    d.all_reduce(t)
    return t.cpu().tolist()


def smallest_over_ranks(value: int | None) -> int | None:
    """The smallest ``value`` of all ranks (None where a rank could not read it; None if no rank could): a memory
    decision that every rank must share is taken for the tightest one."""
    d = _dist()
    if d is None:
        return value
    t = torch.tensor([float("inf") if value is None else float(value)], dtype=torch.float64,
                     device=_reduce_device(d))
    d.all_reduce(t, op=d.ReduceOp.MIN)
    v = t.item()
    return None if v == float("inf") else int(v)


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (a picklable value: a decision that every rank must share, such as a dtype
    chosen by measurement, which two processes could otherwise measure differently); ``obj`` itself alone."""
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def gather_scores(n: int, mine: dict[int, float]) -> list[float]:
    """Scores of candidates 0..n-1 of which this rank computed ``mine``, on every rank (exact: zeros elsewhere)."""
    if world_size() == 1:
        return [mine[i] for i in range(n)]
    vals = [0.0] * n
    for i, v in mine.items():
        vals[i] = v
    return all_reduce_sum(vals)
