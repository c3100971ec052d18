"""Efficiency measurement: latency, throughput, memory, analytic MACs, measured vs ideal speedup."""

from .bench import BenchConfig, BenchReport, ModelBench, bench_models
from .macs import MacsReport, model_macs

__all__ = ["BenchConfig", "BenchReport", "MacsReport", "ModelBench", "bench_models", "model_macs"]
