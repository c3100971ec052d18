"""The prepared GPU benchmark of issue 10 (run by benchmarks/gpu.sh; ``--tiny`` runs it on a CPU at toy shapes).

(a) The `paper` preset on a LLaMA-3.1-8B-shaped model with random weights (config only, no download; bf16 weights,
    bf16 compute): one removal step with its MI scoring, timed per phase on a calibration budget cut to fit the
    time box (``--windows`` of the paper's 1024, one epoch of its 20), and projected to the preset's budget
    phase by phase (scoring keeps its S windows; group input and teacher scale with N; training with N x epochs),
    then to 25% (8 of 32 blocks) in one-shot and iterative mode, in GPU-hours next to the paper's 10.8 / 5.4
    (LLaMA-3.1-8B on 8 x A100). Peak GPU memory of the step.
(b) `fusegpt bench` of a 25% SmolLM2 (the demo's 8 blocks dropped: the same shapes as FuseGPT 25%) vs dense, in
    fp32 and with bf16 autocast, with bounded tokens and repeats.
(c) `fusegpt plan`'s prediction for (a), next to the measurement.
(d) `fusegpt compress --offload disk` on the device (blocks streamed onto it one at a time, the path of a model
    larger than the device) next to the same run in device memory: the same blocks and PPL (a failure is recorded
    with its log, the other parts still run).

Everything goes to ``--out`` (results.json, one log per part). ``--tiny``: a 4-block Llama of hidden size 64 and a
tiny dropped model instead of SmolLM2, on the CPU, in seconds (tests/test_gpu_bench.py runs it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
DEMO_REMOVED = [14, 13, 12, 17, 7, 5, 3, 4]  # the blocks `make demo` removes (docs/RESULTS.md)
PAPER_GPU_HOURS = {"iterative": 10.8, "oneshot": 5.4}


def write_model_config(folder: Path, shape: dict) -> None:
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**shape).save_pretrained(folder)


def part_a(out: Path, device: str, tiny: bool, windows: int) -> dict:
    """One removal step of the paper preset on the 8B shape, measured and projected."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fusegpt.api import compress
    from fusegpt.config import CompressConfig
    from fusegpt.plan import plan_run

    shape = TINY if tiny else LLAMA31_8B
    folder = out / "model-config"
    write_model_config(folder, shape)
    full = CompressConfig.from_preset("paper", device=device, compute_dtype="fp32" if tiny else "bf16")
    if tiny:
        full = CompressConfig.from_dict({**full.to_dict(), "nsamples": 16, "score_samples": 4, "seqlen": 32,
                                         "batch_size": 4, "epochs": 2, "group_size": 2})
    run = CompressConfig.from_dict({**full.to_dict(), "nsamples": min(windows, full.nsamples), "epochs": 1,
                                    "remove": 1, "sparsity": None})
    plan_full = plan_run(str(folder), CompressConfig.from_dict({**full.to_dict(), "sparsity": 0.25,
                                                                "remove": None}), device=device)
    plan_run_cfg = plan_run(str(folder), run, device=device)
    dev = torch.device(device)
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape),
                                                 dtype=torch.float32 if tiny else torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, shape["vocab_size"], (run.nsamples, run.seqlen), generator=g)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    rep = compress(model, run, calib_ids=calib)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rep.peak_memory_bytes
    phases = dict(rep.steps[0].seconds)
    # projection to the full preset: scoring (S windows) as measured; N-proportional phases by N; training by
    # N x epochs (phases as StepReport records them)
    scale_n = full.nsamples / run.nsamples
    scale_train = scale_n * full.epochs / run.epochs
    step_full = {k: v * (scale_train if k == "train" else 1.0 if k == "scoring" else scale_n) for k, v in
                 phases.items()}
    L0 = shape["num_hidden_layers"]
    k = max(1, round(0.25 * L0))
    nonscore = sum(v for key, v in step_full.items() if key != "scoring")
    # iterative re-scores a shallower model each step: the sweep costs L(L-1)/2 + L block forwards
    sweep = lambda L: L * (L - 1) / 2 + L  # noqa: E731
    scoring_iter = sum(step_full.get("scoring", 0.0) * sweep(L0 - s) / sweep(L0) for s in range(k))
    total = {"oneshot": step_full.get("scoring", 0.0) + k * nonscore, "iterative": scoring_iter + k * nonscore}
    return {
        "shape": shape, "device": device, "run_config": run.to_dict(), "full_config": full.to_dict(),
        "measured_step_seconds": seconds, "measured_phases": phases, "peak_device_bytes": peak,
        "projected_step_phases_full_budget": step_full, "removals_for_25pct": k,
        "projected_gpu_hours": {m: v / 3600 for m, v in total.items()}, "paper_gpu_hours": PAPER_GPU_HOURS,
        "plan_for_the_measured_step": {"seconds": plan_run_cfg.seconds_total, "phases": plan_run_cfg.phases,
                                       "peak_bytes": plan_run_cfg.peak_bytes, "memory": plan_run_cfg.memory},
        "plan_for_25pct_full_budget": {"seconds": plan_full.seconds_total, "hours": plan_full.seconds_total / 3600,
                                       "mode": full.mode},
    }


def tiny_dense(out: Path) -> Path:
    """An 8-block toy Llama with a word-level tokenizer in ``out/tiny-dense`` (made once)."""
    dense = out / "tiny-dense"
    if (dense / "config.json").is_file():
        return dense
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 8})).save_pretrained(dense)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, TINY["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(dense)
    return dense


def part_d(out: Path, device: str, tiny: bool) -> dict:
    """compress with --offload disk on the device (the blocks streamed onto it one at a time: the path a model
    larger than the device takes) next to the same run holding the model there; a failure is recorded, not raised,
    so the other parts' results are kept."""
    model = str(tiny_dense(out)) if tiny else "smollm2-135m"
    args = ["--remove", "1", "--nsamples", "8", "--score-samples", "4", "--seqlen", "32" if tiny else "128",
            "--batch-size", "4", "--epochs", "1", "--final-epochs", "0", "--compute-dtype", "fp32",
            "--device", device, "--overwrite"]
    runs = {}
    for off in ("cpu", "disk"):
        folder = out / f"stream-{off}"
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "fusegpt.cli", "compress", model, *args, "--offload", off,
                              "--out", str(folder)], capture_output=True, text=True, timeout=None if tiny else 240)
        (out / f"stream-{off}.log").write_text(res.stdout + res.stderr)
        run = {"rc": res.returncode, "wall_seconds": time.perf_counter() - t}
        if res.returncode == 0:
            rep = json.loads((folder / "fusegpt_report.json").read_text())
            run.update(removed=rep["removed"], ppl=rep["evaluation"]["wikitext2"]["ppl"], seconds=rep["seconds"],
                       peak_device_bytes=rep["peak_memory_bytes"])
        else:
            run["error_tail"] = (res.stdout + res.stderr)[-2000:]
        runs[off] = run
    ok = all(r["rc"] == 0 for r in runs.values())
    return {"runs": runs, "same_blocks": ok and runs["cpu"]["removed"] == runs["disk"]["removed"],
            "ppl_relative_difference": (abs(runs["disk"]["ppl"] / runs["cpu"]["ppl"] - 1) if ok else None)}


def part_b(out: Path, device: str, tiny: bool) -> dict:
    """fusegpt bench: 25% (dropped) vs dense, fp32 and bf16 autocast, bounded."""
    py = [sys.executable, "-m", "fusegpt.cli"]
    if tiny:
        dense = tiny_dense(out)
        drop = [1, 3]
        bench = ["--prefill-tokens", "32", "--decode-tokens", "8", "--repeats", "2", "--decode-batches", "1",
                 "--no-memory"]
    else:
        dense = "smollm2-135m"
        drop = DEMO_REMOVED
        bench = ["--prefill-tokens", "512", "--decode-tokens", "64", "--repeats", "3", "--decode-batches", "1,8"]
    dropped = out / "drop25"
    subprocess.run([*py, "drop", str(dense), "--blocks", ",".join(map(str, drop)), "--out", str(dropped),
                    "--overwrite"], check=True)
    res = {}
    for dtype in ("fp32", "bf16"):
        j = out / f"bench-{dtype}.json"
        extra = [] if dtype == "fp32" else ["--dtype", "bf16"]
        subprocess.run([*py, "bench", str(dropped), "--vs", str(dense), "--device", device, *bench, *extra,
                        "--json", str(j)], check=True, timeout=None if tiny else 240)
        data = json.loads(j.read_text())
        res[dtype] = {"speedup_measured": data.get("speedup_measured"), "speedup_ideal": data.get("speedup_ideal"),
                      "models": [{"name": m["name"], "prefill_ms": m["prefill"]["median_s"] * 1e3,
                                  "decode": m["decode"]} for m in data["models"]]}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU, toy shapes (the test suite runs this)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--windows", type=int, default=64, help="calibration windows of the measured step (a)")
    ap.add_argument("--parts", default="a,d,b",
                    help="which parts to run (a: 8B step + plan; d: streamed compress; b: bench)")
    args = ap.parse_args()
    device = args.device or ("cpu" if args.tiny else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"tiny": args.tiny, "device": device}
    t0 = time.perf_counter()
    parts = set(args.parts.split(","))
    if "a" in parts:
        results["a_paper_step_8b"] = part_a(args.out, device, args.tiny, args.windows)
        print(json.dumps({"a": results["a_paper_step_8b"]["projected_gpu_hours"]}), flush=True)
    if "d" in parts:
        results["d_streamed_compress"] = part_d(args.out, device, args.tiny)
        print(json.dumps({"d": {k: v for k, v in results["d_streamed_compress"].items() if k != "runs"}}), flush=True)
    if "b" in parts:
        results["b_bench_25pct"] = part_b(args.out, device, args.tiny)
    results["seconds"] = time.perf_counter() - t0
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'results.json'} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
