#!/usr/bin/env bash
# The prepared GPU check (issue 10): one command, at most ~8 minutes on one H200, one results folder.
#   benchmarks/gpu.sh OUT            on the device machine (the `run` tool sets $OUT; python with torch, and
#                                    transformers 5.x / gguf wheels carried as in benchmarks/device_compare.sh)
#   benchmarks/gpu.sh --tiny OUT     the same script on a CPU at toy shapes (tests/test_gpu_bench.py runs it)
# Parts: (a) one paper-preset removal step on a LLaMA-3.1-8B-shaped random model (bf16), projected to 25% in
# GPU-hours, with its peak GPU memory and fusegpt plan's prediction; (d) compress with the blocks streamed onto the
# device (--offload disk) next to the same run in device memory; (b) fusegpt bench 25% vs dense, fp32 / bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
TINY=()
if [ "${1:-}" = "--tiny" ]; then TINY=(--tiny); shift; fi
OUT=${1:-${OUT:?give an output folder}}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
if [ ${#TINY[@]} -eq 0 ]; then
  timeout 480 "$PY" benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
else
  "$PY" benchmarks/gpu_bench.py --out "$OUT" "${TINY[@]}" 2>&1 | tee "$OUT/gpu.log"
fi
