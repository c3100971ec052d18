"""Time the logit-KL loss + its gradient (the final stage's head work) for several token chunk sizes.

    python benchmarks/logit_chunk.py [--threads 2] [--chunks 64,128,256,512,1024] [--repeats 5] [--topk 0,128]
        [--dtype fp32|bf16] [--block-mib 2,8,0]

One mini-batch of 4 x 256 tokens (the cpu preset's), a random final norm and LM head of SmolLM2's shape
(576 x 49,152) and Gemma-3's (640 x 262,144), in ``--dtype`` (weights and hidden states; bf16 = the cpu preset's
weights on a CPU with native bf16). ``--block-mib``: the fp32 [rows, V] block of the KL's elementwise passes
(``fusegpt.distill.losses.KL_BLOCK_BYTES``; 0 = a whole chunk at once, as before that block existed). Prints the
median seconds per chunk size (the first repeat is a warm-up and is dropped). A chunk's [chunk, V] logits above
glibc's largest heap threshold (32 MiB) are mapped and
zeroed afresh each time; smaller chunks re-read the head's weight more often. ``--topk``: the teacher as its full
hidden states (0: the head runs on it at every step) or as its top-k distributions precomputed once (k, the final
stage's ``--final-topk``; the precomputation is not timed). Timings compare only within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusegpt.device import reuse_large_allocations
from fusegpt.distill import LossHead, get_loss, losses
from fusegpt.distill.losses import teacher_topk

SHAPES = {"smollm2 (576 x 49152)": (576, 49152), "gemma3 (640 x 262144)": (640, 262144)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", default="64,128,256,512,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--topk", default="0", help="teacher kinds: 0 = full hidden states, k = top-k precomputed")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--block-mib", default=None, help="KL row-block sizes in MiB (default: the library's)")
    ap.add_argument("--fresh-pages", action="store_true",
                    help="glibc's default large allocations (mapped afresh; compress reuses the heap instead)")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    blocks = ([float(b) for b in args.block_mib.split(",")] if args.block_mib
              else [losses.KL_BLOCK_BYTES / 2**20])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chunks = [int(c) for c in args.chunks.split(",")]
    print("| head | dtype | chunk (tokens) | [chunk, V] fp32 MiB | KL block MiB | teacher | loss + gradient, "
          "median s |")
    print("|---|---|---|---|---|---|---|")
    for name, (hidden, vocab) in SHAPES.items():
        norm = torch.nn.RMSNorm(hidden).to(dtype)
        head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype)
        for p in [*norm.parameters(), *head.parameters()]:
            p.requires_grad_(False)
        teacher = torch.randn(4, 256, hidden).to(dtype)
        ks = [int(x) for x in args.topk.split(",")]
        for chunk, k, mib in ((c, k, b) for c in chunks for k in ks for b in blocks):
            losses.KL_BLOCK_BYTES = int(mib * 2**20) if mib > 0 else 2**62
            logits = torch.nn.Sequential(norm, head)  # final norm + LM head, as the adapters' head()
            lh = LossHead(norm, logits, chunk=chunk)
            fn = get_loss("logit-kl", lh)
            target = teacher_topk(teacher, lh, k) if k else teacher
            times = []
            with reuse_large_allocations(not args.fresh_pages):
                for _ in range(args.repeats):
                    student = (teacher + 0.3 * torch.randn_like(teacher)).requires_grad_(True)
                    t = time.perf_counter()
                    fn(student, target).backward()
                    times.append(time.perf_counter() - t)
            med = statistics.median(times[1:])
            kind = f"top-{k}" if k else "hidden states"
            mb = chunk * vocab * 4 / 2**20
            print(f"| {name} | {args.dtype} | {chunk} | {mb:.0f} | {mib:g} | {kind} | {med:.3f} |", flush=True)


if __name__ == "__main__":
    main()
