"""Does a forward-only pass (the dense calibration pass, MI scoring, evaluation) get faster per window with more
windows per call? One SmolLM2-shaped block (hidden 576, MLP 1536, 9 heads, 3 KV heads, random weights), 32 windows
of ``--seqlen`` tokens run through the runner at several mini-batch sizes, alternating sizes over ``--rounds``.

    python benchmarks/forward_batch.py [--threads 2] [--dtype bf16|fp32] [--batches 4,8,16,32] [--rounds 3]

Prints the median milliseconds per window per block for each batch size (each round's figure is the median of 5
timed calls after a warm-up). Timings compare only within one run.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--batches", default="4,8,16,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig

    from fusegpt.activations import Runner
    from fusegpt.adapters import get_adapter
    from fusegpt.plan import _median_time, _two_block_model

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=2, vocab_size=128, max_position_embeddings=2048)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = _two_block_model(config).to(dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    ad = get_adapter(model)
    blocks, kinds = list(ad.blocks), ad.block_kinds()
    cpu, n = torch.device("cpu"), 32
    x = torch.randn(n, args.seqlen, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    ms: dict[int, list[float]] = {}
    for _ in range(args.rounds):
        for b in (int(s) for s in args.batches.split(",")):
            runner = Runner.for_model(ad, args.seqlen, device=cpu, batch_size=b,
                                      compute_dtype=None if dtype == torch.float32 else dtype)
            sec = _median_time(lambda r=runner: r.run([blocks[0]], kinds[:1], x), 5, cpu)
            ms.setdefault(b, []).append(sec / n * 1e3)
    print(f"{args.dtype}, {args.threads} threads, {args.seqlen} tokens per window")
    for b, v in ms.items():
        print(f"batch {b:>3}: {statistics.median(v):.2f} ms per window per block  (rounds: "
              + ", ".join(f"{t:.2f}" for t in v) + ")")


if __name__ == "__main__":
    main()
