#!/usr/bin/env bash
# Calibration under a memory limit on the GPU machine (issue 14), in stages of one call each
# (every stage stays under 9 minutes; run them in this order while the machine stays warm; the
# calibration and search checkpoint, so a stage cut off by its timeout resumes when run again):
#   setup     scripts/gpu_setup.sh (the CUDA engine: 5-7 min on 16 cores), a random Llama-3-8B-shape GGUF
#   8b-full   `export --budget 4.5` with torch on CUDA and the default limit (everything resident)
#   8b-8gib   the same with --max-memory 8GiB (target: peak GPU memory <= 8 GiB, time <= 1.5 x 8b-full)
#   32b-make  a random Qwen2.5-32B-shape GGUF (64 layers, 8 KV heads of 128; about 18 GB)
#   32b       `export --budget 4.5` on it with the default limit (what the H200 has free)
# NOCHECK=1 passes --no-check (no engine check after the search), so that nvidia-smi's peak is the
# calibration's alone (the engine still writes the calibration text first, unless CALIB=FILE gives a text).
# ENGINE_TAR=.carry/engine-cpu.tar.xz: no setup stage, the llama_cpp package of a wheel built elsewhere
# (the CPU engine is enough with NOCHECK=1 and CALIB: it only tokenizes).
# Each export prints, on stderr and into $OUT/<stage>.txt: the wall time, the memory plan,
# torch.cuda.max_memory_allocated and max_memory_reserved (torch's own peak: the calibration), and
# the peak of nvidia-smi's memory.used over the run (the whole process: CUDA context, torch's cache,
# and the llama.cpp engine that validates the export on held-out text).
# Run: carry [".carry"] (scripts/prepare_carry.sh), command `bash scripts/gpu_calib_memory.sh setup`,
# then the same with 8b-full, 8b-8gib, 32b-make, 32b.
set -uo pipefail
STAGE=${1:?setup, 8b-full, 8b-8gib, 32b-make or 32b}
if [ "$STAGE" = setup ]; then
  source "$(dirname "$0")/gpu_setup.sh"
else
  cd "$(dirname "$0")/.."
  OUT=${OUT:-/tmp/kvtuner-out}; mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1 KVTUNER_EDGE_CACHE=/root/kvtuner-cache PYTHONPATH=/tmp/site:$PWD
  if [ -n "${ENGINE_TAR:-}" ] && [ ! -f /tmp/site/llama_cpp/__init__.py ]; then
    mkdir -p /tmp/site && tar -xJf "$ENGINE_TAR" -C /tmp/site &&
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl 2>/dev/null
  fi
  [ -f /tmp/site/llama_cpp/__init__.py ] || { echo "run the setup stage first (the machine went cold?)"; exit 2; }
fi

M8=/root/llama3-8b-random.gguf
M32=/root/qwen2.5-32b-random.gguf

make_model() {   # shape path
  [ -f "$2" ] && return 0
  local t0=$(date +%s)
  python3 -m kvtuner_edge.random_model --shape "$1" -o "$2" || exit 1
  echo "wrote $2 in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/$STAGE.txt"
}

# export MODEL with the given extra options, under `timeout`, measuring what the header says
measure() {   # label model seconds [options...]
  local label=$1 model=$2 limit=$3; shift 3
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > /tmp/smi-$label.txt &
  local smi=$!
  local t0=$(date +%s.%N)
  [ "${NOCHECK:-0}" = 1 ] && set -- "$@" --no-check
  [ -n "${CALIB:-}" ] && set -- "$@" --calib-file "$CALIB"
  timeout "$limit" python3 - "$model" "$label" "$@" <<'EOF' 2>&1 | tee /tmp/$label.err
import atexit, signal, sys
signal.signal(signal.SIGTERM, lambda *a: sys.exit(124))   # timeout's SIGTERM: still print the peak (atexit)
from kvtuner_edge import engine
engine._bind()                       # the engine's libraries before torch (see engine.py)
import torch

def peak():
    print(f"torch.cuda.max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
          f"max_memory_reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB", file=sys.stderr)

atexit.register(peak)
from kvtuner_edge.cli import main
model, label, *opts = sys.argv[1:]
sys.argv = ["kvtuner-edge", "export", model, "--budget", "4.5", "--device", "cuda", "-o", f"/root/tuned-{label}.gguf",
            "--cache-dir", f"/root/cache-{label}", *opts]
main()
EOF
  local rc=${PIPESTATUS[0]}
  local t1=$(date +%s.%N)
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  {
    echo "== $label: rc=$rc ($( [ $rc = 124 ] && echo "cut off at $limit s: run the stage again to resume" || echo done)), wall $(python3 -c "print(f'{$t1 - $t0:.0f}')") s"
    grep -h "weights:" /tmp/$label.err | tail -n 1
    grep -h "max_memory_allocated" /tmp/$label.err | tail -n 1
    echo "nvidia-smi peak memory.used: $(sort -n /tmp/smi-$label.txt | tail -n 1) MiB"
    grep -h -E "^wrote|predicted KLD|calibrate \+ search" /tmp/$label.err | head -n 4
  } | tee -a "$OUT/$STAGE.txt"
  cp /tmp/$label.err "$OUT/$label.err"
}

case "$STAGE" in
  setup)    make_model llama3-8b "$M8" ;;
  8b-full)  make_model llama3-8b "$M8"; measure 8b-full "$M8" 520 ;;
  8b-8gib)  make_model llama3-8b "$M8"; measure 8b-8gib "$M8" 520 --max-memory 8GiB ;;
  32b-make) make_model qwen2.5-32b "$M32" ;;
  32b)      [ -f "$M32" ] || { echo "run 32b-make first (the machine went cold?)"; exit 2; }
            measure 32b "$M32" "${LIMIT:-520}" ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
