#!/usr/bin/env python3
"""Each KV cache format on the engine: storage bits and mean KLD against the f16 cache (wikitext-2 test).

For every type it measures the type as the V cache with K at q8_0, as the K cache with V at q8_0,
and as both, beside the engine's floor, all in one run (same tokens, same f16 reference). Prints a
table, writes formats.json and formats.png (KLD vs storage bits) to --out.

  python scripts/bench_formats.py [--model smollm2-135m] [--tokens 2048] [--ctx 1024] [--gpu-layers 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvtuner_edge import types as T  # noqa: E402
from kvtuner_edge.config import CacheConfig  # noqa: E402
from kvtuner_edge.evaluate import evaluate_many, shared_text  # noqa: E402
from kvtuner_edge.gguf_io import model_info  # noqa: E402
from kvtuner_edge.tune import text_tokens  # noqa: E402

DEFAULT_TYPES = "q8_0,q5_1,q5_0,q4_1,q4_0,iq4_nl,q3_kv,q2_kv,q2_0"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="registry name or a GGUF path")
    ap.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated ggml type names")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--gpu-layers", type=int, default=0, help="n_gpu_layers (99: all on the GPU)")
    ap.add_argument("--modes", default="v,k,kv", help="v: type as V with K q8_0; k: as K with V q8_0; kv: both")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()

    src = shared_text()
    if src is None:
        sys.exit("../shared/data/wikitext-2/test.txt is absent: this benchmark scores on wikitext-2 test")
    if args.model.endswith(".gguf"):
        path = Path(args.model)
    else:
        from kvtuner_edge.models import fetch
        path = fetch(args.model, progress=lambda m: None)
    info = model_info(path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",")]
    tests = {}
    for t in types:
        for mode in modes:
            k, v = {"v": ("q8_0", t), "k": (t, "q8_0"), "kv": (t, t)}[mode]
            tests[f"{mode}:{t}"] = (CacheConfig.uniform(info.n_layer, k, v), None, None)
    toks = text_tokens(path, src, args.tokens)
    t0 = time.time()
    res = evaluate_many(path, toks, tests, ctx=args.ctx, n_gpu_layers=args.gpu_layers)
    wall = time.time() - t0
    floor = next(iter(res.values()))["floor_kld"]

    def bits(t):
        try:
            return T.get(t).storage_bits
        except ValueError:   # a ggml type outside our catalogue (q2_0): from the engine's allocation
            return None

    rows = []
    for name, r in res.items():
        mode, t = name.split(":")
        rows.append({"mode": mode, "type": t, "type_storage_bits": bits(t) or r["bits_storage"],
                     "bits_storage": r["bits_storage"], "mean_kld": r["mean_kld"], "p99_kld": r["p99_kld"],
                     "top1": r["top1"], "ppl": r["ppl"], "cache_bytes": r["cache_bytes"]})
    doc = {"model": str(path), "eval": f"wikitext-2 test, {len(toks)} tokens, ctx {args.ctx}",
           "n_gpu_layers": args.gpu_layers, "floor_kld": floor, "ppl_f16": next(iter(res.values()))["ppl_base"],
           "wall_s": round(wall, 1), "rows": rows}
    (out / "formats.json").write_text(json.dumps(doc, indent=1))

    print(f"{path.name}: {doc['eval']}, n_gpu_layers {args.gpu_layers}; floor (f16 FA vs f32 no-FA) {floor:.5f}; "
          f"f16 PPL {doc['ppl_f16']:.3f}")
    print(f"{'type':8s} {'bits':>5s}  " + "  ".join(f"{m + ' KLD':>10s} {'top1':>6s}" for m in modes))
    for t in types:
        line = f"{t:8s} {rows[[r['type'] for r in rows].index(t)]['type_storage_bits']:5.2f}  "
        for m in modes:
            r = next(r for r in rows if r["type"] == t and r["mode"] == m)
            line += f"{r['mean_kld']:10.5f} {r['top1']:6.3f}  "
        print(line)
    print(f"(v: K q8_0 + V <type>; k: K <type> + V q8_0; kv: both) wall {wall:.0f} s -> {out / 'formats.json'}")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, marker in zip(modes, "os^"):
        pts = sorted((r["type_storage_bits"], r["mean_kld"], r["type"]) for r in rows if r["mode"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label={"v": "as V (K q8_0)", "k": "as K (V q8_0)",
                                                                         "kv": "as K and V"}[m])
        for x, y, t in pts:
            ax.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(floor, color="grey", ls="--", lw=0.8, label=f"engine floor {floor:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("storage bits per value of the type")
    ax.set_ylabel("mean KLD vs f16 cache")
    ax.set_title(f"{path.name}: KV formats ({doc['eval']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "formats.png", dpi=120)


if __name__ == "__main__":
    main()
