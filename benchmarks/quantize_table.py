"""Depth and weight compression together (issue 13): dense, dense + GPTQ W4, FuseGPT 25%, FuseGPT 25% + W4 / W8.

Every step is a `fusegpt` command, run in the environment that has its library: `quantize` in the quantization
environment (`make setup-quant`: llm-compressor pins transformers<=5.17), `eval` and `bench` in the main one.
Outputs are kept in ``--work`` and reused when present (a rerun after a crash continues); the table goes to
``--json`` (and is printed as markdown).

    python benchmarks/quantize_table.py --fused runs/fuse25 --work /tmp/quant --json docs/results/quant/table.json

``--fused``: a FuseGPT 25% export (e.g. the `make demo` folder). Bytes are those of the weight files on disk;
the dense checkpoint is fp32 (the GGUF source converted by transformers), so bf16 bytes (2 per parameter) are
given too, the usual reference for "x% smaller".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _slug(name: str) -> str:
    """File stem of a row: "FuseGPT 25% + W4" -> "fusegpt25-w4"."""
    return name.lower().replace(" + ", "-").replace(" ", "").replace("%", "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fused", type=Path, required=True, help="a FuseGPT export folder (25%%)")
    ap.add_argument("--dense", default="smollm2-135m")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv")
    ap.add_argument("--quant-venv", type=Path, default=ROOT / ".venv-quant")
    ap.add_argument("--nsamples", default="128")
    ap.add_argument("--seqlen", default="256")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()

    fg, fq = str(args.venv / "bin" / "fusegpt"), str(args.quant_venv / "bin" / "fusegpt")
    sys.path.insert(0, str(ROOT / "src"))
    from fusegpt.models import converted_folder, resolve_source
    from fusegpt.quantize import checkpoint_bytes

    args.work.mkdir(parents=True, exist_ok=True)
    dense_folder = converted_folder(resolve_source(args.dense))
    rows = [("dense", dense_folder, None), ("dense + W4", None, ("dense", "gptq-w4a16")),
            ("dense + W8", None, ("dense", "gptq-w8a16")), ("FuseGPT 25%", args.fused.resolve(), None),
            ("FuseGPT 25% + W4", None, ("FuseGPT 25%", "gptq-w4a16")),
            ("FuseGPT 25% + W8", None, ("FuseGPT 25%", "gptq-w8a16"))]
    folders: dict[str, Path] = {}
    quant: dict[str, dict] = {}
    for name, folder, q in rows:
        slug = _slug(name)
        if q is not None:
            src, scheme = q
            folder = args.work / slug
            rep = args.work / f"{slug}.quantize.json"
            if not rep.is_file():
                run([fq, "quantize", str(folders[src]), "--scheme", scheme, "--out", str(folder), "--nsamples",
                     args.nsamples, "--seqlen", args.seqlen, "--threads", args.threads, "--json", str(rep),
                     "--overwrite"])
            quant[name] = json.loads(rep.read_text())
        folders[name] = folder
        ev = args.work / f"{slug}.eval.json"
        if not ev.is_file():
            run([fg, "eval", str(folder), "--threads", args.threads, "--json", str(ev)])
    bench = args.work / "bench.json"
    if not args.no_bench and not bench.is_file():
        run([fg, "bench", *[str(folders[n]) for n, _, _ in rows if n != "dense"], "--vs", str(folders["dense"]),
             "--decode-batches", "1", "--repeats", "3", "--prefill-tokens", "256", "--decode-tokens", "64",
             "--threads", args.threads, "--json", str(bench)])
    timing = {}
    if bench.is_file():
        for m in json.loads(bench.read_text())["models"]:
            timing[m["name"]] = m
    dense_bytes = checkpoint_bytes(folders["dense"])
    dense_params = json.loads((args.work / "dense.eval.json").read_text())["params"]
    out_rows = []
    for name, _, _ in rows:
        folder = folders[name]
        slug = _slug(name)
        ev = json.loads((args.work / f"{slug}.eval.json").read_text())
        cfg = json.loads((folder / "config.json").read_text())
        params = quant[name]["params"] if name in quant else ev["params"]
        b = checkpoint_bytes(folder)
        t = timing.get(str(folder), {})
        out_rows.append({
            "model": name, "folder": str(folder), "layers": cfg["num_hidden_layers"], "params": params,
            "bytes": b, "bytes_vs_dense_fp32": b / dense_bytes, "bytes_vs_dense_bf16": b / (2 * dense_params),
            "ppl": ev["perplexity"]["ppl"], "quantize_seconds": quant.get(name, {}).get("seconds"),
            "group_size": quant.get(name, {}).get("group_size"),
            "prefill_ms": t.get("prefill", {}).get("median_s", float("nan")) * 1e3 if t else None,
            "decode_tok_s_b1": t.get("decode", {}).get("b1", {}).get("tokens_per_second") if t else None,
        })
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": out_rows, "dense_bytes": dense_bytes, "dense_params": dense_params},
                                    indent=2) + "\n")
    print("| model | layers | params | bytes | vs dense fp32 | vs dense bf16 | WikiText-2 PPL | prefill ms | "
          "decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out_rows:
        print(f"| {r['model']} | {r['layers']} | {r['params']:,} | {r['bytes']:,} | {r['bytes_vs_dense_fp32']:.3f} | "
              f"{r['bytes_vs_dense_bf16']:.3f} | {r['ppl']:.3f} | {r['prefill_ms'] or float('nan'):.1f} | "
              f"{r['decode_tok_s_b1'] or float('nan'):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
