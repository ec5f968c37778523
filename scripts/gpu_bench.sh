#!/usr/bin/env bash
# Diagonal batching on one GPU, as in the paper's table (design §7): a LLaMA-3.2-1B-shaped
# ARMT (random weights; latency needs no training), segment 1024 + 128 memory tokens,
# bf16, batch 1. One script for a whole GPU session, everything written under $OUT:
#   1. gpu_exact.json, gpu_steps.json, gpu_profile.txt (scripts/gpu_checks.py):
#      diagonal vs sequential in fp32 (<= 1e-5) and bf16 (<= 2e-2 on logits) on 3.5 segments,
#      per-step records of one 131K diagonal run, a torch.profiler table at 16K;
#   2. gpu_llama1b_131k.json: the target point, 131,072 tokens, measured FIRST so a run cut
#      short still has it; then gpu_llama1b_short.json: 4K..64K;
#   3. gpu_llama1b.json / .csv: both joined (scripts/merge_reports.py), and the table.
# Modes full / sequential / sequential_grouped / diagonal / ideal run interleaved, warmup 1,
# repeats 3. Needs only torch + transformers (a bare CUDA image has them; plotly is not
# needed — make the HTML chart afterwards with scripts/merge_reports.py ... --html).
# Estimated 3-4 minutes on an H200, most of it building the 1.2B-parameter model twice and
# full attention at 131K.
#
#   OUT=bench-out bash scripts/gpu_bench.sh
#   OUT=/tmp/dry PRESET=tiny DEVICE=cpu LONG=2048 SHORT=256,1024 PROFILE=256 bash scripts/gpu_bench.sh  # CPU dry run
#
# On the device machine (run from the repository root; $OUT is set there):
#   PYTHONUNBUFFERED=1 bash scripts/gpu_bench.sh 2>&1 | tee $OUT/gpu_log.txt
# then here: python scripts/merge_reports.py data/bench/gpu_llama1b.json --html data/bench/gpu_llama1b.html
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-bench-out}
PRESET=${PRESET:-llama_1b}
DEVICE=${DEVICE:-cuda}
LONG=${LONG:-131072}
SHORT=${SHORT:-4096,8192,16384,32768,65536}
PROFILE=${PROFILE:-16384}   # tokens of the torch.profiler run
NAME=${NAME:-gpu_llama1b}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_HUB_DISABLE_PROGRESS_BARS=1 KINETO_LOG_LEVEL=6
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

status=0
echo "== 1. exactness, per-step records, profiler: $PRESET on $DEVICE"
"$PY" scripts/gpu_checks.py "$OUT" --preset "$PRESET" --device "$DEVICE" \
    --steps-tokens "$LONG" --profile-tokens "$PROFILE" \
    || status=$?   # an exactness failure is reported, and the benchmark still runs

bench() {  # bench LENGTHS FILE
    "$PY" -m diaglab.bench --preset "$PRESET" --device "$DEVICE" --dtype bfloat16 --lengths "$1" \
        --warmup 1 --repeats 3 --no-progress --json "$2"
}
echo "== 2. latency and peak memory, bf16: $LONG tokens first, then $SHORT"
bench "$LONG" "$OUT/${NAME}_131k.json"
bench "$SHORT" "$OUT/${NAME}_short.json"

echo "== 3. all points"
"$PY" scripts/merge_reports.py "$OUT/${NAME}_short.json" "$OUT/${NAME}_131k.json" \
    --json "$OUT/$NAME.json" --csv "$OUT/$NAME.csv"
exit $status
