#!/usr/bin/env bash
# The CPU kernels of native/ggml/ggml-cpu/kvquants-cpu.c (q3_kv/q2_kv dot products, their cache writes,
# the V accumulation) against the same file built without SIMD, bit for bit (scripts/kvq_simd_check.c;
# the grouped decode kernel's chunked V sum, which rounds on its own, against exact sums),
# for each target named: host (the engine's x86 flags AVX2+FMA+F16C), host-avx512 (those plus AVX-512
# F/CD/VL/DQ/BW/VNNI, --cpu-isa avx512), host-plain (no -m flags), aarch64 (armv8-a NEON), aarch64-dotprod (armv8.2-a+dotprod), the aarch64 ones built with
# Debian's cross compiler (gcc-aarch64-linux-gnu) and run under qemu-user (correctness only: speed on
# ARM is not measured here). Each prints a hash of the reference cache bytes: equal on every target.
#   bash scripts/kvq_simd_check.sh [targets...]       (default: every target this machine can run)
# SRC: a patched llama.cpp source folder (vendor/llama.cpp); default: the pinned sdist from the build
# cache, unpacked and patched into a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "${SRC:-}" ]; then
  SRC=$(python3 - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "native")
import build
print(build.prepare_source(build.fetch_sdist(), Path(sys.argv[1]) / "src") / "vendor" / "llama.cpp")
PY
  )
  SRC=$(printf '%s\n' "$SRC" | tail -n 1) # build.py logs to stdout first
fi
N=$ROOT/native/ggml
INC="-I$SRC/ggml/include -I$SRC/ggml/src -I$SRC/ggml/src/ggml-cpu -I$N -I$N/ggml-cpu"
REF="-DKVQ_SCALAR_ONLY"
for f in ggml_vec_dot_q3_kv_q8_0 ggml_vec_dot_q2_kv_q8_1 ggml_kvq_quantize_row_q3_kv ggml_kvq_quantize_row_q2_kv ggml_kvq_get_mad ggml_kvq_get_mad_rows ggml_kvq_get_dot_heads; do
  REF="$REF -D$f=ref_$f"
done

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=()
  if [ "$(uname -m)" = x86_64 ]; then
    targets+=(host-plain)
    flags=$(grep -m 1 '^flags' /proc/cpuinfo || true)
    if [[ " $flags " == *" avx2 "* && " $flags " == *" fma "* && " $flags " == *" f16c "* ]]; then
      targets+=(host)
    fi
    if [[ " $flags " == *" avx512f "* && " $flags " == *" avx512bw "* && " $flags " == *" avx512dq "* &&
          " $flags " == *" avx512vl "* && " $flags " == *" avx512cd "* && " $flags " == *" avx512_vnni "* ]]; then
      targets+=(host-avx512)
    fi
  fi
  if command -v aarch64-linux-gnu-gcc > /dev/null && command -v qemu-aarch64 > /dev/null; then
    targets+=(aarch64 aarch64-dotprod)
  fi
fi

rc=0
for t in "${targets[@]}"; do
  # CC: the compiler and the CPU backend's flags; BASE: ggml-base's (the reference quantizers and
  # dequantizers live there, built without the backend's -m flags, so without FMA contraction on x86)
  case $t in
    host)            CC="cc -O2 -mavx2 -mfma -mf16c"; BASE="cc -O2"; RUN="" ;;
    host-avx512)     CC="cc -O2 -mavx2 -mfma -mf16c -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw -mavx512vnni"
                     BASE="cc -O2"; RUN="" ;;
    host-plain)      CC="cc -O2"; BASE="cc -O2"; RUN="" ;;
    aarch64)         CC="aarch64-linux-gnu-gcc -O2 -march=armv8-a"; BASE=$CC; RUN="qemu-aarch64" ;;
    aarch64-dotprod) CC="aarch64-linux-gnu-gcc -O2 -march=armv8.2-a+dotprod+fp16"; BASE=$CC; RUN="qemu-aarch64" ;;
    *) echo "unknown target $t"; exit 2 ;;
  esac
  d=$work/$t; mkdir -p "$d"
  $CC $INC -c "$N/ggml-cpu/kvquants-cpu.c" -o "$d/simd.o"
  $CC $INC $REF -c "$N/ggml-cpu/kvquants-cpu.c" -o "$d/ref.o"
  $BASE $INC -c "$N/ggml-kvquants.c" -o "$d/kvq.o"
  $CC -ffp-contract=off -static $INC scripts/kvq_simd_check.c "$d/simd.o" "$d/ref.o" "$d/kvq.o" -lm -o "$d/check"
  echo "== $t ($CC)"
  if ! $RUN "$d/check"; then rc=1; fi
done
exit $rc
