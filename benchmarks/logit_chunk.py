"""Time the logit-KL loss + its gradient (the final stage's head work) for several token chunk sizes.

    python benchmarks/logit_chunk.py [--threads 2] [--chunks 64,128,256,512,1024] [--repeats 5]

One mini-batch of 4 x 256 tokens (the cpu preset's), a random final norm and LM head of SmolLM2's shape
(576 x 49,152) and Gemma-3's (640 x 262,144), fp32. Prints the median seconds per chunk size (the first repeat is a
warm-up and is dropped). A chunk's [chunk, V] logits above glibc's largest heap threshold (32 MiB) are mapped and
zeroed afresh each time; smaller chunks re-read the head's weight more often. Timings compare only within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusegpt.distill import LossHead, get_loss

SHAPES = {"smollm2 (576 x 49152)": (576, 49152), "gemma3 (640 x 262144)": (640, 262144)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", default="64,128,256,512,1024")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chunks = [int(c) for c in args.chunks.split(",")]
    print("| head | chunk (tokens) | [chunk, V] fp32 MiB | loss + gradient, median s |")
    print("|---|---|---|---|")
    for name, (hidden, vocab) in SHAPES.items():
        norm = torch.nn.RMSNorm(hidden)
        head = torch.nn.Linear(hidden, vocab, bias=False)
        for p in [*norm.parameters(), *head.parameters()]:
            p.requires_grad_(False)
        teacher = torch.randn(4, 256, hidden)
        for chunk in chunks:
            logits = torch.nn.Sequential(norm, head)  # final norm + LM head, as the adapters' head()
            fn = get_loss("logit-kl", LossHead(norm, logits, chunk=chunk))
            times = []
            for _ in range(args.repeats):
                student = (teacher + 0.3 * torch.randn_like(teacher)).requires_grad_(True)
                t = time.perf_counter()
                fn(student, teacher).backward()
                times.append(time.perf_counter() - t)
            med = statistics.median(times[1:])
            print(f"| {name} | {chunk} | {chunk * vocab * 4 / 2**20:.0f} | {med:.3f} |", flush=True)


if __name__ == "__main__":
    main()
