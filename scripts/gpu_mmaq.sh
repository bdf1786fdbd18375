#!/usr/bin/env bash
# The tensor-core decode kernel for quantized K/V (fattn-mmaq, issue 12) on the lent GPU machine, from an
# engine built on this machine (scripts/prepare_carry_engine.sh fills .carry/: the llama_cpp package with
# its CUDA libraries as engine.tar.xz, test-backend-ops linked against them, the Python wheels the GPU
# machine lacks). Stages, each within one call of the device tool:
#   kernel: the cache-write quantizers CUDA vs CPU byte for byte (scripts/cuda_kvquant_exact.cpp) and
#           test-backend-ops SET_ROWS; FLASH_ATTN_EXT decode cases CUDA vs CPU (correctness), then its perf
#           mode on Llama-3-8B-shaped decode layers (f16 vs quantized vs the mixes' pairs, 1/16/64
#           sequences at depth 4096), with our kernel and without it (KVTUNER_CUDA_FA_MMAQ=0: the GQA
#           vector kernel of patch 0006) in the same build; PERF_VARIANTS="5 ..." adds a measuring build's
#           other configurations (KVTUNER_CUDA_FA_MMAQ_VARIANT), each against the default.
#   build:  no carried engine: build it here from .carry/llama-src.tar.xz (scripts/prepare_carry.sh), with
#           test-backend-ops; later stages of the same warm machine use it.
#   ncu:    Nsight Compute (stall reasons per issued instruction, instructions, occupancy) on decode cases
#           (NCU_CASES), for the default kernel and a measuring build's NCU_VARIANTS.
#   profile: scripts/gpu_decode_profile.py: kernels and time per decode step, f16 vs quantized caches.
#   small:  the small-batch cases (2-16 tokens per sequence) CUDA vs CPU, then their perf with the kernel and
#           without it (llama.cpp's MMA kernel on an f16 copy of K/V) at the Llama-3-8B layer, 1 and 16 sequences.
#   py SCRIPT ARGS: a script of the working tree in the same environment, the tuned 8B file as $MODEL.
#   bench:  `kvtuner-edge bench` on a random-weight Llama-3-8B-shaped GGUF with KVTuner's 3.25-bit mix
#           (f16, q8_0, q4_0 in the same run), 1/16/32/64 sequences x depth 4096/8192 and at a 16 GiB
#           KV budget; BENCH_STOCK=1 adds the same points with the kernel off.
# Carry [".carry"]. Results land in $OUT.
set -uo pipefail
STAGE=${1:?kernel or bench}
source "$(dirname "$0")/gpu_env.sh"
if [ "$STAGE" = build ]; then
  # no engine carried: build the CUDA engine on this machine (5-7 min on 16 cores) from the trimmed source
  # (.carry/llama-src.tar.xz, scripts/prepare_carry.sh) with the working tree's patches, install it into
  # $SITE, link test-backend-ops and cuda_kvquant_exact against it into .carry/ (kept while the machine
  # stays warm; the package, 50 MiB as tar.xz, is over what comes back from a call)
  FA=${FA_QUANTS:-q8_0-q8_0,q4_0-q4_0,q8_0-q4_0,q3_kv-q2_kv,q3_kv-q3_kv,q4_0-q3_kv,q4_1-q3_kv,q5_0-q4_0,q5_1-q3_kv,q5_1-q4_1}
  t0=$(date +%s)
  python3 native/build.py --variant cuda --cuda-arch "${CUDA_ARCH:-90}" --fa-quants "$FA" --source .carry/llama-src.tar.xz \
      --no-build-isolation --no-install --jobs "$(nproc)" --print-wheel > "$OUT/build.log" 2>&1 &
  bpid=$!
  # test-backend-ops (the patched tree's) compiles beside the engine
  while [ -z "$(find /root/kvtuner-cache/build -maxdepth 1 -name 'cuda-*' -newer .carry/llama-src.tar.xz 2>/dev/null)" ] ||
        [ ! -f "$(ls -d /root/kvtuner-cache/build/cuda-* | head -n 1)/source-ready" ]; do
    kill -0 $bpid 2>/dev/null || break; sleep 2
  done
  LSRC=$(ls -d /root/kvtuner-cache/build/cuda-*/llama_cpp_python-*/vendor/llama.cpp | head -n 1)
  # (the build removes its source tree when it is done: both compile now)
  g++ -O1 -std=c++17 -I"$LSRC/ggml/include" -c "$LSRC/tests/test-backend-ops.cpp" -o /tmp/tbo.o &
  tpid=$!
  g++ -O1 -std=c++17 -I"$LSRC/ggml/include" -c scripts/cuda_kvquant_exact.cpp -o /tmp/kvq.o &
  kpid=$!
  wait $bpid; rc=$?
  echo "build rc=$rc in $(( $(date +%s) - t0 )) s on $(nproc) cores: $(tail -n 1 "$OUT/build.log")" | tee "$OUT/summary.txt"
  [ $rc = 0 ] || { tail -n 30 "$OUT/build.log"; exit 1; }
  rm -rf "$SITE" /tmp/w && mkdir -p "$SITE" && python3 -m zipfile -e "$(tail -n 1 "$OUT/build.log")" /tmp/w
  lib=/tmp/w/llama_cpp/lib
  for f in "$lib"/*.so*; do   # one real file per library, the other names as links
    real=$(ls "$lib"/$(basename "$f" | sed -E 's/\.so.*$//').so.*.*.* 2>/dev/null | head -n 1 || true)
    if [ -n "$real" ] && [ "$f" != "$real" ]; then ln -sf "$(basename "$real")" "$f"; fi
  done
  strip --strip-unneeded "$lib"/*.so.*.*.* 2>/dev/null
  mv /tmp/w/llama_cpp "$SITE/"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .carry/wheels/*.whl 2>/dev/null
  wait $tpid $kpid
  g++ /tmp/tbo.o -L"$SITE/llama_cpp/lib" -lggml -lggml-base -Wl,--allow-shlib-undefined -o .carry/test-backend-ops -lpthread
  g++ /tmp/kvq.o -L"$SITE/llama_cpp/lib" -lggml -lggml-base -Wl,--allow-shlib-undefined -o .carry/cuda_kvquant_exact
  echo "tools linked, total $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  exit 0
fi
# the engine built on the CPU machine (scripts/prepare_carry_engine.sh), or by the build stage above
if [ ! -d "$SITE/llama_cpp" ]; then
  tar -xJf .carry/engine.tar.xz -C "$SITE" || exit 3
fi
LIB=$SITE/llama_cpp/lib
# the CUDA runtime and cuBLAS the carried libraries link against (the machine's toolkit or torch's wheels)
for so in libcudart.so.13 libcublas.so.13; do
  d=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /opt -name "$so" 2>/dev/null | head -n 1)
  [ -n "$d" ] && LD_LIBRARY_PATH=$(dirname "$d"):${LD_LIBRARY_PATH:-}
done
export LD_LIBRARY_PATH=$LIB:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

# FLASH_ATTN_EXT cases CUDA vs CPU: eval_cases LABEL FILTER LOG TIMEOUT (one summary line, the first FAILs)
eval_cases() {
  local t0; t0=$(date +%s)
  timeout "$4" .carry/test-backend-ops -o FLASH_ATTN_EXT -b CUDA0 -p "$2" > "$OUT/$3" 2>&1
  echo "test-backend-ops FLASH_ATTN_EXT $1 rc=$?: $(grep -E 'tests passed' "$OUT/$3" | tail -n 1 | tr -s ' '), $(grep -c 'FAIL' "$OUT/$3") FAIL in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  grep FAIL "$OUT/$3" | head -n 8
}
# perf of the cases matching FILTER with the kernel on and off in the same build (PERF_MMAQ), then the table:
# perf_on_off PREFIX FILTER JSON (logs $OUT/PREFIX1.log, $OUT/PREFIX0.log)
perf_on_off() {
  for mmaq in ${PERF_MMAQ:-1 0}; do
    KVTUNER_CUDA_FA_MMAQ=$mmaq timeout "${PERF_TIMEOUT:-200}" stdbuf -oL .carry/test-backend-ops perf -o FLASH_ATTN_EXT -b CUDA0 -p "$2" \
        > "$OUT/$1$mmaq.log" 2>&1
    echo "perf (KVTUNER_CUDA_FA_MMAQ=$mmaq) rc=$?" | tee -a "$OUT/summary.txt"
  done
  python3 scripts/mmaq_perf_table.py "$OUT/${1}1.log" $(ls "$OUT/${1}0.log" 2>/dev/null) --json "$OUT/$3" | tee -a "$OUT/summary.txt"
}

if [ "$STAGE" = kernel ]; then
  TBO=.carry/test-backend-ops
  # the cache writes: CUDA quantizers byte for byte against the CPU backend, then ggml's SET_ROWS cases
  .carry/cuda_kvquant_exact 2>&1 | tee "$OUT/kvquant_exact.txt"
  echo "cuda_kvquant_exact rc=${PIPESTATUS[0]}" | tee "$OUT/summary.txt"
  timeout 200 "$TBO" -o SET_ROWS -b CUDA0 > "$OUT/tbo_set_rows.log" 2>&1
  echo "test-backend-ops SET_ROWS rc=$?: $(grep -E 'tests passed' "$OUT/tbo_set_rows.log" | tail -n 1 | tr -s ' ')" | tee -a "$OUT/summary.txt"
  # correctness: every decode case (nb=1, or EVAL_FILTER) of FLASH_ATTN_EXT, CUDA against the CPU backend
  eval_cases "${EVAL_FILTER:-nb=1,}" "${EVAL_FILTER:-nb=1,}" tbo_eval.log "${EVAL_TIMEOUT:-400}"
  grep -E "tests passed|Backend" "$OUT/tbo_eval.log" | tail -n 3
  # speed: the same build with and without the kernel (PERF_FILTER: a regex on the case's parameters;
  # each case takes 10-20 s, most of it the CPU filling and quantizing the 64-sequence cache)
  PF=${PERF_FILTER:-"nh=8,nr23=\[4,"}
  perf_on_off tbo_perf_mmaq "$PF" perf.json
  # other kernel configurations of a measuring build (-DFATTN_MMAQ_WITH_VARIANTS=1), each against the default
  for v in ${PERF_VARIANTS:-}; do
    KVTUNER_CUDA_FA_MMAQ_VARIANT=$v timeout "${PERF_TIMEOUT:-200}" stdbuf -oL "$TBO" perf -o FLASH_ATTN_EXT -b CUDA0 -p "$PF" \
        > "$OUT/tbo_perf_variant$v.log" 2>&1
    echo "perf (KVTUNER_CUDA_FA_MMAQ_VARIANT=$v) rc=$?; 'off' columns: variant $v" | tee -a "$OUT/summary.txt"
    python3 scripts/mmaq_perf_table.py "$OUT/tbo_perf_mmaq1.log" "$OUT/tbo_perf_variant$v.log" --json "$OUT/perf_variant$v.json" | tee -a "$OUT/summary.txt"
  done
  exit 0
fi

if [ "$STAGE" = split ]; then
  # the decode kernel's split over KV positions (launch_fattn's parallel blocks), one process per
  # KVTUNER_CUDA_FA_MMAQ_PB value (0: llama.cpp's choice, -1: balanced, the default; N: N blocks), then
  # f16 through llama.cpp's kernel once; table: scripts/mmaq_split_table.py
  PF=${PERF_FILTER:-"nh=8,nr23=\[4,(1|4|16)\],kv=(1024|4096|8192|16384),nb=1,"}
  # correctness first, CUDA vs CPU with the default split (decode and small-batch cases)
  eval_cases "split ${KVTUNER_CUDA_FA_MMAQ_PB:-balanced}" "${EVAL_FILTER:-nb=(1|2|3|4|5|8|16),}" eval_split.log "${EVAL_TIMEOUT:-300}"
  for pb in ${PB_LIST:-0 -1 8 16 24 32 48 64}; do
    KVTUNER_CUDA_FA_MMAQ_PB=$pb timeout "${PERF_TIMEOUT:-120}" stdbuf -oL .carry/test-backend-ops perf -o FLASH_ATTN_EXT \
        -b CUDA0 -p "$PF" > "$OUT/split_pb$pb.log" 2>&1
    echo "split KVTUNER_CUDA_FA_MMAQ_PB=$pb rc=$?" | tee -a "$OUT/summary.txt"
  done
  if [ -n "${SPLIT_STOCK:-}" ]; then   # and llama.cpp's own path for the same cases (the vector kernel)
    KVTUNER_CUDA_FA_MMAQ=0 timeout "${PERF_TIMEOUT:-120}" stdbuf -oL .carry/test-backend-ops perf -o FLASH_ATTN_EXT \
        -b CUDA0 -p "$PF" > "$OUT/split_pboff.log" 2>&1
    echo "split KVTUNER_CUDA_FA_MMAQ=0 rc=$?" | tee -a "$OUT/summary.txt"
  fi
  python3 scripts/mmaq_split_table.py "$OUT"/split_pb*.log --json "$OUT/split.json" | tee -a "$OUT/summary.txt"
  exit 0
fi

if [ "$STAGE" = ncu ]; then
  # Nsight Compute on one decode layer per (K, V) pair (NCU_CASES: test-backend-ops -p filters, separated by
  # spaces): throughput, occupancy, the instruction count and why warps stall (per issued instruction), for
  # the default kernel and, in a measuring build, each of NCU_VARIANTS
  : > "$OUT/summary.txt"
  for v in 0 ${NCU_VARIANTS:-}; do
    for pf in ${NCU_CASES:-"nr23=\[4,64\],kv=4096,.*type_K=q4_0,type_V=q4_0,"}; do
      tag=$(echo "$pf" | sed -E 's/.*type_K=([a-z0-9_]+),type_V=([a-z0-9_]+).*/\1_\2/')
      KVTUNER_CUDA_FA_MMAQ_VARIANT=$v timeout "${NCU_TIMEOUT:-150}" ncu -k regex:flash_attn_ext_mmaq --launch-skip 2 --launch-count 1 \
          --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
          --section ComputeWorkloadAnalysis --section InstructionStats --section LaunchStats \
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
          .carry/test-backend-ops perf -o FLASH_ATTN_EXT -b CUDA0 -p "$pf" > "$OUT/ncu_${tag}_v$v.txt" 2>&1
      echo "ncu $tag variant $v rc=$?: $(grep -E '^ +Duration' "$OUT/ncu_${tag}_v$v.txt" | tr -s ' ')," \
           "$(grep -E '^ +Executed Instructions ' "$OUT/ncu_${tag}_v$v.txt" | tr -s ' ')" | tee -a "$OUT/summary.txt"
    done
  done
  exit 0
fi

if [ "$STAGE" = small ]; then
  # small batches (2-16 tokens per sequence): our cases CUDA vs CPU, then perf at the Llama-3-8B layer with the
  # kernel and without it (the f16 copy of K/V and llama.cpp's MMA kernel) in the same build
  : > "$OUT/summary.txt"
  eval_cases "small batches" "nr23=\[[2-8],2\],kv=512,nb=(2|3|5|8|16)," tbo_eval_small.log 300
  PF=${PERF_FILTER:-"nh=8,nr23=\[4,(1|16)\],kv=4096,nb=(1|2|4|8|16),"}
  perf_on_off tbo_perf_small_mmaq "$PF" perf_small.json
  exit 0
fi

# the random-weight Llama-3-8B-shaped GGUF with the 3.25-bit mix of the bench configs
M8=/root/llama3-8b-random.gguf
F=/root/llama3-8b-random.mix325.gguf
prepare_model() {
  CFG=/root/bench-cfg
  python3 scripts/make_bench_configs.py --layers 32 --backend cuda --out-dir "$CFG" > /dev/null 2> "$OUT/configs.txt"
  [ -f "$M8" ] || python3 -m kvtuner_edge.random_model --shape llama3-8b -o "$M8" > /tmp/m8.log 2>&1 || { cat /tmp/m8.log; exit 4; }
  [ -f "$F" ] || python3 -m kvtuner_edge export "$M8" --config "$CFG/mix325.json" -o "$F" > /tmp/export.log 2>&1 || { tail /tmp/export.log; exit 5; }
}

if [ "$STAGE" = py ]; then
  # any Python script of the working tree with the engine's environment; the tuned 8B file is $MODEL
  # (NO_MODEL=1: not made, for scripts that bring their own model)
  [ -n "${NO_MODEL:-}" ] || prepare_model
  shift
  MODEL=$F python3 "$@"
  exit $?
fi

if [ "$STAGE" = profile ]; then
  # where a decode step's time goes (torch.profiler's CUPTI trace of llama.cpp's kernels), f16 vs the
  # quantized caches, with environment variants (PROFILE_VARIANTS: --variant arguments)
  prepare_model
  python3 scripts/gpu_decode_profile.py "$F" --configs "${PROFILE_CONFIGS:-f16,q8_0,q4_0,file}" --batch "${BATCH:-1,16}" \
      --depth "${DEPTH:-4096}" ${PROFILE_VARIANTS:---variant rot_off:LLAMA_ATTN_ROT_DISABLE=1 --variant vec:KVTUNER_CUDA_FA_MMAQ=0} \
      --out "$OUT/profile.json" --trace-dir "$OUT/traces" > "$OUT/profile.txt" 2> /tmp/profile.err
  echo "profile rc=$?"; cat "$OUT/profile.txt"; tail -n 5 /tmp/profile.err
  exit 0
fi

if [ "$STAGE" = bench ]; then
  prepare_model
  python3 -m kvtuner_edge bench "$F" --configs "file" --batch "${BATCH:-1,16,32,64}" --depth "${DEPTH:-4096,8192}" \
      ${KV_BUDGET:+--kv-budget $KV_BUDGET} --out "$OUT/bench_mmaq.json" --plot "$OUT/bench_mmaq.png" > "$OUT/bench_mmaq.txt" 2> /tmp/bench.err
  echo "bench (ours) rc=$?"; cat "$OUT/bench_mmaq.txt"; tail -n 3 /tmp/bench.err
  if [ "${BENCH_STOCK:-0}" = 1 ]; then
    KVTUNER_CUDA_FA_MMAQ=0 python3 -m kvtuner_edge bench "$F" --configs "file" --batch "${BATCH:-1,16,32,64}" --depth 4096 \
        --out "$OUT/bench_vec.json" > "$OUT/bench_vec.txt" 2> /tmp/bench_vec.err
    echo "bench (kernel off) rc=$?"; cat "$OUT/bench_vec.txt"; tail -n 3 /tmp/bench_vec.err
  fi
  exit 0
fi
echo "unknown stage $STAGE"; exit 2
