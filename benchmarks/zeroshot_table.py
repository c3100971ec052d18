"""Markdown table of `fusegpt eval --tasks ... --json` files (one task per file): metrics, samples, seconds.

    python benchmarks/zeroshot_table.py runs/zs-dense/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> int:
    print("| task | samples | acc | acc_norm | other | seconds | s / sample | command |")
    print("|---|---|---|---|---|---|---|---|")
    for p in paths:
        d = json.loads(Path(p).read_text())
        if "results" not in d:
            continue
        limit = d.get("limit")
        groups = d.get("groups") or {}
        for task in d.get("requested") or list(d["results"]):
            r = groups.get(task) or d["results"][task]
            n = d["n-samples"].get(task, {}).get("effective")
            if n is None:  # a group: the sum over its members
                n = sum(v["effective"] for k, v in d["n-samples"].items() if k.startswith(task + "_"))
            secs = d["seconds"].get(task)

            def fmt(key: str, r: dict = r) -> str:
                if key not in r:
                    return "-"
                err = r.get(key.replace(",", "_stderr,"))
                return f"{100 * r[key]:.2f}" + (f" ± {100 * err:.2f}" if isinstance(err, float) else "")

            other = f"ppl {r['perplexity,none']:.2f}" if "perplexity,none" in r else ""
            cmd = f"`fusegpt eval smollm2-135m --tasks {task}" + (f" --limit {limit}" if limit else "") + \
                " --batch-size 16 --threads 2`"
            print(f"| {task} | {n} | {fmt('acc,none')} | {fmt('acc_norm,none')} | {other} | {secs:.0f} | "
                  f"{secs / max(n, 1):.3f} | {cmd} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
