"""Markdown table of an ablation JSONL written by benchmarks/ablation.py (recovery vs the 'drop' and 'dense' rows).

    python benchmarks/ablation_table.py runs/ablation10.jsonl [--dense-ppl 38.06] [--changes]

Recovery = (ln PPL_drop - ln PPL) / (ln PPL_drop - ln PPL_dense), on WikiText-2 and, when the rows have it, on the
second corpus. ``--changes`` lists only what each variant changed (its values) instead of a fixed set of keys.
Steps: the group stage's + the final stage's optimizer steps. GFLOP/s: the counted FLOPs over the compression
seconds (the achieved rate; rows that store their FLOPs); "of matmul peak" divides by the peak read at the run's
start, which on an unsteady machine can read low.
"""

from __future__ import annotations

import argparse
import json
import math


def recovery(ppl: float, drop: float, dense: float | None) -> float:
    if dense is None or ppl is None:
        return float("nan")
    return (math.log(drop) - math.log(ppl)) / (math.log(drop) - math.log(dense))


def final_steps(row: dict, cfg: dict) -> int:
    """The final stage's optimizer steps: recorded by newer rows, else from the config (epochs x mini-batches)."""
    if row.get("final_steps") is not None:
        return int(row["final_steps"])
    n = cfg.get("final_nsamples") or cfg.get("nsamples", 0)
    return int(cfg.get("final_epochs", 0) * math.ceil(n / (cfg.get("final_batch_size") or cfg.get("batch_size", 1))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--dense-ppl", type=float, default=None, help="dense PPL when the file has no 'dense' row")
    ap.add_argument("--changes", action="store_true", help="one column with each variant's changed values")
    ap.add_argument("--drop-row", default="drop", help="the plain-removal row recovery is measured against")
    ap.add_argument("--only", default=None, help="comma-separated row names to list (default: all)")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.jsonl) if line.strip()]
    by = {r["name"]: r for r in rows}
    dense = by["dense"]["ppl"] if "dense" in by else args.dense_ppl
    dense2 = by["dense"].get("ppl_second") if "dense" in by else None
    drop, drop2 = by[args.drop_row]["ppl"], by[args.drop_row].get("ppl_second")
    second = next((r["second"] for r in rows if r.get("second")), None)
    keys = [] if args.changes else ["mode", "loss", "train", "group_size", "lr", "coef_lr", "batch_size", "epochs",
                                    "consolidate"]
    head = ["variant"] + (["changes"] if args.changes else keys) + ["removed", "WikiText-2 PPL", "recovery"]
    if second:
        head += [f"{second} PPL", "recovery"]
    head += ["compress s", "group + final steps", "compute", "GFLOP/s", "of matmul peak"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    only = set(args.only.split(",")) if args.only else None
    for r in rows:
        if only is not None and r["name"] not in only:
            continue
        cfg = r.get("config") or {}
        if args.changes:
            cells = [", ".join(f"{k}={v}" for k, v in r.get("values", {}).items()) or "-"]
        else:
            if cfg.get("blocks") and cfg.get("mode") == "iterative":
                cfg = {**cfg, "mode": "fixed (= one-shot MI order)"}
            cells = [str(cfg.get(k, "-")) for k in keys]
        removed = ",".join(str(b) for b in r["removed"]) if r.get("removed") else "-"
        cells += [removed, f"{r['ppl']:.2f}", f"{recovery(r['ppl'], drop, dense):.3f}"]
        if second:
            p2 = r.get("ppl_second")
            cells += [f"{p2:.2f}" if p2 else "-", f"{recovery(p2, drop2, dense2):.3f}" if p2 else "-"]
        dtype = (r.get("compute_dtype") or "-").replace("torch.", "")
        frac = r.get("flops_fraction_of_peak")
        steps = str(r.get("train_steps", "-"))
        if "train_steps" in r and cfg.get("final_epochs"):
            steps += f" + {final_steps(r, cfg)}"
        rate = r["flops"] / r["seconds"] / 1e9 if r.get("flops") and r.get("seconds") else None
        cells += [f"{r.get('seconds', 0):.0f}", steps, dtype, f"{rate:.0f}" if rate else "-",
                  f"{frac:.2f}" if frac else "-"]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
