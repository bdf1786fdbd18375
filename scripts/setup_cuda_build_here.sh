#!/usr/bin/env bash
# Make this GPU-less machine able to build the CUDA engine (nvcc 13.0 and cmake are here; cuBLAS and the
# driver library are not), so that the lent GPU machine only runs what was built here:
#   - cuBLAS 13.0 headers and libraries from the nvidia-cublas wheel, into the CUDA toolkit folder;
#   - a stub libcuda.so (soname libcuda.so.1) that defines the driver symbols libggml-cuda.so uses, so the
#     library records its dependency on the real driver (an empty stub is dropped by --as-needed, and
#     the symbols are then not found at load on the GPU machine).
# Then: python native/build.py --variant cuda --fa-quants LIST --no-install --keep-build
#       WHEEL=... SRC=... bash scripts/prepare_carry_engine.sh
# Run as root (it writes into the toolkit folder); idempotent.
set -euo pipefail
# the toolkit folder: CUDA_HOME, /usr/local/cuda, or the one above nvcc (nvcc may be a wrapper script)
CUDA=""
for d in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then CUDA=$d; break; fi
done
[ -n "$CUDA" ] || { echo "no CUDA toolkit with include/cuda_runtime.h found (set CUDA_HOME)" >&2; exit 1; }
LIBDIR=$CUDA/lib64; [ -d "$LIBDIR" ] || LIBDIR=$CUDA/lib
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if [ ! -f "$CUDA/include/cublas_v2.h" ] || [ ! -e "$LIBDIR/libcublas.so" ]; then
  python3 -m pip download -q --no-deps -d "$tmp" "nvidia-cublas==13.0.*"
  python3 -m zipfile -e "$tmp"/nvidia_cublas-*.whl "$tmp/w"
  cp "$tmp"/w/nvidia/cu13/include/*.h "$CUDA/include/"
  cp "$tmp"/w/nvidia/cu13/lib/libcublas.so.13 "$tmp"/w/nvidia/cu13/lib/libcublasLt.so.13 "$LIBDIR/"
  ln -sf libcublas.so.13 "$LIBDIR/libcublas.so"
  ln -sf libcublasLt.so.13 "$LIBDIR/libcublasLt.so"
fi
if ! ldconfig -p | grep -q "libcuda.so.1 " && [ ! -f "$LIBDIR/stubs/libcuda.so" ]; then
  mkdir -p "$LIBDIR/stubs"
  for s in cuDeviceGet cuDeviceGetAttribute cuGetErrorString cuMemAddressFree cuMemAddressReserve cuMemCreate \
           cuMemGetAllocationGranularity cuMemMap cuMemRelease cuMemSetAccess cuMemUnmap; do
    echo "int $s(void) { return 999; }"
  done > "$tmp/stub.c"
  gcc -shared -fPIC -o "$LIBDIR/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$tmp/stub.c"
fi
echo "CUDA toolkit at $CUDA ready: cuBLAS $(ls "$LIBDIR"/libcublas.so.13), driver $( [ -f "$LIBDIR/stubs/libcuda.so" ] && echo "stub" || echo "installed")"
