"""The rotation's fusions bit for bit on the GPU machine (issue 12): logits with every fusion on against
KVTUNER_CUDA_FUSE_ROPE=0 (the RoPEs of Q and K as their own kernels, patch 0022 off) and against
KVTUNER_CUDA_FUSE_ROT=0 (every node of the rotation on its own), on the model given (the tuned 8B file:
NORMAL RoPE) and on two small random models of the 8B model's head size that it writes: qwen2 (NEOX RoPE,
Q/K/V biases) and llama with RoPE frequency factors (as Llama-3.1 files have).

    bash scripts/gpu_mmaq.sh py scripts/gpu_fusion_suite.py > $OUT/fusion.txt

Each setting is its own process (scripts/gpu_fusion_check.py); exit status 1 if any array differs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "gpu_fusion_check.py"
SETTINGS = {"fused": {}, "rope_off": {"KVTUNER_CUDA_FUSE_ROPE": "0"}, "rot_off": {"KVTUNER_CUDA_FUSE_ROT": "0"}}
SMALL_CACHES = "q4_0,q8_0,q4_1/q3_kv,q3_kv/q2_kv,q5_1/q4_1,q5_0/q4_0"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=os.environ.get("MODEL"), help="default: $MODEL")
    ap.add_argument("--caches", default="file,q4_0,q8_0", help="caches of the given model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fusion_suite"),
                    help="where the models and logits go (hundreds of MB; removed after each comparison)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    models = []
    if a.model:
        models.append(("given", Path(a.model), a.caches))
    for name, extra in (("qwen2-neox", ["--arch", "qwen2"]), ("llama-rope-freqs", ["--rope-freqs"])):
        path = a.work / f"random-tiny-head128-{name}.gguf"
        subprocess.run([sys.executable, "-m", "kvtuner_edge.random_model", "--shape", "tiny-head128", *extra,
                        "-o", str(path)], check=True, cwd=ROOT)
        models.append((name, path, SMALL_CACHES))
    bad = 0
    for name, path, caches in models:
        files = []
        for setting, env in SETTINGS.items():
            f = a.work / f"{name}.{setting}.npz"
            r = subprocess.run([sys.executable, str(CHECK), str(path), "--out", str(f), "--caches", caches],
                               env={**os.environ, **env}, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name} {setting}: rc {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-3000:]}", flush=True)
                return 2
            files.append(str(f))
        print(f"## {name} ({path.name}): fused against {', '.join(list(SETTINGS)[1:])}", flush=True)
        r = subprocess.run([sys.executable, str(CHECK), "--compare", *files], capture_output=True, text=True)
        print(r.stdout, r.stderr[-2000:], flush=True)
        bad += r.returncode != 0
        for f in files:
            Path(f).unlink()
        if path.parent == a.work:
            path.unlink()
    print("all bit-identical" if not bad else f"{bad} model(s) with differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
