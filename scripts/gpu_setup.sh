# Sourced by the scripts/gpu_*.sh drivers that build their engine on the lent GPU machine: the shared
# environment (gpu_env.sh), then the CUDA engine built (or reused) from the trimmed source archive and
# installed, and the random-weight test model written. Sets OUT, PYTHONPATH and MODEL.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
t0=$(date +%s)
python3 native/build.py --variant cuda --cuda-arch "${CUDA_ARCH:-90}" --source .carry/llama-src.tar.xz \
    --no-build-isolation --no-install --jobs "$(nproc)" --print-wheel > "$OUT/build.log" 2>&1 \
    || { tail -n 30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s on $(nproc) cores -> $(tail -n 1 "$OUT/build.log")" | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade "$(tail -n 1 "$OUT/build.log")"
MODEL=/root/smol-random.gguf
[ -f "$MODEL" ] || python3 -m kvtuner_edge.random_model --shape smollm2-135m -o "$MODEL"
