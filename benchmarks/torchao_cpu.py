"""Is torchao's weight-only int8 a CPU inference path for fusegpt's checkpoints? (docs/METHOD.md, quantization)

Times prefill (one window) and greedy decode (batch 1) of a checkpoint folder in fp32 and after
``torchao.quantization.quantize_(model, Int8WeightOnlyConfig())``, in one process (medians of ``--repeats``), and
the logit drift. Needs ``pip install torchao==0.18.0`` (not a fusegpt dependency).

    python benchmarks/torchao_cpu.py FOLDER [FOLDER ...] --threads 2 --json docs/results/quant/torchao.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def timings(model, ids: torch.Tensor, gen: int, repeats: int) -> tuple[float, float]:
    pre, dec = [], []
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids)
            pre.append(time.perf_counter() - t)
            t = time.perf_counter()
            model.generate(ids[:, :16], max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
            dec.append(gen / (time.perf_counter() - t))
    return 1000 * statistics.median(pre), statistics.median(dec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    import torchao
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    for folder in args.folders:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = m(input_ids=ids).logits
        fp32 = timings(m, ids, args.gen, args.repeats)
        quantize_(m, Int8WeightOnlyConfig())
        with torch.no_grad():
            q = m(input_ids=ids).logits
        int8 = timings(m, ids, args.gen, args.repeats)
        row = {"folder": str(folder), "fp32_prefill_ms": fp32[0], "fp32_decode_tok_s": fp32[1],
               "int8wo_prefill_ms": int8[0], "int8wo_decode_tok_s": int8[1],
               "max_logit_diff_over_scale": ((q - ref).abs().max() / ref.abs().max()).item(),
               "top1_agreement": (q.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torchao": torchao.__version__, "torch": torch.__version__,
                                     "threads": args.threads, "tokens": args.tokens, "gen": args.gen,
                                     "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
