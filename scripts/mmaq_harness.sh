#!/usr/bin/env bash
# Builds scripts/mmaq_harness.cu against the patched fattn-mmaq.cuh (the pinned sdist + native/ + patches/,
# as native/build.py prepares it) for sm_90 with nvcc on this machine (no GPU needed; about a minute), so
# that device time goes to running it:
#     [VARIANTS="6 7"] [LLAMA_DIR=patched/vendor/llama.cpp] bash scripts/mmaq_harness.sh [OUT_BINARY] [extra nvcc flags]
# (VARIANTS: the kernel variants compiled besides 0)
# then on the GPU machine: OUT_BINARY --seqs 1,64 --depth 4096 (carry the binary; it links cudart statically).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.carry/mmaq_harness}; shift || true
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "${LLAMA_DIR:-}" ]; then  # an already patched tree (for experiments on top of patches/)
  ln -s "$(realpath "$LLAMA_DIR")" "$WORK/llama"
else  # the sdist with native/ and patches/ applied, as the engine build does
python3 - "$WORK" <<'PY'
import sys, pathlib
sys.path.insert(0, "native")
import build
work = pathlib.Path(sys.argv[1])
top = build.unpack(build.fetch_sdist(), work)
build.apply_patches(top / "vendor" / "llama.cpp")
(work / "llama").symlink_to(top / "vendor" / "llama.cpp")
PY
fi
L=$WORK/llama
mkdir -p "$(dirname "$OUT")"
extra=""; for v in ${VARIANTS:-}; do extra="$extra, $v"; done
echo "#define HARNESS_EXTRA $extra" > "$WORK/variants.h"
nvcc -include "$WORK/variants.h" -std=c++17 -O3 -arch=sm_90 -lineinfo -Xptxas -v -DGGML_CUDA_FA_ALL_QUANTS \
    -I"$L/ggml/include" -I"$L/ggml/src" -I"$L/ggml/src/ggml-cuda" "$@" \
    -o "$OUT" scripts/mmaq_harness.cu 2> "$OUT.ptxas.txt" || { cat "$OUT.ptxas.txt"; exit 1; }
python3 - "$OUT.ptxas.txt" <<'PY'
import re, sys
names = {"43": "q3_kv", "44": "q2_kv", "1": "f16", "8": "q8_0", "7": "q5_1", "6": "q5_0", "3": "q4_1", "2": "q4_0"}
cur = None
for line in open(sys.argv[1]):
    m = re.search(r"entry function '_Z19flash_attn_ext_mmaqILi(\d+)EL9ggml_type(\d+)ELS0_(\d+)ELi(\d+)E", line)
    if m:
        d, k, v, var = m.groups()
        cur = f"D={d} K={names.get(k, 'type' + k)} V={names.get(v, 'type' + v)} variant {var}"
    m = re.search(r"(\d+) bytes spill stores", line)
    if m and cur:
        spill = m.group(1)
    m = re.search(r"Used (\d+) registers", line)
    if m and cur:
        print(f"{cur}: {m.group(1)} registers, {spill} bytes spilled")
        cur = None
PY
echo "built $OUT"
