#!/usr/bin/env bash
# Bisect the open crash at GPU model load (see README "GPU"): variants A..N of scripts/gpu_bisect.py,
# one process each, then a native backtrace of gpu_engine_check.py under cuda-gdb.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
mkdir -p /tmp/bisect  # only failing variants' logs go to $OUT (at most 8 files come back)
for v in ${VARIANTS:-A B C D E F G H I J K L M N}; do
  timeout 60 python3 -X faulthandler scripts/gpu_bisect.py "$MODEL" $v > "/tmp/bisect/$v.log" 2>&1
  rc=$?
  echo "variant $v: rc=$rc $(tail -n 1 "/tmp/bisect/$v.log" | cut -c1-150)"
  [ "$rc" = 0 ] || cp "/tmp/bisect/$v.log" "$OUT/bisect_$v.log"
done
if [ -z "${NO_GDB:-}" ] && command -v cuda-gdb >/dev/null; then
  timeout 300 cuda-gdb -q -batch -ex run -ex bt --args python3 scripts/gpu_engine_check.py "$MODEL" > /tmp/gdb.txt 2>&1
  grep -E "^#[0-9]+|SIGSEGV" /tmp/gdb.txt | head -n 40
fi
