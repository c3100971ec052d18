"""One receiving linear's training step (forward + backward), against the tokens' own matmuls or another version.

    python benchmarks/fused_linear.py [--threads 2] [--dtype bf16|fp32] [--tokens 1024] [--rank 128] [--steps 80]
                                      [--against OLD/src/fusegpt/fusion/math.py]

For each linear shape of SmolLM2's blocks (MLP 1536 x 576 and 576 x 1536, attention 576 x 576): a FusedLinear with
LoRA (rank ``--rank``) and one low-rank donor coefficient (rank ``--rank``), its base weight frozen, LoRA and
coefficients trained, as in the group stage; the step is ``fusion.math.fused_linear``'s forward and hand-written
backward under autocast (``--dtype bf16``) or in fp32. Prints the median step and the median of the three matmuls
every linear layer costs anyway (x W^T, g W, g^T x in the compute dtype): what forming W_eff and the factors'
gradients adds. ``--against FILE`` loads another version of ``fusion/math.py`` (e.g. from ``git worktree add``) and
alternates its step with this checkout's, step by step in one process (``fusegpt.benchmark.timing.interleaved``: the
machine's drift hits both alike), and prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--against", default=None, help="another fusion/math.py to alternate with this checkout's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fusegpt.fusion import linear

    versions = {"this": linear.fused_linear}
    if args.against:
        spec = importlib.util.spec_from_file_location("fusegpt_math_against", args.against)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        versions["against"] = other.fused_linear
    compute = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    cols = " | ".join(f"step ms ({k})" for k in versions)
    print(f"| linear (out x in) | {cols} | three token matmuls ms |" + (" this / against |" if args.against else ""))
    print("|---" * (len(versions) + 2 + bool(args.against)) + "|")
    for out, inn in ((1536, 576), (576, 1536), (576, 576)):
        med = _measure(linear, versions, out, inn, args, compute, g)
        row = " | ".join(f"{med[k]:.2f}" for k in versions)
        ratio = f" {med['this'] / med['against']:.3f} |" if args.against else ""
        print(f"| {out} x {inn} | {row} | {med['matmuls']:.2f} |{ratio}")


def _measure(linear, versions: dict, out: int, inn: int, args, compute: torch.dtype,
             g: torch.Generator) -> dict[str, float]:
    from fusegpt.benchmark.timing import _timed, interleaved
    from fusegpt.device import autocast

    cpu = torch.device("cpu")
    fl = linear.FusedLinear(nn.Linear(inn, out, bias=False), lora_rank=args.rank, generator=g)
    fl.add_donor(0.02 * torch.randn(out, inn, generator=g), None, coef_kind="lowrank", coef_rank=args.rank,
                 generator=g)
    with torch.no_grad():
        for p in fl.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    fl.weight.requires_grad_(False)
    for p in fl.coefficient_parameters() + fl.lora_parameters():
        p.requires_grad_(True)
    x = torch.randn(args.tokens, inn, generator=g).requires_grad_(True)
    up = torch.randn(args.tokens, out, generator=g).to(compute)
    xc, wc = x.detach().to(compute), fl.weight.detach().to(compute)

    def step_with(fn):
        def step():
            linear.fused_linear = fn
            with autocast(cpu, compute):
                y = fl(x)
            y.backward(up)
        return lambda: _timed(step, cpu)

    def matmuls():
        xc @ wc.t()
        up @ wc
        up.t() @ xc

    timers = [(name, step_with(fn), args.tokens) for name, fn in versions.items()]
    try:
        # the project's A/B timer: one uncounted run each, then rounds this, against, matmuls, ...
        runs = interleaved([*timers, ("matmuls", lambda: _timed(matmuls, cpu), args.tokens)], args.steps)
    finally:
        linear.fused_linear = versions["this"]
    return {t.name: 1e3 * t.median for t in runs}

if __name__ == "__main__":
    main()
