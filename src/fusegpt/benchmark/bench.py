"""``bench_models``: the same measurements on several models, interleaved, with speedups against a reference."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from ..device import parse_dtype
from .macs import MacsReport, model_macs
from .timing import interleaved, time_decode, time_prefill

log = logging.getLogger(__name__)

__all__ = ["BenchConfig", "ModelBench", "BenchReport", "bench_models", "memory_probe"]


@dataclass
class BenchConfig:
    prefill_tokens: int = 512
    decode_tokens: int = 128
    prompt_tokens: int = 16
    decode_batches: tuple[int, ...] = (1, 8)
    repeats: int = 5
    seed: int = 0
    dtype: str | None = None  # autocast dtype for the timed regions (None = the weights' dtype)
    memory: bool = True  # peak RSS of a fresh process per model (models given by name/path only)

    def validate(self) -> "BenchConfig":
        if self.prefill_tokens < 1 or self.decode_tokens < 1 or self.prompt_tokens < 1 or self.repeats < 1:
            raise ValueError("token counts and --repeats must be >= 1")
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise ValueError("--decode-batches must list batch sizes >= 1")
        return self


@dataclass
class ModelBench:
    name: str
    layers: int
    params: int
    param_bytes: int
    macs_prefill: MacsReport
    macs_decode: MacsReport
    prefill: dict[str, Any]
    decode: dict[str, dict[str, Any]]
    peak_rss_bytes: int | None = None  # inference peak of the whole process (see memory_probe)
    memory: dict[str, Any] | None = None


@dataclass
class BenchReport:
    config: dict[str, Any]
    device: str
    threads: int
    models: list[ModelBench]
    reference: str | None = None
    comparisons: list[dict[str, Any]] = field(default_factory=list)


def memory_probe(name: str, cfg: BenchConfig, device: str = "cpu") -> dict[str, Any] | None:
    """Memory of a fresh process that loads ``name`` and runs one prefill and one batched decode.

    Loading has transient peaks (checkpoint reading, GGUF dequantisation) that dwarf inference for small models,
    so the process's peak-RSS counter is reset after loading (Linux ``clear_refs``) and the figures separate:
    RSS after imports (baseline), the model's resident size, the inference peak (model + activations + KV cache,
    whole process) and that peak over the baseline; on CUDA also the device's peak allocated bytes.
    """
    args = [sys.executable, "-m", "fusegpt.benchmark.memprobe", name, str(cfg.prefill_tokens), str(cfg.decode_tokens),
            str(max(cfg.decode_batches)), str(torch.get_num_threads()), device]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        log.warning("memory probe of %s failed: %s", name, proc.stderr[-500:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def bench_models(models: dict[str, Any], cfg: BenchConfig, *, reference: str | None = None,
                 names_for_memory: dict[str, str] | None = None) -> BenchReport:
    """Measure every model (name -> loaded causal LM). Speedups are reference_time / model_time."""
    cfg.validate()
    dtype = parse_dtype(cfg.dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = min(m.config.vocab_size for m in models.values())
    prefill_ids = torch.randint(0, vocab, (1, cfg.prefill_tokens), generator=g)
    prompts = {b: torch.randint(0, vocab, (b, cfg.prompt_tokens), generator=g) for b in cfg.decode_batches}
    for m in models.values():
        m.eval()
    log.info("timing prefill (%d tokens), %d repeats, interleaved", cfg.prefill_tokens, cfg.repeats)
    prefill = interleaved([(n, time_prefill(m, prefill_ids, dtype), cfg.prefill_tokens) for n, m in models.items()],
                          cfg.repeats)
    decode: dict[int, list] = {}
    for b in cfg.decode_batches:
        log.info("timing decode: batch %d, %d new tokens, %d repeats, interleaved", b, cfg.decode_tokens, cfg.repeats)
        decode[b] = interleaved(
            [(n, time_decode(m, prompts[b], cfg.decode_tokens, dtype), b * cfg.decode_tokens)
             for n, m in models.items()],
            cfg.repeats,
        )
    decode_ctx = cfg.prompt_tokens + cfg.decode_tokens // 2
    rows = []
    for i, (name, m) in enumerate(models.items()):
        params = {id(p): p for p in m.parameters()}
        rows.append(ModelBench(
            name=name, layers=m.config.num_hidden_layers, params=sum(p.numel() for p in params.values()),
            param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
            macs_prefill=model_macs(m, cfg.prefill_tokens), macs_decode=model_macs(m, decode_ctx),
            prefill=prefill[i].to_dict(), decode={f"b{b}": decode[b][i].to_dict() for b in cfg.decode_batches},
        ))
    if cfg.memory and names_for_memory:
        for row in rows:
            if row.name in names_for_memory:
                log.info("memory probe: %s", row.name)
                dev = str(next(iter(models.values())).device)
                row.memory = memory_probe(names_for_memory[row.name], cfg, dev)
                row.peak_rss_bytes = (row.memory or {}).get("peak_rss_bytes")
    report = BenchReport(config=cfg.__dict__.copy(), device=str(next(iter(models.values())).device),
                         threads=torch.get_num_threads(), models=rows, reference=reference)
    if reference is not None:
        ref = next(r for r in rows if r.name == reference)
        for r in rows:
            if r.name == reference:
                continue
            measured = {"prefill": _ratio(ref.prefill["median_s"], r.prefill["median_s"])}
            ideal = {"prefill": _ratio(ref.macs_prefill.total, r.macs_prefill.total)}
            for b in cfg.decode_batches:
                k = f"decode_b{b}"
                measured[k] = _ratio(r.decode[f"b{b}"]["tokens_per_second"], ref.decode[f"b{b}"]["tokens_per_second"])
                ideal[k] = _ratio(ref.macs_decode.total, r.macs_decode.total)
            cmp = {
                "model": r.name, "vs": reference, "speedup_measured": measured, "speedup_ideal": ideal,
                "measured_over_ideal": {k: _ratio(measured[k], ideal[k]) for k in measured},
                "param_bytes_ratio": _ratio(r.param_bytes, ref.param_bytes),
            }
            for key in ("model_rss_bytes", "peak_rss_over_baseline_bytes", "peak_device_bytes"):
                a, b = (r.memory or {}).get(key), (ref.memory or {}).get(key)
                if a and b:
                    cmp[f"{key.replace('_bytes', '')}_ratio"] = a / b
            report.comparisons.append(cmp)
    return report
