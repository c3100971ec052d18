"""Which blocks one-shot MI removes, by seed and by the number of scoring windows (no fusion, no training).

    python benchmarks/mi_sets.py [--model smollm2-135m] [--seeds 0,1,2] [--score-samples 8,16,32] [--threads 2]
                                 [key=value ...]

Each (seed, score-samples) pair runs compress with the `cpu` preset at --sparsity (default 0.25) and no training
(epochs 0, final stage off), so only the calibration draw (the seed's) and the MI scores decide: the removal order
is what the full run would fuse in. Prints one line per pair and a table of the distinct sets. The seed changes
which calibration windows are drawn, and MI scores on the first --score-samples of them.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--score-samples", default="8,16,32")
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value CompressConfig overrides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fusegpt.api import compress, resolve_weight_dtype
    from fusegpt.config import CompressConfig
    from fusegpt.models import load_model

    from ablation import parse_variant  # the sibling script's key=value parser

    extra = parse_variant("mi:" + ",".join(args.overrides))[1]
    sets: dict[tuple[int, ...], list[str]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for n in (int(s) for s in args.score_samples.split(",")):
            cfg = CompressConfig.from_preset("cpu", **{"sparsity": args.sparsity, **extra, "seed": seed,
                                                       "score_samples": n, "epochs": 0, "final_epochs": 0})
            loaded = load_model(args.model, dtype=resolve_weight_dtype(cfg))
            rep = compress(loaded.model, cfg, tokenizer=loaded.tokenizer)
            scoring = rep.steps[0].seconds.get("scoring", 0.0)
            print(f"seed {seed}  score-samples {n:3d}  removed {rep.removed}  (scoring {scoring:.1f} s)", flush=True)
            sets.setdefault(tuple(sorted(rep.removed)), []).append(f"seed {seed} / {n}")
    print("\n| set (sorted) | seed / score samples |\n|---|---|")
    for s, who in sets.items():
        print(f"| {', '.join(map(str, s))} | {'; '.join(who)} |")


if __name__ == "__main__":
    main()
