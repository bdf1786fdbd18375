"""Logits of a model under several caches, for comparing two engine settings bit for bit (issue 12: the
fused rotation + cache-write kernel must compute exactly what the unfused nodes compute).

    python scripts/gpu_fusion_check.py MODEL.gguf --out on.npz
    KVTUNER_CUDA_FUSE_ROT=0 python scripts/gpu_fusion_check.py MODEL.gguf --out off.npz
    python scripts/gpu_fusion_check.py --compare on.npz off.npz [on2.npz ...]

Per cache: the logits of every position of a --tokens prompt evaluated in n_batch chunks (prompt path,
many rows per kernel), then of --decode further tokens evaluated one at a time (the decode path). The
setting is read from the environment when the engine starts, so each setting is its own process.
--compare prints, per cache and path, whether the arrays are bit-identical to the first file's and the
largest difference; a third file with the first file's setting shows that the engine is deterministic.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtuner_edge import engine  # noqa: E402  (the engine before numpy)
from kvtuner_edge.config import CacheConfig  # noqa: E402
from kvtuner_edge.gguf_io import model_info  # noqa: E402

import numpy as np  # noqa: E402

CACHES = ["file", "q4_0", "q8_0", "q4_1/q3_kv", "q3_kv/q2_kv", "q5_1/q4_1", "q5_0/q4_0"]  # FA pairs the CUDA build has


def compute(a) -> int:
    info = model_info(a.model)
    rng = random.Random(1)
    toks = [rng.randrange(100, 30000) for _ in range(a.tokens + a.decode)]   # ids every vocabulary here has
    out = {}
    for c in a.caches.split(","):
        cfg = None
        if c != "file":
            k, _, v = c.partition("/")
            cfg = CacheConfig.uniform(info.n_layer, k, v or k)
        with engine.open_model(a.model, cfg, n_ctx=a.tokens + a.decode + 16, logits_all=True,
                               n_gpu_layers=999, n_batch=512, n_ubatch=512) as m:
            out[f"{c}|prompt"] = m.logits(toks[:a.tokens])
        with engine.open_model(a.model, cfg, n_ctx=a.tokens + a.decode + 16, logits_all=True,
                               n_gpu_layers=999, n_batch=1, n_ubatch=1) as m:
            out[f"{c}|decode"] = m.logits(toks[:a.decode])
        print(f"{c}: done", flush=True)
    np.savez(a.out, **{k.replace("/", "+"): v for k, v in out.items()})
    return 0


def compare(files) -> int:
    base = np.load(files[0])
    bad = 0
    for f in files[1:]:
        other = np.load(f)
        print(f"{files[0]} vs {f}:")
        for k in base.files:
            x, y = base[k], other[k]
            same = x.shape == y.shape and np.array_equal(x.view(np.uint32), y.view(np.uint32))
            diff = float(np.max(np.abs(x - y))) if x.shape == y.shape else float("nan")
            print(f"  {k.replace('+', '/'):24s} {'bit-identical' if same else 'DIFFERENT':14s} max |diff| {diff:.3g}"
                  f"  ({x.shape[0]} positions)")
            bad += not same
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--out")
    ap.add_argument("--caches", default=",".join(CACHES), help="'file' (the file's own types) or K/V type pairs")
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--compare", nargs="+")
    a = ap.parse_args()
    if a.compare:
        return compare(a.compare)
    if not a.model or not a.out:
        ap.error("MODEL and --out, or --compare FILES")
    return compute(a)


if __name__ == "__main__":
    sys.exit(main())
