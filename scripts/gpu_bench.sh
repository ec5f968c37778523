#!/usr/bin/env bash
# Diagonal batching on one GPU, as in the paper's Table (SPEC §7): a LLaMA-3.2-1B-shaped
# ARMT (random weights; latency needs no training), segment 1024 + 128 memory tokens,
# bf16, batch 1, 4K..128K tokens; modes full / sequential / sequential_grouped /
# diagonal / ideal interleaved, warmup 1, repeats 3. First a short bf16 exactness check
# (diagonal vs sequential on 3.5 segments; logits within 2e-2, as tests/test_diagonal.py).
# About 3 minutes on an H200; budget 8.
#
#   bash scripts/gpu_bench.sh                      # writes $OUT/gpu_llama1b.{json,csv,html}
#   OUT=bench-out PRESET=tiny DEVICE=cpu LENGTHS=256,1024 bash scripts/gpu_bench.sh   # CPU dry run
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench-out}
PRESET=${PRESET:-llama_1b}
DEVICE=${DEVICE:-cuda}
LENGTHS=${LENGTHS:-4096,8192,16384,32768,65536,131072}
NAME=${NAME:-gpu_llama1b}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 KINETO_LOG_LEVEL=6
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

echo "== exactness: diagonal vs sequential, bf16, $PRESET on $DEVICE"
PRESET=$PRESET DEVICE=$DEVICE "$PY" - <<'EOF'
import os
import torch
import diaglab

model = diaglab.randomize_memory_(diaglab.from_preset(os.environ["PRESET"], dtype=torch.bfloat16,
                                                      device=os.environ["DEVICE"])).eval()
n = model.config.segment_size
ids = torch.randint(0, model.base.config.vocab_size, (1, 3 * n + n // 2),
                    generator=torch.Generator().manual_seed(0)).to(model.device)   # (1, N): 3.5 segments


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


with torch.no_grad():
    seq, diag = model(ids), diaglab.DiagonalExecutor(model)(ids)
errors = {"logits": rel(diag.logits, seq.logits),
          "W_mem (worst layer)": max(rel(d, s) for d, s in zip(diag.state.W_mem, seq.state.W_mem)),
          "z (worst layer)": max(rel(d, s) for d, s in zip(diag.state.z, seq.state.z))}
for name, err in errors.items():
    print(f"  relative error {name}: {err:.2e}")
assert errors["logits"] <= 2e-2, errors
assert torch.equal(diag.state.is_first, seq.state.is_first)
print("  ok")
EOF

echo "== latency and peak memory, $PRESET, bf16, tokens $LENGTHS"
"$PY" -m diaglab.bench --preset "$PRESET" --device "$DEVICE" --dtype bfloat16 --lengths "$LENGTHS" \
    --warmup 1 --repeats 3 --json "$OUT/$NAME.json" --csv "$OUT/$NAME.csv" --html "$OUT/$NAME.html"
