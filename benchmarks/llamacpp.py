"""GGUF files through the real client, llama.cpp (llama-cpp-python), next to transformers' GGUF path.

llama-cpp-python has no wheel for these machines; its source distribution builds with pip (cmake + a C++ compiler,
minutes on 2 cores). This script builds it once into a cache folder (``--cache``, default
``~/.cache/fusegpt/llama-cpp``; not part of the package or of ``make test``), then for every GGUF file given:

- loads it with llama.cpp (``Llama(model_path=..., logits_all=True)``: it must load);
- WikiText-2 test perplexity on exactly the windows ``fusegpt eval`` scores (the token ids come from the
  checkpoint's HF tokenizer, ``perplexity_windows``, and are fed to llama.cpp as ids), and the same windows through
  transformers' GGUF loader, so the two clients are compared on the same tokens;
- prefill time of one window and greedy decode tokens per second (``--gen`` tokens, median of ``--repeats``);
- a short greedy generation as text (it must generate).

    python benchmarks/llamacpp.py --json docs/results/gguf/llamacpp.json --threads 2 \\
        --tokenizer runs/fuse25 A.gguf B.gguf ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VERSION = "0.3.36"


def ensure_llama_cpp(cache: Path) -> None:
    target = cache / f"llama-cpp-python-{VERSION}"
    if not (target / "llama_cpp").is_dir():
        print(f"building llama-cpp-python {VERSION} into {target} (minutes)...", flush=True)
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        tmp = target.with_name(target.name + ".tmp")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--target", str(tmp),
                        f"llama-cpp-python=={VERSION}"], check=True, env=env)
        tmp.rename(target)
    sys.path.insert(0, str(target))


def nll_llama(llm, windows) -> tuple[float, int]:
    import numpy as np

    total, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return total, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="+", type=Path)
    ap.add_argument("--tokenizer", type=Path, required=True, help="an HF folder with the models' tokenizer")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fusegpt" / "llama-cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=128, help="as fusegpt eval (default 128)")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    ensure_llama_cpp(args.cache)
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusegpt.evaluate.perplexity import nll_sum, perplexity_windows

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    windows = perplexity_windows(tok, "wikitext2", args.seqlen, args.max_windows)
    rows = []
    for path in args.gguf:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(args.seqlen, 512), logits_all=True,
                              n_threads=args.threads, n_batch=args.seqlen, verbose=False)
        t = time.perf_counter()
        total, count = nll_llama(llm, windows)
        ppl_secs = time.perf_counter() - t
        prefill, decode = [], []
        prompt = windows[0].tolist()
        for _ in range(args.repeats):
            llm.reset()
            t = time.perf_counter()
            llm.eval(prompt)
            prefill.append(time.perf_counter() - t)
            t = time.perf_counter()
            n = 0
            for _ in llm.generate(prompt[:16], temp=0.0, reset=True):
                n += 1
                if n >= args.gen:
                    break
            decode.append(n / (time.perf_counter() - t))
        text = llm.create_completion("The capital of France is", max_tokens=16, temperature=0.0)["choices"][0]["text"]
        del llm
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        t = time.perf_counter()
        hf_total, hf_count = nll_sum(hf, windows, desc=None)
        hf_secs = time.perf_counter() - t
        del hf
        row = {"gguf": str(path), "bytes": path.stat().st_size, "windows": list(windows.shape),
               "llama_cpp_ppl": float(torch.exp(torch.tensor(total / count))), "llama_cpp_ppl_seconds": ppl_secs,
               "transformers_gguf_ppl": float(torch.exp(torch.tensor(hf_total / hf_count))),
               "transformers_ppl_seconds": hf_secs,
               "prefill_ms_median": 1000 * statistics.median(prefill), "decode_tok_s_median": statistics.median(decode),
               "generation": text}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"llama_cpp_python": VERSION, "threads": args.threads, "rows": rows}, indent=2)
                         + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
