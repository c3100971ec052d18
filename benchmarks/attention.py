"""Attention forward + backward while training: PyTorch's SDPA kernel against fusegpt's written-out attention.

    python benchmarks/attention.py [--threads 2] [--dtype bf16|fp32] [--shape B,H,KV,T,D] [--repeats 40]

Default shape: the cpu preset's mini-batch on SmolLM2 (4 windows of 256 tokens, 9 query / 3 key-value heads of 64).
``sdpa`` is what transformers' ``sdpa`` attention runs (``F.scaled_dot_product_attention``, causal, grouped
heads); ``written-out`` is ``fusegpt.attention.attention`` (what distillation runs on a CPU in half precision). The
two alternate call by call in one process (``fusegpt.benchmark.timing.interleaved``), inside
``fusegpt.device.reuse_large_allocations`` as compress runs; prints the medians of forward and backward separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--shape", default="4,9,3,256,64", help="B,H,KV,T,D")
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fusegpt.attention import attention
    from fusegpt.benchmark.timing import interleaved
    from fusegpt.device import reuse_large_allocations

    b, h, kv, t, d = (int(x) for x in args.shape.split(","))
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, t, d, generator=g).to(dt).requires_grad_(True)
    k = torch.randn(b, kv, t, d, generator=g).to(dt).requires_grad_(True)
    v = torch.randn(b, kv, t, d, generator=g).to(dt).requires_grad_(True)
    go = torch.randn(b, h, t, d, generator=g).to(dt)
    kinds = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             "written-out": lambda: attention(q, k, v)}
    split: dict[str, list[tuple[float, float]]] = {name: [] for name in kinds}

    def timer(name):
        def run() -> float:
            t0 = time.perf_counter()
            out = kinds[name]()
            t1 = time.perf_counter()
            torch.autograd.grad(out, (q, k, v), go)
            t2 = time.perf_counter()
            split[name].append((t1 - t0, t2 - t1))
            return t2 - t0
        return run

    with reuse_large_allocations(True):
        interleaved([(name, timer(name), 0.0) for name in kinds], args.repeats)
    print("| kernel | dtype | shape B,H,KV,T,D | forward ms | backward ms | total ms |")
    print("|---|---|---|---|---|---|")
    for name, rows in split.items():
        rows = rows[1:]  # the warm-up call
        f = statistics.median(r[0] for r in rows) * 1e3
        bw = statistics.median(r[1] for r in rows) * 1e3
        print(f"| {name} | {args.dtype} | {args.shape} | {f:.2f} | {bw:.2f} | {f + bw:.2f} |")


if __name__ == "__main__":
    main()
