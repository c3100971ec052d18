"""Zero-shot tasks for several models, one `fusegpt eval` process per (model, task), each written to its own JSON
file at once; a file that exists is skipped, so an interrupted sweep continues where it stopped.

    python benchmarks/zeroshot_runs.py --out docs/results/zeroshot25 --tasks piqa,arc_challenge,arc_easy,lambada \
        --model fusegpt=runs/z25/fusegpt --model drop-mi=runs/z25/drop-mi --model sleb=runs/z25/sleb
    python benchmarks/zeroshot_table.py --compare docs/results/zeroshot25 --dense docs/results/zeroshot-dense

Order: task by task over the models (every model has the first task before any has the second), so a sweep cut
short still compares the models on the tasks it finished. OUT/LABEL/TASK.json is `fusegpt eval --json`'s file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="LABEL=PATH (a compressed folder or an alias)")
    ap.add_argument("--tasks", required=True, help="comma-separated task names (fusegpt eval --tasks)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N examples of every task (default: full sets)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="print the commands that would run")
    args = ap.parse_args(argv)
    models = []
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            ap.error(f"--model {spec!r}: use LABEL=PATH")
        models.append((label, path))
    tasks = [t for t in args.tasks.split(",") if t]
    for task in tasks:
        for label, path in models:
            out = args.out / label / f"{task}.json"
            if out.exists():
                print(f"skip {label} {task} (done)", flush=True)
                continue
            cmd = [sys.executable, "-m", "fusegpt", "eval", path, "--tasks", task, "--batch-size",
                   str(args.batch_size), "--threads", str(args.threads), "--json", str(out)]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            print(" ".join(cmd), flush=True)
            if args.dry_run:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            rc = subprocess.call(cmd)
            print(f"{label} {task}: rc {rc}, {time.perf_counter() - t:.0f} s", flush=True)
            if rc != 0:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
