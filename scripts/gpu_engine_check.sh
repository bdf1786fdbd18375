#!/usr/bin/env bash
# On the lent GPU machine (no network): build the CUDA engine from the trimmed source archive,
# then check it. Prepare the carried folder here first with scripts/prepare_carry.sh, and run:
#   device run --carry .carry "bash scripts/gpu_engine_check.sh"
# The build folder lives outside the carried paths, so a second call on a warm machine resumes it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvtuner-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KVTUNER_EDGE_CACHE=/root/kvtuner-cache
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 native/build.py --variant cuda --cuda-arch "${CUDA_ARCH:-90}" --source .carry/llama-src.tar.xz \
    --no-build-isolation --no-install --jobs "$(nproc)" --print-wheel > "$OUT/build.log" 2>&1
wheel=$(tail -n 1 "$OUT/build.log")
echo "build: $(( $(date +%s) - t0 )) s on $(nproc) cores -> $wheel" | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade "$wheel"
[ -f /root/smol-random.gguf ] || python3 scripts/make_random_gguf.py --shape smollm2-135m -o /root/smol-random.gguf
rc=0
python3 -X faulthandler scripts/gpu_engine_check.py /root/smol-random.gguf --json "$OUT/engine_check.json" \
    2> "$OUT/check_stderr.log" || rc=$?
echo "check rc=$rc"
if [ "$rc" != 0 ]; then  # once more with llama.cpp's log, to see where it stopped
  KVTUNER_EDGE_VERBOSE=1 python3 -X faulthandler scripts/gpu_engine_check.py /root/smol-random.gguf \
      > "$OUT/check_verbose.log" 2>&1 || true
  tail -n 40 "$OUT/check_verbose.log"
fi
exit "$rc"
