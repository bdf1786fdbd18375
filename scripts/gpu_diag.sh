#!/usr/bin/env bash
# Diagnose a crash of the GPU engine at model load: build (or reuse) the CUDA wheel, then load a
# random model under several settings, each in its own process, with llama.cpp's log kept.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvtuner-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KVTUNER_EDGE_CACHE=/root/kvtuner-cache
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
wheel=$(python3 native/build.py --variant cuda --cuda-arch "${CUDA_ARCH:-90}" --source .carry/llama-src.tar.xz \
        --no-build-isolation --no-install --keep-build --jobs "$(nproc)" --print-wheel > "$OUT/build.log" 2>&1; tail -n 1 "$OUT/build.log")
echo "build: $(( $(date +%s) - t0 )) s -> $wheel"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade "$wheel"
[ -f /root/smol-random.gguf ] || python3 scripts/make_random_gguf.py --shape smollm2-135m -o /root/smol-random.gguf
[ -f /root/tiny-random.gguf ] || python3 scripts/make_random_gguf.py --shape tiny -o /root/tiny-random.gguf
ldd /tmp/site/llama_cpp/lib/libggml-cuda.so | grep -i -E "cuda|cublas" > "$OUT/ldd.txt"
run() { name=$1; shift; model=$1; ngl=$2; shift 2
  env "$@" timeout 120 python3 scripts/gpu_diag.py "$model" "$ngl" > "$OUT/diag_$name.log" 2>&1
  echo "$name: rc=$? $(grep -E 'decoded ok|^loaded' "$OUT/diag_$name.log" | tail -n 1)"; }
run smol_ngl99 /root/smol-random.gguf 99
run smol_ngl0 /root/smol-random.gguf 0
run smol_ngl99_nopinned /root/smol-random.gguf 99 GGML_CUDA_NO_PINNED=1
run smol_ngl99_nommap /root/smol-random.gguf 99 DIAG_MMAP=0
run tiny_ngl99 /root/tiny-random.gguf 99
run smol_ngl1 /root/smol-random.gguf 1
tail -n 25 "$OUT/diag_smol_ngl99.log"
if command -v cuda-gdb >/dev/null; then
  timeout 200 cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 scripts/gpu_diag.py /root/smol-random.gguf 99 > "$OUT/gdb.txt" 2>&1
  grep -E "^#[0-9]+" "$OUT/gdb.txt" | head -n 25
fi
