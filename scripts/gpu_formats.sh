#!/usr/bin/env bash
# The low-bit cache formats (q3_kv, q2_kv) on the GPU machine, in two consecutive calls (the real
# SmolLM2 GGUF only fits the carry limit in halves: scripts/prepare_carry.sh --model-halves, which
# also puts wikitext-2 test into .carry-b/):
#   stage1 (carry [".carry", ".carry-a"]): build the CUDA engine, stash the first half.
#   stage2 (carry [".carry", ".carry-b"], while the machine is still warm):
#     - ggml's own test-backend-ops (patched to include the new types), compiled against the built
#       engine: SET_ROWS (CUDA quantiser vs CPU) and FLASH_ATTN_EXT (CUDA vs CPU, random data);
#     - scripts/gpu_engine_check.py on the random-weight model (prefill and one-token decode with the
#       new formats, CUDA vs CPU logits);
#     - scripts/gpu_decode_compare.py: token-by-token CUDA vs CPU logits per cache type on wikitext-2;
#     - scripts/bench_formats.py with the cache on the GPU: each format's KLD on wikitext-2 (real data);
#     - `tune` for --budget-unit storage and nominal with torch on CUDA (81 K/V pairs), whose cache
#       (in $OUT/tune-cache) scripts/bench_search.py --calib-file then reuses on the CPU machine.
set -uo pipefail
STAGE=${1:?stage1 or stage2}
source "$(dirname "$0")/gpu_setup.sh"
REAL=/root/smollm2.gguf
if [ "$STAGE" = stage1 ]; then
  cp .carry-a/model.part /root/model.part.a
  echo "stage1 done"
  exit 0
fi
[ -f /root/model.part.a ] || { echo "stage1's half is gone (the machine went cold): run stage1 again"; exit 2; }
cat /root/model.part.a .carry-b/model.part > "$REAL"
[ "$(sha256sum "$REAL" | cut -d' ' -f1)" = "$(cat .carry-b/model.sha256)" ] || { echo "sha256 mismatch"; exit 3; }
mkdir -p shared/data/wikitext-2 && cp .carry-b/wikitext-2-test.txt shared/data/wikitext-2/test.txt
cp .carry-b/wikitext-2-valid.txt shared/data/wikitext-2/valid.txt
# the KVTuner search with torch on the GPU, for a CPU deployment, calibrated on wikitext-2 valid (so
# that the cache it leaves is found again by scripts/bench_search.py --calib-file on the CPU machine)
for unit in storage nominal; do
  /usr/bin/time -f "tune --budget-unit $unit (81 pairs), torch cuda: %e s wall" \
    python3 -m kvtuner_edge tune "$REAL" --budget-unit $unit --calib-file shared/data/wikitext-2/valid.txt \
    --device cuda --backend cpu --cache-dir /root/tune-cache -o "$OUT/front-$unit.json" --json > /dev/null 2> /tmp/tune_$unit.err
  tail -n 1 /tmp/tune_$unit.err | tee -a "$OUT/timing.txt"
done
mkdir -p "$OUT/tune-cache" && cp /root/tune-cache/*.json "$OUT/tune-cache/"

# test-backend-ops from the patched source, linked against the engine's own libraries
source scripts/gpu_tbo.sh
build_test_backend_ops || exit 4
for op in SET_ROWS FLASH_ATTN_EXT; do
  timeout 240 /root/test-backend-ops -o $op -b CUDA0 -p "q3_kv|q2_kv" > "$OUT/tbo_$op.log" 2>&1
  echo "test-backend-ops $op rc=$?: $(grep -c 'OK' "$OUT/tbo_$op.log") OK, $(grep -c 'FAIL' "$OUT/tbo_$op.log") FAIL; $(grep -E 'tests passed' "$OUT/tbo_$op.log" | tail -n 1)" | tee -a "$OUT/tbo.txt"
done
grep FAIL "$OUT/tbo_FLASH_ATTN_EXT.log" | head -n 5
python3 scripts/gpu_engine_check.py "$MODEL" --json "$OUT/engine_check_random.json" > /tmp/ec_random.log 2>&1
echo "engine check (random weights) rc=$?"
python3 -c "
import json
d = json.load(open('$OUT/engine_check_random.json'))
print('ok', d['ok'], 'low-bit CUDA vs CPU', json.dumps(d['cuda_vs_cpu_low_bit']))" 2>&1 | tail -n 1
# real data: token by token (vec kernel), every type against the CPU and against f16 (its thresholds
# above are for random weights; with real weights on random tokens even q8_0/q4_0 mixes diverge)
python3 scripts/gpu_decode_compare.py "$REAL" shared/data/wikitext-2/test.txt --json "$OUT/decode_compare.json" 2>/dev/null
python3 scripts/bench_formats.py --model "$REAL" --gpu-layers 99 --types q8_0,q5_1,q5_0,q4_1,q4_0,q3_kv,q2_kv --out "$OUT/formats-cuda" 2>/tmp/bf.err | tail -n 12 || tail -n 5 /tmp/bf.err
