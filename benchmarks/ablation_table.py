"""Markdown table of an ablation JSONL written by benchmarks/ablation.py (recovery vs the 'drop' and 'dense' rows).

    python benchmarks/ablation_table.py runs/ablation10.jsonl [--dense-ppl 38.06]
"""

from __future__ import annotations

import argparse
import json
import math


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--dense-ppl", type=float, default=None, help="dense PPL when the file has no 'dense' row")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.jsonl) if line.strip()]
    by = {r["name"]: r for r in rows}
    dense = by["dense"]["ppl"] if "dense" in by else args.dense_ppl
    drop = by["drop"]["ppl"]
    keys = ["mode", "loss", "train", "group_size", "lr", "coef_lr", "batch_size", "epochs", "consolidate"]
    print("| variant | " + " | ".join(keys) + " | removed | PPL | recovery | compress s |")
    print("|---" * (len(keys) + 5) + "|")
    for r in rows:
        rec = (math.log(drop) - math.log(r["ppl"])) / (math.log(drop) - math.log(dense)) if dense else float("nan")
        cfg = r.get("config") or {}
        if cfg.get("blocks") and cfg.get("mode") == "iterative":
            cfg = {**cfg, "mode": "fixed (= one-shot MI order)"}
        cells = [str(cfg.get(k, "-")) for k in keys]
        print(f"| {r['name']} | " + " | ".join(cells) + f" | {r.get('removed', '-')} | {r['ppl']:.2f} | {rec:.2f} | "
              f"{r.get('seconds', 0):.0f} |")


if __name__ == "__main__":
    main()
