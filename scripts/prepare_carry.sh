#!/usr/bin/env bash
# Fill .carry/ (git-ignored) with what the GPU machine cannot download: the trimmed llama.cpp
# source (python native/build.py --write-archive) and the Python wheels it lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .carry/wheels
# rewrite the archive when the trimming rules (native/build.py) changed since it was written
[ .carry/llama-src.tar.xz -nt native/build.py ] || $PY native/build.py --write-archive .carry/llama-src.tar.xz
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .carry/wheels \
    gguf==0.19.0 diskcache==5.6.3
du -sh .carry
