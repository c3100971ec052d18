"""Dense matmul throughput per dtype and thread count (the roofline for compression and evaluation).

    python benchmarks/matmul.py [--n 2048] [--threads 1,2] [--json out.json]

One uncounted warm-up, the fastest of the repeats (the peak). bf16 is timed with fewer repeats because CPUs
without native bf16 (no AVX512-BF16/AMX) run it many times slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import torch

from fusegpt.device import matmul_flops_per_second


def rate(n: int, dtype: torch.dtype, repeats: int) -> float:
    return matmul_flops_per_second(torch.device("cpu"), dtype, n=n, repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for th in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(th)
        fp32 = rate(args.n, torch.float32, 7)
        small = min(args.n, 512)  # keep the slow-bf16 case short
        bf16 = rate(small, torch.bfloat16, 3)
        fp32_small = rate(small, torch.float32, 7)
        rows.append({"threads": th, "n": args.n, "fp32_gflops": fp32 / 1e9, "bf16_n": small,
                     "bf16_gflops": bf16 / 1e9, "fp32_gflops_same_n": fp32_small / 1e9,
                     "bf16_over_fp32": bf16 / fp32_small})
        print(f"threads={th}: fp32 {fp32 / 1e9:.1f} GFLOP/s (n={args.n}); bf16 {bf16 / 1e9:.2f} vs fp32 "
              f"{fp32_small / 1e9:.1f} GFLOP/s (n={small}) -> bf16/fp32 = {bf16 / fp32_small:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
