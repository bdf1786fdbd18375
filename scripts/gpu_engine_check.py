#!/usr/bin/env python3
"""Check the per-layer engine on a GPU: types, bytes, CUDA vs CPU logits, and the CUDA refusals.

Runs on a random-weight model of SmolLM2's shape (scripts/make_random_gguf.py) where no real
model can be carried: the checks are about the engine, not the model's quality.
    python scripts/gpu_engine_check.py MODEL.gguf --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from kvtuner_edge import CacheConfig, engine
from kvtuner_edge.errors import ConfigError
from kvtuner_edge.evaluate import kld_per_token
from kvtuner_edge.gguf_io import model_info


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--json", dest="out")
    a = ap.parse_args()
    info = model_info(a.model)
    n = info.n_layer
    res: dict = {"model": a.model, "random_weights": True, "gpu_offload": engine.has_gpu()}
    mixed = CacheConfig(tuple("q8_0" if (il < 3 or il >= n - 3) else "q4_0" for il in range(n)),
                        tuple("q5_1" if il % 2 else "q4_1" for il in range(n)))
    rng = np.random.default_rng(0)
    tokens = [1] + [int(t) for t in rng.integers(259, 4000, size=511)]

    def run(cfg=None, ngl=99, **kw):
        t0 = time.time()
        with engine.open_model(a.model, cfg, n_ctx=1024, logits_all=True, n_gpu_layers=ngl, **kw) as m:
            logits = m.logits(tokens)
            caches = m.layer_caches()
        return logits, caches, time.time() - t0

    gpu, caches, t_gpu = run(mixed)
    res["types_ok"] = [c.type_k for c in caches] == list(mixed.type_k) and [c.type_v for c in caches] == list(mixed.type_v)
    res["bytes_ok"] = all((c.bytes_k, c.bytes_v) == mixed.layer_bytes(info, c.layer, 1024) for c in caches)
    cpu, _, t_cpu = run(mixed, ngl=0)
    k = kld_per_token(cpu, gpu)
    res["cuda_vs_cpu_mixed"] = {"mean_kld": float(k.mean()), "max_kld": float(k.max()),
                                "top1": float((cpu.argmax(-1) == gpu.argmax(-1)).mean()),
                                "max_abs_logit_diff": float(np.abs(cpu - gpu).max()),
                                "seconds_gpu": t_gpu, "seconds_cpu": t_cpu}
    g8, _, _ = run(None, type_k="q8_0", type_v="q8_0")
    l8, _, _ = run(CacheConfig.uniform(n, "q8_0"))
    res["cuda_q8_per_layer_bit_identical"] = bool(np.array_equal(g8, l8))
    f16, _, _ = run(CacheConfig.uniform(n, "f16"))
    res["cuda_kld_vs_f16"] = {"mixed": float(kld_per_token(f16, gpu).mean()), "q8_0": float(kld_per_token(f16, l8).mean())}
    # kvtuner-edge's low-bit formats: prefill (tile/MMA kernels read K/V converted to f16) and
    # one-token decode (the vec kernel reads the quantised blocks in place), CUDA vs CPU
    low = CacheConfig(tuple(("q3_kv", "q8_0", "q2_kv", "q4_0")[il % 4] for il in range(n)),
                      tuple(("q2_kv", "q3_kv", "q3_kv", "q2_kv")[il % 4] for il in range(n)))
    lowres = {}
    for mode, ub in (("prefill", 512), ("decode", 1)):
        got = {}
        for ngl in (99, 0):
            with engine.open_model(a.model, low, n_ctx=1024, logits_all=True, n_gpu_layers=ngl,
                                   n_batch=ub, n_ubatch=ub) as m:
                got[ngl] = m.logits(tokens[:256] if ub == 1 else tokens)
                if ngl == 99:
                    lt = m.layer_types()
        kk = kld_per_token(got[0], got[99])
        lowres[mode] = {"mean_kld": float(kk.mean()), "max_kld": float(kk.max()),
                        "top1": float((got[0].argmax(-1) == got[99].argmax(-1)).mean()),
                        "types_ok": lt == (list(low.type_k), list(low.type_v))}
    res["cuda_vs_cpu_low_bit"] = lowres
    refusals = {}
    for name, spec in (("iq4_nl_k", "k=iq4_nl;v=q8_0"), ("iq4_nl_v_layer7", f"k=q8_0;v=q8_0*7,iq4_nl,q8_0*{n - 8}")):
        try:
            with engine.open_model(a.model, spec=spec, n_ctx=256, n_gpu_layers=99):
                refusals[name] = "NOT REFUSED"
        except ConfigError as e:
            refusals[name] = str(e)
    res["cuda_refusals"] = refusals
    # iq4_nl is fine where the cache stays on the CPU (offload_kqv off)
    with engine.open_model(a.model, spec="k=iq4_nl;v=q8_0", n_ctx=256, n_gpu_layers=99, offload_kqv=False) as m:
        res["iq4_nl_with_cpu_kv"] = m.layer_types()[0][0]
    ok = (res["types_ok"] and res["bytes_ok"] and res["cuda_q8_per_layer_bit_identical"]
          and all("NOT REFUSED" not in v for v in refusals.values()) and res["cuda_vs_cpu_mixed"]["top1"] > 0.9
          and all(r["types_ok"] and r["top1"] > 0.9 for r in lowres.values()))
    res["ok"] = bool(ok)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
