#!/usr/bin/env bash
# Decode/prefill throughput of mixed KV caches on the GPU machine (issue 6), in consecutive calls of the
# device tool (each <= 10 min; the machine keeps /root between calls only while it stays warm):
#   stage1: build the CUDA engine from the trimmed source (+ patches/) with flash-attention vector
#           kernels for the K-V pairs the benchmark uses (faster than all 121); meanwhile write the
#           random-weight GGUF of Llama-3-8B's shape and export KVTuner's 3.25-bit mix into it.
#   stage2: `kvtuner-edge bench` on that file: f16, q8_0, q4_0, q8_0/q4_0, mix325 (the file's own)
#           and mix400 at 1/16/32/64 sequences x depth 4096 and 8192, and at a 16 GiB KV budget.
#   stage3: the same with KVTUNER_CUDA_FA_GQA=0 (the stock kernels, same build); test-backend-ops
#           (patched source, against the built engine): the FLASH_ATTN_EXT decode cases CUDA vs CPU,
#           including the packed-GQA ones.
# Carry [".carry"] (scripts/prepare_carry.sh). Results land in $OUT.
set -uo pipefail
STAGE=${1:?stage1, stage2 or stage3}
source "$(dirname "$0")/gpu_env.sh"
M8=/root/llama3-8b-random.gguf
CFG=/root/bench-cfg
if [ "$STAGE" = stage1 ]; then
  PAIRS=$(python3 scripts/make_bench_configs.py --layers 32 --backend cuda --out-dir "$CFG" 2> "$OUT/configs.txt")
  cat "$OUT/configs.txt"
  FA="q8_0-q8_0,q4_0-q4_0,q8_0-q4_0,$PAIRS"
  echo "flash-attention vector kernels: f16-f16,$FA" | tee -a "$OUT/gpu.txt"
  ( python3 -m kvtuner_edge.random_model --shape llama3-8b -o "$M8" > /tmp/m8.log 2>&1 &&
    python3 -m kvtuner_edge export "$M8" --config "$CFG/mix325.json" -o /root/llama3-8b-random.mix325.gguf > /tmp/export.log 2>&1
    echo "model rc=$?" >> /tmp/m8.log ) &
  t0=$(date +%s)
  python3 native/build.py --variant cuda --cuda-arch "${CUDA_ARCH:-90}" --source .carry/llama-src.tar.xz \
      --fa-quants "$FA" --no-build-isolation --no-install --jobs "$(nproc)" --print-wheel > "$OUT/build.log" 2>&1 \
      || { tail -n 30 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s on $(nproc) cores -> $(tail -n 1 "$OUT/build.log")" | tee -a "$OUT/gpu.txt"
  tail -n 1 "$OUT/build.log" > /root/wheel.txt
  wait
  cat /tmp/m8.log; ls -la /root/*.gguf
  exit 0
fi
[ -f /root/wheel.txt ] || { echo "stage1's build is gone (the machine went cold): run stage1 again"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade "$(cat /root/wheel.txt)"
if [ "$STAGE" = stage2 ]; then
  F=/root/llama3-8b-random.mix325.gguf
  python3 -m kvtuner_edge bench "$F" --configs "file,$CFG/mix400.json,q8_0/q4_0" --batch 1,16,32,64 \
      --depth 4096,8192 --kv-budget 16GiB --out "$OUT/bench_gqa.json" --plot "$OUT/bench_gqa.png" > "$OUT/bench_gqa.txt" 2> /tmp/bench_gqa.err
  echo "bench (ours) rc=$?"; cat "$OUT/bench_gqa.txt"; tail -n 3 /tmp/bench_gqa.err
  # NOROT=1: what the Hadamard rotation costs (LLAMA_ATTN_ROT_DISABLE=1: no rotation; not a deployable
  # setting, the search models the rotated cache)
  [ "${NOROT:-0}" = 1 ] && LLAMA_ATTN_ROT_DISABLE=1 python3 -m kvtuner_edge bench "$F" --configs "file" --batch 1,64 \
      --depth 4096 --out "$OUT/bench_norot.json" > "$OUT/bench_norot.txt" 2> /tmp/bench_norot.err
  [ "${NOROT:-0}" = 1 ] && { echo "bench (no rotation) rc=$?"; cat "$OUT/bench_norot.txt"; }
  exit 0
fi
# stage3: the stock kernels (same build), then test-backend-ops against the built engine
if [ "${SKIP_STOCK:-0}" != 1 ]; then
  KVTUNER_CUDA_FA_GQA=0 python3 -m kvtuner_edge bench /root/llama3-8b-random.mix325.gguf --configs "file" \
      --batch 1,16,32,64 --depth 4096,8192 --out "$OUT/bench_stock.json" > "$OUT/bench_stock.txt" 2> /tmp/bench_stock.err
  echo "bench (stock kernels) rc=$?"; cat "$OUT/bench_stock.txt"; tail -n 3 /tmp/bench_stock.err
fi
source scripts/gpu_tbo.sh
build_test_backend_ops || exit 4
timeout 300 /root/test-backend-ops -o FLASH_ATTN_EXT -b CUDA0 -p "nb=1," > "$OUT/tbo_fa_decode.log" 2>&1
echo "FLASH_ATTN_EXT nb=1 rc=$?: $(grep -c ' OK' "$OUT/tbo_fa_decode.log") OK, $(grep -c 'FAIL' "$OUT/tbo_fa_decode.log") FAIL; $(grep -E 'tests passed' "$OUT/tbo_fa_decode.log" | tail -n 1)" | tee -a "$OUT/tbo.txt"
grep FAIL "$OUT/tbo_fa_decode.log" | head -n 5
grep -c "nr23=\[[248],[13]\],kv=1024,nb=1" "$OUT/tbo_fa_decode.log" | sed 's/^/packed-GQA decode cases run: /' | tee -a "$OUT/tbo.txt"
