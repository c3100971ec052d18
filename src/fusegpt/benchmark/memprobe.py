"""The memory probe of ``fusegpt bench``, run in a fresh process (``python -m fusegpt.benchmark.memprobe``):

    python -m fusegpt.benchmark.memprobe MODEL PREFILL_TOKENS DECODE_TOKENS DECODE_BATCH THREADS DEVICE

It loads the model, resets the process's peak-RSS counter (Linux ``clear_refs``; loading has transient peaks that
dwarf inference for small models), runs one prefill and one batched greedy decode, and prints one JSON line:
RSS after imports (baseline), the model's resident size, the loading peak, the inference peak (whole process) and
that peak over the baseline; on CUDA also the device's peak allocated bytes.
"""

from __future__ import annotations

import gc
import json
import sys

import torch


def rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f if ":" in line)
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe(name: str, prefill: int, decode: int, batch: int, threads: int, device: str) -> dict:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    from fusegpt.models import load_model

    gc.collect()
    base, _ = rss()
    m = load_model(name, device=dev).model
    gc.collect()
    loaded, load_peak = rss()
    reset = reset_peak()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    g = torch.Generator().manual_seed(0)
    V = m.config.vocab_size
    with torch.no_grad():
        m(torch.randint(0, V, (1, prefill), generator=g).to(dev), use_cache=True)
        ids = torch.randint(0, V, (batch, 16), generator=g).to(dev)
        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode, min_new_tokens=decode,
                   do_sample=False, pad_token_id=0)
    _, peak = rss()
    out = {"baseline_rss_bytes": base, "model_rss_bytes": loaded - base, "load_peak_rss_bytes": load_peak,
           "peak_rss_bytes": peak if reset else None,
           "peak_rss_over_baseline_bytes": (peak - base) if reset else None, "hwm_reset": reset}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def main(argv: list[str] | None = None) -> None:
    a = sys.argv[1:] if argv is None else argv
    print(json.dumps(probe(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5])))


if __name__ == "__main__":
    main()
