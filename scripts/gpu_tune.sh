#!/usr/bin/env bash
# Calibration + search on the GPU machine (torch on CUDA), in two consecutive calls because the
# real SmolLM2 GGUF only fits the carry limit in halves (scripts/prepare_carry.sh --model-halves):
#   stage1 (carry [".carry", ".carry-a"]): build the CUDA engine, stash the first half;
#   stage2 (carry [".carry", ".carry-b"], while the machine is still warm): join the halves, check
#          the sha256, then `export --budget` with torch on CUDA, for a CPU and for a CUDA deployment.
set -uo pipefail
STAGE=${1:?random, stage1 or stage2}
source "$(dirname "$0")/gpu_setup.sh"
REAL=/root/smollm2.gguf
if [ "$STAGE" = random ]; then
  # one call: the engine built from scratch, its exported C++ runtime symbols, the numpy-first
  # load that crashed, and export --budget with torch on CUDA on the random-weight SmolLM2 shape
  LIB=/tmp/site/llama_cpp/lib
  echo "libggml-cuda exports of libstdc++ internals: $(nm -D --defined-only $LIB/libggml-cuda.so | grep -c -E 'St7codecvt|_M_insert')" | tee "$OUT/symbols.txt"
  timeout 60 python3 -c "import numpy, llama_cpp; llama_cpp.Llama('$MODEL', n_gpu_layers=99, n_ctx=512, verbose=False); print('ok')" > /tmp/I.log 2>&1; echo "numpy first: rc=$?" | tee -a "$OUT/symbols.txt"
  timeout 60 python3 -c "import torch, llama_cpp; llama_cpp.Llama('$MODEL', n_gpu_layers=99, n_ctx=512, verbose=False); print('ok')" > /tmp/T.log 2>&1; echo "torch first: rc=$?" | tee -a "$OUT/symbols.txt"
  /usr/bin/time -f "export --budget 5.0 storage on the random-weight SmolLM2 shape, torch cuda: %e s wall" \
    python3 -m kvtuner_edge export "$MODEL" --budget 5.0 --budget-unit storage --device cuda \
    -o /root/tuned-random.gguf --cache-dir /root/tune-cache-random --json > "$OUT/export_random.json" 2> /tmp/export_random.err
  tail -n 3 /tmp/export_random.err | tee -a "$OUT/timing.txt"
elif [ "$STAGE" = stage1 ]; then
  cp .carry-a/model.part /root/model.part.a
else
  [ -f /root/model.part.a ] || { echo "stage1's half is gone (the machine went cold): run stage1 again"; exit 2; }
  cat /root/model.part.a .carry-b/model.part > "$REAL"
  [ "$(sha256sum "$REAL" | cut -d' ' -f1)" = "$(cat .carry-b/model.sha256)" ] || { echo "sha256 mismatch"; exit 3; }
  for be in cpu cuda; do
    /usr/bin/time -f "export --budget 5.0 storage, backend $be, torch cuda: %e s wall" \
      python3 -m kvtuner_edge export "$REAL" --budget 5.0 --budget-unit storage --device cuda --backend $be \
      -o /root/tuned-$be.gguf --cache-dir /root/tune-cache-$be --json > "$OUT/export_$be.json" 2> /tmp/export_$be.err
    tail -n 1 /tmp/export_$be.err | tee -a "$OUT/timing.txt"
  done
  cp /root/tuned-cpu.pareto.png /root/tuned-cpu.layers.png "$OUT/" 2>/dev/null || true
  tail -n 5 /tmp/export_cpu.err /tmp/export_cuda.err
fi
