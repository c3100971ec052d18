"""Peak memory of `fusegpt compress --offload disk` on a ~1.1B-parameter Llama-shaped model (random weights).

The model (TinyLlama's shape: hidden 2048, MLP 5632, 22 blocks, 32 heads / 4 KV heads; SmolLM2's tokenizer and
vocabulary, tied embeddings) is built from a config, no download, and saved as sharded safetensors. Then each
requested compression runs in a fresh process under /usr/bin/time; its peak RSS is compared with the checkpoint's
fp32 size. Writes a JSON with every run.

    python benchmarks/offload_1b.py --work /tmp/offload1b --json docs/results/offload-1b.json \
        --runs "--group-size 7" "--group-size 1"
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)


def build(folder: Path) -> None:
    """Random-weight model saved one block at a time (never the whole fp32 model twice in memory)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fusegpt.models import load_model

    tok = load_model("smollm2-135m").tokenizer  # only for its tokenizer files
    cfg = LlamaConfig(vocab_size=len(tok), **CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="500MB")
    tok.save_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)  # loads back


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--runs", nargs="+", default=["--group-size 7"], help="extra compress flags, one string per run")
    ap.add_argument("--base", default="--remove 1 --offload disk --nsamples 8 --score-samples 4 --seqlen 128 "
                                      "--epochs 1 --compute-dtype fp32 --threads 2 --no-eval")
    args = ap.parse_args()
    model = args.work / "model-1b"
    if not (model / "config.json").is_file():
        build(model)
    fp32 = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    results = []
    for i, extra in enumerate(args.runs):
        out = args.work / f"out-{i}"
        cmd = [sys.executable, "-m", "fusegpt.cli", "compress", str(model), "--out", str(out), "--overwrite",
               *shlex.split(args.base), *shlex.split(extra)]
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        secs = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
        rep = json.loads((out / "fusegpt_report.json").read_text())
        row = {"command": "fusegpt compress MODEL-1B --out OUT " + args.base + " " + extra, "seconds": secs,
               "peak_rss_bytes": peak, "fp32_checkpoint_bytes": fp32, "peak_over_fp32": peak / fp32,
               "removed": rep["removed"], "memory": rep.get("memory"), "ppl": rep["evaluation"].get("wikitext2")}
        results.append(row)
        print(f"{extra}: peak RSS {peak / 2**30:.2f} GiB = {peak / fp32:.1%} of the fp32 checkpoint "
              f"({fp32 / 2**30:.2f} GiB), {secs:.0f} s", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": CONFIG, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
