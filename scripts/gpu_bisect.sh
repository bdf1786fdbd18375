#!/usr/bin/env bash
# Build (or reuse) the CUDA wheel, then load a random model in variants A..H, one process each.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvtuner-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KVTUNER_EDGE_CACHE=/root/kvtuner-cache
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 native/build.py --variant cuda --source .carry/llama-src.tar.xz --no-build-isolation --no-install \
    --jobs "$(nproc)" --print-wheel > "$OUT/build.log" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade "$(tail -n 1 "$OUT/build.log")"
[ -f /root/smol-random.gguf ] || python3 scripts/make_random_gguf.py --shape smollm2-135m -o /root/smol-random.gguf
for v in A B C D E F G H; do
  timeout 60 python3 scripts/gpu_bisect.py /root/smol-random.gguf $v > "$OUT/bisect_$v.log" 2>&1
  echo "variant $v: rc=$? $(tail -n 1 "$OUT/bisect_$v.log" | cut -c1-150)"
done
