#!/usr/bin/env python3
"""CUDA against CPU, token by token (n_ubatch 1: CUDA's vec flash-attention kernel reads the quantised
cache in place), for uniform caches of each type, on real text. Beside each CUDA-vs-CPU KLD it prints
the type's own KLD against the f16 cache: two correct implementations of a lossy cache differ by
rounding (CUDA converts Q to q8_1, the CPU to K's vec_dot type), a wrong kernel by far more.
    python scripts/gpu_decode_compare.py MODEL.gguf TEXT [--tokens 256] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvtuner_edge import engine  # noqa: E402  (the engine before numpy)
from kvtuner_edge.config import CacheConfig  # noqa: E402
from kvtuner_edge.evaluate import kld_per_token  # noqa: E402
from kvtuner_edge.gguf_io import model_info  # noqa: E402
from kvtuner_edge.tune import text_tokens  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--json", dest="out")
    a = ap.parse_args()
    n = model_info(a.model).n_layer
    toks = text_tokens(Path(a.model), Path(a.text), a.tokens)
    pairs = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0"), ("q8_0", "q3_kv"), ("q3_kv", "q8_0"),
             ("q8_0", "q2_kv"), ("q2_kv", "q8_0"), ("q3_kv", "q3_kv"), ("q4_0", "q2_kv")]
    logits = {}
    for k, v in pairs:
        for ngl in (99, 0):
            with engine.open_model(a.model, CacheConfig.uniform(n, k, v), n_ctx=a.tokens + 16, logits_all=True,
                                   n_gpu_layers=ngl, n_batch=1, n_ubatch=1) as m:
                logits[(k, v, ngl)] = m.logits(toks)
    rows = []
    print(f"{'K':6s} {'V':6s} {'CUDA vs CPU':>12s} {'top1':>6s} {'CPU vs f16':>11s} {'CUDA vs f16':>12s}")
    for k, v in pairs:
        d = kld_per_token(logits[(k, v, 0)], logits[(k, v, 99)])
        r = {"k": k, "v": v, "cuda_vs_cpu": float(d.mean()),
             "top1": float((logits[(k, v, 0)].argmax(-1) == logits[(k, v, 99)].argmax(-1)).mean()),
             "cpu_vs_f16": float(kld_per_token(logits[("f16", "f16", 0)], logits[(k, v, 0)]).mean()),
             "cuda_vs_f16": float(kld_per_token(logits[("f16", "f16", 99)], logits[(k, v, 99)]).mean())}
        rows.append(r)
        print(f"{k:6s} {v:6s} {r['cuda_vs_cpu']:12.5f} {r['top1']:6.3f} {r['cpu_vs_f16']:11.5f} {r['cuda_vs_f16']:12.5f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "tokens": len(toks), "decode_one_token_at_a_time": True,
                                           "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
