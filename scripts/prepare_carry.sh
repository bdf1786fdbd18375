#!/usr/bin/env bash
# Fill .carry/ (git-ignored) with what the GPU machine cannot download: the trimmed llama.cpp
# source (python native/build.py --write-archive) and the Python wheels it lacks (its image has
# torch, scipy, matplotlib, click, tqdm; not gguf, pymoo or pymoo's own dependencies).
# With --model-halves: also split SmolLM2's GGUF (98 MB, over the 64 MiB carry limit) into
# .carry-a/ and .carry-b/ for two consecutive calls (scripts/gpu_tune.sh stage1 / stage2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .carry/wheels
# rewrite the archive when the trimming rules (native/build.py) changed since it was written
[ .carry/llama-src.tar.xz -nt native/build.py ] || $PY native/build.py --write-archive .carry/llama-src.tar.xz
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .carry/wheels \
    gguf==0.19.0 diskcache==5.6.3 pymoo==0.6.2 moocore autograd cma alive-progress about-time graphemeu \
    Deprecated dill cffi pycparser platformdirs
if [ "${1:-}" = "--model-halves" ]; then
  MODEL=$($PY -c "from kvtuner_edge.models import fetch; print(fetch('smollm2-135m', progress=lambda m: None))")
  mkdir -p .carry-a .carry-b
  head -c 50000000 "$MODEL" > .carry-a/model.part
  tail -c +50000001 "$MODEL" > .carry-b/model.part
  sha256sum "$MODEL" | cut -d' ' -f1 > .carry-b/model.sha256
  # wikitext-2 test for the GPU benchmarks (scripts/gpu_formats.sh), where ../shared is not carried
  [ -f ../shared/data/wikitext-2/test.txt ] && cp ../shared/data/wikitext-2/test.txt .carry-b/wikitext-2-test.txt
  [ -f ../shared/data/wikitext-2/valid.txt ] && cp ../shared/data/wikitext-2/valid.txt .carry-b/wikitext-2-valid.txt
fi
du -sh .carry .carry-a .carry-b 2>/dev/null || true
