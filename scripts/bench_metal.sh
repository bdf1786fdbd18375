#!/usr/bin/env bash
# Apple Silicon: build the patched engine with Metal and run `kvtuner-edge bench` (NOT run by the
# project so far: no Mac here; see docs/results/throughput.md). Usage, from the repository root:
#   bash scripts/bench_metal.sh [MODEL.gguf]
# Without a model it writes a random-weight GGUF of Llama-3-8B's shape (4.3 GiB; speed does not depend
# on weight values) and a KVTuner mix resampled to it with Metal's types (scripts/make_bench_configs.py:
# Metal's flash attention has no q3_kv/q2_kv kernels yet and needs one type for K and V in a layer, so
# those layers become q4_0 and V takes K's type). Results:
# bench-metal/{bench.json,bench.txt,bench.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -s)" = Darwin ] || { echo "this driver is for macOS (Metal); on Linux use scripts/gpu_bench.sh or kvtuner-edge bench"; exit 2; }
PY=${PY:-python3}
OUT=${OUT:-bench-metal}; mkdir -p "$OUT"
[ -x .venv/bin/python ] || $PY -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
t0=$(date +%s)
.venv/bin/python native/build.py --variant metal
echo "Metal engine: $(( $(date +%s) - t0 )) s" | tee "$OUT/build.txt"
.venv/bin/python -m pip install -q -e .
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL=$OUT/llama3-8b-random.gguf
  [ -f "$MODEL" ] || .venv/bin/python -m kvtuner_edge.random_model --shape llama3-8b -o "$MODEL"
fi
N_LAYER=$(.venv/bin/python -c "from kvtuner_edge.gguf_io import model_info; print(model_info('$MODEL').n_layer)")
.venv/bin/python scripts/make_bench_configs.py --layers "$N_LAYER" --backend metal --out-dir "$OUT/cfg" > /dev/null
# unified memory: keep the batches and the budget modest
.venv/bin/python -m kvtuner_edge bench "$MODEL" --configs "$OUT/cfg/mix325.json" --batch 1,4,8,16 \
    --depth 4096 --kv-budget "${KV_BUDGET:-4GiB}" --out "$OUT/bench.json" --plot "$OUT/bench.png" | tee "$OUT/bench.txt"
