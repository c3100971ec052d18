"""Where a short compress run spends its CPU time: torch.profiler's operator table (self CPU time).

    python benchmarks/profile_compress.py [--model smollm2-135m] [--threads 2] [--rows 25] [--by-shape OPS]
        [key=value ...]

Defaults to a short run of the `cpu` preset (1 removal, 16 calibration windows, 4 scoring windows, one final
epoch); extra key=value pairs override CompressConfig fields. ``--by-shape aten::copy_,aten::mm`` also prints
those operators' self time grouped by input shapes (which tensors a cast or a matmul works on). Profiling slows
the run down: read the shares of operators, not the seconds.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--by-shape", default="", help="operators (comma-separated) to list by input shapes")
    ap.add_argument("overrides", nargs="*", help="key=value CompressConfig overrides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from fusegpt.api import compress, resolve_weight_dtype
    from fusegpt.config import CompressConfig
    from fusegpt.models import load_model

    from ablation import parse_variant  # the sibling script's key=value parser (values as JSON where possible)

    values = dict(remove=1, nsamples=16, score_samples=4, final_epochs=1)
    values.update(parse_variant("profile:" + ",".join(args.overrides))[1])
    cfg = CompressConfig.from_preset("cpu", **values)
    loaded = load_model(args.model, dtype=resolve_weight_dtype(cfg))  # as compress loads them (--dtype auto)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(args.by_shape)) as prof:
        rep = compress(loaded.model, cfg, tokenizer=loaded.tokenizer)
    phases: dict[str, float] = {}
    for step in rep.steps:
        for k, v in step.seconds.items():
            phases[k] = phases.get(k, 0.0) + v
    print(f"compress {rep.seconds:.1f} s (profiled); phases: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    ops = [o for o in args.by_shape.split(",") if o]
    if ops:
        rows = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key in ops),
                      key=lambda e: -e.self_cpu_time_total)
        for e in rows[: args.rows]:
            print(f"{e.key:<16} {e.count:>7} calls {e.self_cpu_time_total / 1e6:8.2f} s  {e.input_shapes}")
        missing = sorted(set(ops) - {e.key for e in rows})
        if missing:
            print(f"--by-shape: no calls of {', '.join(missing)} in this run; use the names of the table's first "
                  "column (e.g. aten::mm, aten::copy_)")


if __name__ == "__main__":
    main()
