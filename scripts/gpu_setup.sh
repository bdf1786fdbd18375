# Sourced by the scripts/gpu_*.sh drivers on the lent GPU machine (no network): install the
# carried wheels, build (or reuse) the CUDA engine from the trimmed source archive, install it,
# and write the random-weight test model. Sets OUT, PYTHONPATH and MODEL.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/kvtuner-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KVTUNER_EDGE_CACHE=/root/kvtuner-cache
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 native/build.py --variant cuda --cuda-arch "${CUDA_ARCH:-90}" --source .carry/llama-src.tar.xz \
    --no-build-isolation --no-install --jobs "$(nproc)" --print-wheel > "$OUT/build.log" 2>&1 \
    || { tail -n 30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s on $(nproc) cores -> $(tail -n 1 "$OUT/build.log")" | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade "$(tail -n 1 "$OUT/build.log")"
MODEL=/root/smol-random.gguf
[ -f "$MODEL" ] || python3 -m kvtuner_edge.random_model --shape smollm2-135m -o "$MODEL"
