"""Does ``torch.compile`` speed up a training step of ours? Eager vs compiled blocks, alternating in one process.

    python benchmarks/compile_step.py [--model smollm2-135m] [--stage final|group] [--threads 2] [--steps 16]
                                      [--dtype fp32|bf16]

``final``: the final stage's step shape: the first 22 blocks wrapped with LoRA (rank 128) on frozen weights, LoRA
and norms trained (the LM head's loss is left out: it is the same for both). ``group``: one receiving window of the
``cpu`` preset's group stage at G = 5: block 14 fused into blocks 9-13 (low-rank coefficients + LoRA), block 15
closing the window, coefficients, LoRA and norms trained. Both at 4 x 256 tokens with an MSE loss against a random
target. Each block is compiled on its own (``torch.compile(block)``); the same blocks, parameters and optimizer run
eager and compiled in alternate steps, so the machine's drift hits both alike. Prints each step's seconds, the
medians after ``--warmup`` steps, the first compiled step (compilation included) and the forward's largest
difference from eager. ``--dtype bf16`` runs both under bf16 autocast (what ``auto`` chooses on a CPU with native
bf16), fp32 masters as in compress.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stage", choices=("final", "group"), default="final")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype (bf16: autocast)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fusegpt.activations import Runner
    from fusegpt.device import autocast
    from fusegpt.adapters import get_adapter
    from fusegpt.fusion import inject_donor, wrap_block
    from fusegpt.models import load_model

    model = load_model(args.model).model.float()
    ad = get_adapter(model)
    runner = Runner.for_model(ad, 256, device=torch.device("cpu"), batch_size=4)
    g = torch.Generator().manual_seed(0)
    allb = list(ad.blocks)
    if args.stage == "final":
        blocks = allb[:22]
        for b in blocks:
            wrap_block(ad, b, lora_rank=128, generator=g)
        trained = ("lora", "norm")
    else:
        blocks = allb[9:14] + allb[15:16]
        inject_donor(ad, allb[14], blocks[:-1], coef_kind="lowrank", coef_rank=128, lora_rank=128, generator=g)
        trained = ("lora", "coef", "norm")
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for b in blocks for n, p in b.named_parameters() if any(t in n for t in trained)]
    for p in params:
        p.requires_grad_(True)
    kinds = ad.block_kinds()[: len(blocks)]
    compiled = [torch.compile(b) for b in blocks]

    compute = torch.bfloat16 if args.dtype == "bf16" else None

    def forward(fns, x):
        with autocast(torch.device("cpu"), compute):
            for f, k in zip(fns, kinds):
                out = f(x, use_cache=False, **runner.ctx.kwargs(k))
                x = out[0] if isinstance(out, tuple) else out
        return x.float()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 256, ad.config.hidden_size, generator=gen)
    y = torch.randn(4, 256, ad.config.hidden_size, generator=gen)
    opt = torch.optim.Adam(params, lr=1e-5)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(args.steps):
        for name, fns in (("eager", blocks), ("compiled", compiled)):
            t = time.perf_counter()
            loss = ((forward(fns, x) - y) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times[name].append(time.perf_counter() - t)
        print(f"step {i}: eager {times['eager'][-1]:.3f} s, compiled {times['compiled'][-1]:.3f} s", flush=True)
    with torch.no_grad():
        a, b = forward(blocks, x), forward(compiled, x)
    med = {k: statistics.median(v[args.warmup:]) for k, v in times.items()}
    print(f"{args.model} {args.stage} {args.dtype}: median step eager {med['eager']:.3f} s, "
          f"compiled {med['compiled']:.3f} s "
          f"(ratio {med['compiled'] / med['eager']:.3f}); first compiled step {times['compiled'][0]:.1f} s; "
          f"forward max |diff| {float((a - b).abs().max()):.3g} of max |y| {float(a.abs().max()):.3g}")


if __name__ == "__main__":
    main()
