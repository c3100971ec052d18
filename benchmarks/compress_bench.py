"""Compression time and peak memory of a preset on one model (a benchmark, not a test).

    python benchmarks/compress_bench.py --model smollm2-135m --preset cpu --sparsity 0.25 --out runs/bench-cpu

Runs the full pipeline (compress, evaluate, export) and prints wall time per phase, the compression loop's FLOP/s
as a fraction of the measured matmul peak, and the process's peak resident memory. The numbers come from
DIR/fusegpt_report.json, which any `fusegpt compress` run writes as well.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch


def summarize(report: dict) -> dict:
    phases: dict[str, float] = {}
    for s in report["steps"]:
        for k, v in s["seconds"].items():
            phases[k] = phases.get(k, 0.0) + v
    return {
        "compress_seconds": report["seconds"],
        "phase_seconds": phases,
        "removed": report["removed"],
        "flops_fraction_of_peak": report["flops_fraction_of_peak"],
        "matmul_peak_gflops": report["matmul_peak_flops"] / 1e9,
        "peak_memory_gib": report["peak_memory_bytes"] / 2**30,
        "compute_dtype": report["compute_dtype"],
        "ppl": report.get("evaluation", {}).get("wikitext2", {}).get("ppl"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--out", type=Path, help="output folder of the run (required unless --report)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", type=Path, help="only summarize an existing fusegpt_report.json")
    args = ap.parse_args()
    if args.report is None and args.out is None:
        ap.error("give --out (run) or --report (summarize)")
    if args.report is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        torch.set_num_threads(args.threads)
        from fusegpt.config import CompressConfig
        from fusegpt.pipeline import run_compression

        cfg = CompressConfig.from_preset(args.preset, sparsity=args.sparsity)
        run_compression(args.model, cfg, args.out, command=f"benchmarks/compress_bench.py {args}")
        args.report = args.out / "fusegpt_report.json"
    print(json.dumps(summarize(json.loads(args.report.read_text())), indent=2))


if __name__ == "__main__":
    main()
