#!/usr/bin/env bash
# On the lent GPU machine: build the CUDA engine from the trimmed source archive, then check it.
# Fill .carry/ here first (scripts/prepare_carry.sh), then run there with carry [".carry"]:
#   bash scripts/gpu_engine_check.sh
set -euo pipefail
source "$(dirname "$0")/gpu_setup.sh"
rc=0
python3 -X faulthandler scripts/gpu_engine_check.py "$MODEL" --json "$OUT/engine_check.json" \
    2> "$OUT/check_stderr.log" || rc=$?
echo "check rc=$rc"
if [ "$rc" != 0 ]; then  # once more with llama.cpp's log, to see where it stopped
  KVTUNER_EDGE_VERBOSE=1 python3 -X faulthandler scripts/gpu_engine_check.py "$MODEL" \
      > "$OUT/check_verbose.log" 2>&1 || true
  tail -n 40 "$OUT/check_verbose.log"
fi
exit "$rc"
