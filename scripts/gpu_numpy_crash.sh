#!/usr/bin/env bash
# Diagnose the CUDA-build crash at model load when numpy is imported before llama_cpp
# (gpu_bisect.py variant I). Run after gpu_setup.sh has built and installed the engine.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh" > /dev/null 2>&1
LIB=$(python3 -c "import importlib.util,os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llama_cpp').origin),'lib'))")
echo "libs: $(ls $LIB | tr '\n' ' ')"
try() { timeout 60 "$@" > /tmp/try.log 2>&1; echo "rc=$? : $*  | $(tail -n 1 /tmp/try.log | cut -c1-160)"; }
try python3 scripts/gpu_bisect.py "$MODEL" I
OPENBLAS_NUM_THREADS=1 try python3 scripts/gpu_bisect.py "$MODEL" I
try python3 -c "import numpy, ctypes; ctypes.CDLL('$LIB/libggml-cuda.so'); print('dlopen ok')"
try python3 -c "import numpy, ctypes; ctypes.CDLL('$LIB/libllama.so'); print('dlopen ok')"
try python3 -c "import numpy, llama_cpp; print('import ok')"
try python3 -c "import numpy, llama_cpp; llama_cpp.llama_backend_init(); print('backend ok')"
try python3 -c "import numpy, llama_cpp; import llama_cpp.llama_cpp as l; print('devices', l.llama_supports_gpu_offload())"
try python3 -c "import torch, llama_cpp; llama_cpp.Llama('$MODEL', n_gpu_layers=99, n_ctx=512, verbose=False); print('torch first ok')"
for DBG in gdb cuda-gdb; do
  if command -v $DBG > /dev/null; then
    timeout 180 $DBG -q -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 scripts/gpu_bisect.py "$MODEL" I > "$OUT/bt_I.txt" 2>&1
    grep -E "^#[0-9]+|SIGSEGV|signal" "$OUT/bt_I.txt" | head -n 30
    break
  fi
done
