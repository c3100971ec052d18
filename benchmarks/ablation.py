"""Ablations of FuseGPT on one model: every variant compresses a fresh copy, is evaluated on the same protocol,
and appended to a JSONL file at once (re-running skips finished variants, so an interrupted sweep resumes).

    python benchmarks/ablation.py --out runs/ablation10.jsonl --blocks 14,13,12 \
        --variant "mse:loss=mse" --variant "kl-batch:loss=kl-batch" ...

A variant is NAME:key=value,key=value (CompressConfig keys; values parsed as JSON where possible, so
blocks=[4,25,5] is a list).
Special variants: "dense" (no compression; or any name with dense=true, e.g. "dense-bf16:dense=true,dtype=bf16")
and "drop" (plain removal of --blocks, of blocks=[...], or, with like=NAME, of the blocks a finished row NAME
removed). Every row loads the weights in its dtype (``dtype``, else the preset's; ``auto`` resolved as compress
resolves it). Any other variant with like=NAME fuses the blocks the
finished row NAME removed, in its order (e.g. the set a search found). Rows of search methods (evopress,
fusegpt-evo) carry the search's summary (seed, best, fitness, seconds).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    values = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas inside [..] belong to a list
        k, _, v = item.partition("=")
        try:
            values[k.replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            values[k.replace("-", "_")] = v
    return name, values


def row_weight_dtype(preset: str, values: dict) -> torch.dtype:
    """The dtype a row's weights load in: its ``dtype``, else the preset's; ``auto`` = the compute dtype the run
    resolves where that is half precision."""
    import dataclasses

    from fusegpt.api import resolve_weight_dtype
    from fusegpt.config import CompressConfig

    keys = {f.name for f in dataclasses.fields(CompressConfig)}
    return resolve_weight_dtype(CompressConfig.from_preset(preset, **{k: v for k, v in values.items() if k in keys}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--blocks", default=None, help="fixed removal list (original indices, in order)")
    ap.add_argument("--base", default="", help="key=value,... applied to every variant")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-windows", type=int, default=128)
    ap.add_argument("--second", default="lambada-test",
                    help="a second evaluation text the calibration never saw ('' = none; default lambada-test)")
    ap.add_argument("--second-windows", type=int, default=64)
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    from fusegpt.api import compress
    from fusegpt.config import CompressConfig
    from fusegpt.evaluate import evaluate_perplexity
    from fusegpt.export import drop_blocks
    from fusegpt.fusion import merge_fused_linears
    from fusegpt.models import load_model

    finished = {}
    if args.out.exists():
        finished = {r["name"]: r for r in (json.loads(line) for line in args.out.read_text().splitlines()
                                            if line.strip())}
    done = set(finished)
    _, base = parse_variant("base:" + args.base)
    if args.blocks:
        base["blocks"] = [int(b) for b in args.blocks.split(",")]
    for spec in args.variant:
        name, values = parse_variant(spec)
        if name in done:
            print(f"skip {name} (done)")
            continue
        # the weights' dtype, as `fusegpt compress --dtype ...` loads them
        loaded = load_model(args.model, dtype=row_weight_dtype(args.preset, {**base, **values}))
        model, tok = loaded.model, loaded.tokenizer
        row = {"name": name, "values": values, "model": args.model}
        if name == "dense" or values.get("dense"):  # e.g. "dense-bf16:dense=true,dtype=bf16"
            row.update(layers=model.config.num_hidden_layers, seconds=0.0)
        elif name == "drop" or name.startswith("drop-"):
            blocks = finished[values["like"]]["removed"] if "like" in values else values.get("blocks",
                                                                                          base.get("blocks"))
            drop_blocks(model, blocks)
            row.update(removed=blocks, layers=model.config.num_hidden_layers, seconds=0.0)
        else:
            if "like" in values:
                values = {**{k: v for k, v in values.items() if k != "like"},
                          "blocks": finished[values["like"]]["removed"]}
                row["values"] = values
            cfg = CompressConfig.from_preset(args.preset, **{**base, **values})
            rep = compress(model, cfg, tokenizer=tok, source_model=args.model)
            merge_fused_linears(model)
            row.update(removed=rep.removed, layers=rep.final_layers, seconds=rep.seconds, config=cfg.to_dict(),
                       steps=[{"removed": s.removed, "loss_before": s.loss_before, "loss_after": s.loss_after,
                               "mse_before": s.mse_before, "mse_after": s.mse_after, "seconds": s.seconds}
                              for s in rep.steps],
                       flops_fraction_of_peak=rep.flops_fraction_of_peak, compute_dtype=rep.compute_dtype,
                       # the counted FLOPs and the peak read at the start: the achieved rate is flops / seconds
                       flops=rep.flops.get("total"), matmul_peak_flops=rep.matmul_peak_flops,
                       train_steps=sum(s.train_steps for s in rep.steps),
                       final_steps=(rep.steps[-1].extra.get("final") or {}).get("steps", 0) if rep.steps else 0)
            if rep.steps and "search" in rep.steps[0].extra:
                row["search"] = rep.steps[0].extra["search"]
        res = evaluate_perplexity(model, tok, max_windows=args.max_windows)
        row.update(ppl=res.ppl, eval_seconds=res.seconds, params=sum(p.numel() for p in model.parameters()))
        if args.second:
            res2 = evaluate_perplexity(model, tok, source=args.second, max_windows=args.second_windows)
            row.update(second=args.second, ppl_second=res2.ppl, eval_seconds_second=res2.seconds)
        print(f"== {name}: PPL {res.ppl:.3f} / {row.get('ppl_second', float('nan')):.3f} "
              f"({row.get('seconds', 0):.0f} s compress)", flush=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        finished[name] = row


if __name__ == "__main__":
    main()
