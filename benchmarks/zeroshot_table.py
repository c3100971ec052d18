"""Markdown tables of `fusegpt eval --tasks ... --json` files (one task per file).

    python benchmarks/zeroshot_table.py runs/zs-dense/*.json            # per task: metrics, samples, seconds
    python benchmarks/zeroshot_table.py --compare docs/results/zeroshot25 --dense docs/results/zeroshot-dense
        # one row per model (a folder of TASK.json files; --dense adds that folder as the row "dense"), one column
        # per task: acc +- stderr, the mean over the tasks every row has, and acc_norm where a task reports it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path) -> dict[str, dict]:
    """task -> its lm-eval result, from every JSON file of one model's folder."""
    out = {}
    for p in sorted(folder.glob("*.json")):
        d = json.loads(p.read_text())
        for task in d.get("requested") or list(d.get("results", {})):
            if task in d.get("results", {}) and not d.get("limit"):
                out[task] = {**d["results"][task], "seconds": d["seconds"].get(task),
                             "n": d["n-samples"].get(task, {}).get("effective")}
    return out


def compare(root: Path, dense: Path | None, order: list[str]) -> int:
    models = {"dense": _load(dense)} if dense else {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        models[sub.name] = _load(sub)
    if order:
        models = {k: models[k] for k in [*(["dense"] if dense else []), *order] if k in models}
    tasks = [t for t in ("piqa", "arc_easy", "arc_challenge", "lambada_openai", "boolq", "openbookqa")
             if any(t in m for m in models.values())]
    shared = [t for t in tasks if all(t in m for m in models.values())]

    def cell(r: dict | None, key: str) -> str:
        if r is None or f"{key},none" not in r:
            return "-"
        err = r.get(f"{key}_stderr,none")
        return f"{100 * r[f'{key},none']:.2f}" + (f" ± {100 * err:.2f}" if isinstance(err, float) else "")

    for key in ("acc", "acc_norm"):
        cols = [t for t in tasks if any(f"{key},none" in m.get(t, {}) for m in models.values())]
        avg_cols = [t for t in shared if t in cols]
        print(f"\n{key} (full sets; mean over {', '.join(avg_cols) or 'no task every row has'})\n")
        print("| model | " + " | ".join(cols) + " | mean |")
        print("|---|" + "---|" * (len(cols) + 1))
        for name, m in models.items():
            vals = [m[t][f"{key},none"] for t in avg_cols if f"{key},none" in m.get(t, {})]
            mean = f"{100 * sum(vals) / len(vals):.2f}" if vals and len(vals) == len(avg_cols) else "-"
            print(f"| {name} | " + " | ".join(cell(m.get(t), key) for t in cols) + f" | {mean} |")
    print("\nseconds per task: " + "; ".join(
        f"{name} " + ", ".join(f"{t} {m[t]['seconds']:.0f}" for t in tasks if t in m and m[t]["seconds"])
        for name, m in models.items()))
    return 0


def main(paths: list[str]) -> int:
    if paths and paths[0] == "--compare":
        import argparse

        ap = argparse.ArgumentParser()
        ap.add_argument("--compare", type=Path, required=True)
        ap.add_argument("--dense", type=Path)
        ap.add_argument("--order", default="", help="comma-separated model folders, in row order")
        a = ap.parse_args(paths)
        return compare(a.compare, a.dense, [o for o in a.order.split(",") if o])
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
