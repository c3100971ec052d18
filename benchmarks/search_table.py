"""Markdown table of the search study (issue 12): MI-greedy FuseGPT, EvoPress-style drop search, drop search followed
by fusion, and FuseGPT-Evo, with the plain removal of each set, at every sparsity measured.

    python benchmarks/search_table.py docs/results/search/rows.jsonl --extra docs/results/ablation25/rows.jsonl

Rows are those of benchmarks/ablation.py named ``<kind>-<pct>``: ``fusegpt`` (MI greedy, cpu preset; at 25% the
``cpu`` row of --extra), ``drop-fusegpt`` (plain removal of its blocks; at 25% --extra's ``drop``), ``evopress``,
``evopress-fused``, ``evo``, ``drop-evo``. Recovery is against the plain removal of the MI-greedy set at the same
sparsity, on each corpus; the dense PPLs come from --extra's ``dense`` row.
"""

from __future__ import annotations

import argparse
import json
import math

LABELS = [
    ("fusegpt", "FuseGPT, MI greedy (cpu preset)"),
    ("drop-fusegpt", "plain removal of the MI-greedy set"),
    ("evopress", "EvoPress-style drop search (plain removal of its set)"),
    ("evopress-fused", "drop search, then FuseGPT on its set"),
    ("evo", "FuseGPT-Evo (fuse fitness), then FuseGPT on its set"),
    ("drop-evo", "plain removal of FuseGPT-Evo's set"),
]


def _rec(p: float | None, drop: float, dense: float) -> str:
    if p is None:
        return "-"
    return f"{(math.log(drop) - math.log(p)) / (math.log(drop) - math.log(dense)):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl")
    ap.add_argument("--extra", required=True, help="the 25% ablation rows (dense, drop, cpu)")
    args = ap.parse_args()
    rows = {r["name"]: r for r in map(json.loads, open(args.jsonl)) if r}
    extra = {r["name"]: r for r in map(json.loads, open(args.extra)) if r}
    rows.setdefault("fusegpt-25", extra["cpu"])
    rows.setdefault("drop-fusegpt-25", extra["drop"])
    dense, dense2 = extra["dense"]["ppl"], extra["dense"]["ppl_second"]
    pcts = sorted({n.rsplit("-", 1)[1] for n in rows if n.rsplit("-", 1)[-1].isdigit()})
    head = ["sparsity", "method", "removed (in order)", "search s", "total s", "KL seed -> best (held-out)",
            "WikiText-2 PPL", "recovery", "LAMBADA PPL", "recovery"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for pct in pcts:
        base = rows.get(f"drop-fusegpt-{pct}")
        if base is None:
            continue
        for key, label in LABELS:
            r = rows.get(f"{key}-{pct}")
            if r is None:
                continue
            s = r.get("search") or {}
            search_s = s.get("seconds")
            kl = f"{s['seed_fitness']:.4f} -> {s['best_fitness']:.4f} ({s['fitness']})" if s else "-"
            total = r.get("seconds", 0.0)
            cells = [f"{int(pct)}%", label, ",".join(map(str, r["removed"])),
                     f"{search_s:.0f}" if search_s is not None else "-", f"{total:.0f}" if total else "0", kl,
                     f"{r['ppl']:.2f}", _rec(r["ppl"], base["ppl"], dense), f"{r['ppl_second']:.2f}",
                     _rec(r["ppl_second"], base["ppl_second"], dense2)]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
