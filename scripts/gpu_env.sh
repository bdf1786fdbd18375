# Sourced first by every scripts/gpu_*.sh driver on the lent GPU machine (no network): the clone's root as
# the working folder, $OUT for results, the carried Python wheels (.carry/wheels, scripts/prepare_carry*.sh)
# installed into /tmp/site, PYTHONPATH, the engine cache in /root, and the GPU's name in $OUT/gpu.txt.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/kvtuner-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KVTUNER_EDGE_CACHE=/root/kvtuner-cache
SITE=/tmp/site; mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .carry/wheels/*.whl 2>/dev/null
export PYTHONPATH=$SITE:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
