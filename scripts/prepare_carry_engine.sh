#!/usr/bin/env bash
# Fill .carry/ (git-ignored) for scripts/gpu_mmaq.sh from a CUDA engine built on THIS machine, so that the
# lent GPU machine spends its minutes running, not compiling:
#   .carry/engine.tar.xz     the llama_cpp package of the wheel, libraries stripped, duplicates as symlinks
#   .carry/test-backend-ops  ggml's op tests (patched source), linked against those libraries
#   .carry/cuda_kvquant_exact the CUDA cache-write quantizers against the CPU backend, byte for byte
#   .carry/wheels/           gguf and llama-cpp-python's small dependencies for Python 3.12
#   WHEEL=path/to/llama_cpp_python-*.whl SRC=path/to/patched/llama.cpp bash scripts/prepare_carry_engine.sh
# Build the wheel first: `bash scripts/setup_cuda_build_here.sh` (cuBLAS from the nvidia-cublas wheel and a
# stub libcuda.so where no driver is installed), then
# `python native/build.py --variant cuda --fa-quants LIST --no-install --keep-build`.
# The GPU machine's glibc must be at least this one's.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${WHEEL:?the CUDA wheel}" "${SRC:?the patched llama.cpp source folder (vendor/llama.cpp)}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m zipfile -e "$WHEEL" "$tmp/w"
lib=$tmp/w/llama_cpp/lib
# the wheel stores each library three times (name, .so.N, .so.N.M.K): keep the real file, link the others
for f in "$lib"/*.so*; do
  real=$(ls "$lib"/$(basename "$f" | sed -E 's/\.so.*$//').so.*.*.* 2>/dev/null | head -n 1 || true)
  if [ -n "$real" ] && [ "$f" != "$real" ]; then ln -sf "$(basename "$real")" "$f"; fi
done
strip --strip-unneeded "$lib"/*.so.*.*.* 2>/dev/null || true
mkdir -p .carry/wheels
tar -C "$tmp/w" -cJf .carry/engine.tar.xz llama_cpp
g++ -O1 -std=c++17 -I"$SRC/ggml/include" "$SRC/tests/test-backend-ops.cpp" -L"$lib" -lggml -lggml-base \
    -Wl,--allow-shlib-undefined -o .carry/test-backend-ops -lpthread
g++ -O1 -std=c++17 -I"$SRC/ggml/include" scripts/cuda_kvquant_exact.cpp -L"$lib" -lggml -lggml-base \
    -Wl,--allow-shlib-undefined -o .carry/cuda_kvquant_exact
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .carry/wheels gguf==0.19.0 diskcache==5.6.3
du -sh .carry/engine.tar.xz .carry/test-backend-ops .carry/wheels
