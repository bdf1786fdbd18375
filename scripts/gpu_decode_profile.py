"""Where a decode step's time goes, per cache configuration (issue 12: the fixed per-layer cost of a
quantized cache at one sequence).

Runs the bench's own contexts (kvtuner_edge.engine.BatchRunner) on a GGUF, prefills `--depth` tokens,
then times `--steps` decode steps without a profiler (wall ms per step) and the same number under
torch.profiler, whose CUPTI tracing sees every kernel of the process, llama.cpp's included (CUDA graph
nodes too). Per configuration and environment variant it prints: wall ms per step, kernels per step,
the sum of kernel time, the GPU's busy span, and the kernels grouped by role (attention, rotation,
cache writes, weights, ...), with the difference to f16 in the same run.

    python scripts/gpu_decode_profile.py MODEL.gguf --configs f16,q8_0,q4_0,file --batch 1,16 \
        --depth 4096 --variant rot_off:LLAMA_ATTN_ROT_DISABLE=1 --out prof.json

Needs a GPU and torch; kernel names are grouped by substrings (GROUPS), the rest listed by name.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
from collections import defaultdict
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = [   # (group, substrings of the kernel name), first match wins
    ("attention", ("flash_attn", "fattn")),
    ("rotation", ("fwht",)),
    ("cache write", ("set_rows", "k_set_rows", "quantize_f32", "cpy_")),
    ("rope", ("rope",)),
    ("weights", ("mul_mat", "gemv", "gemm", "mmq", "mmvq", "mmvf", "cutlass", "sm90_xmma", "cublas")),
    ("norm", ("rms_norm", "norm_f32")),
    ("elementwise", ("k_bin_bcast", "add", "mul", "scale", "unary", "silu", "swiglu", "glu")),
    ("softmax/argmax", ("soft_max", "argmax", "top_k")),
    ("copy", ("memcpy", "memset", "convert", "copy")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for g, subs in GROUPS:
        if any(s in low for s in subs):
            return g
    return "other"


def parse_trace(path: Path, n_steps: int) -> dict:
    """Kernel events of a chrome trace written by torch.profiler: totals per step."""
    ev = json.loads(path.read_text()).get("traceEvents", [])
    ker = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not ker:
        return {"kernels_per_step": 0}
    ker.sort(key=lambda e: e["ts"])
    busy = 0.0
    end = -1e30
    start0 = ker[0]["ts"]
    for e in ker:   # union of intervals: the GPU's busy time
        s, d = e["ts"], e.get("dur", 0)
        if s >= end:
            busy += d
            end = s + d
        elif s + d > end:
            busy += s + d - end
            end = s + d
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    by_group: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in ker:
        n = e.get("name", "?")
        by_name[n][0] += 1
        by_name[n][1] += e.get("dur", 0)
        g = by_group[group_of(n) if e["cat"] == "kernel" else "copy"]
        g[0] += 1
        g[1] += e.get("dur", 0)
    per = float(n_steps)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:14]
    return {"kernels_per_step": len(ker) / per,
            "kernel_us_per_step": sum(e.get("dur", 0) for e in ker) / per,
            "busy_us_per_step": busy / per,
            "span_us_per_step": (ker[-1]["ts"] + ker[-1].get("dur", 0) - start0) / per,
            "groups": {g: {"n": v[0] / per, "us": v[1] / per} for g, v in sorted(by_group.items(), key=lambda kv: -kv[1][1])},
            "top": [{"name": n[:120], "n": v[0] / per, "us": v[1] / per} for n, v in top]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--configs", default="f16,q8_0,q4_0,file")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:VAR=VAL[,VAR=VAL] an environment variant run for every quantized config")
    ap.add_argument("--out", default="decode_profile.json")
    ap.add_argument("--trace-dir", default=None, help="keep the gzipped chrome traces here")
    a = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kvtuner_edge import bench as B
    from kvtuner_edge import engine
    from kvtuner_edge.gguf_io import model_info

    if torch.cuda.is_available():
        torch.cuda.init()
    path = Path(a.model)
    info = model_info(path)
    cfgs = B.resolve_configs(path, [c for c in a.configs.split(",") if c and c not in B.BASELINES], info, None)
    wanted = set(a.configs.split(","))
    cfgs = [c for c in cfgs if c.name in wanted or (c.config is not None and "file" in wanted)]
    variants = [("base", {})]
    for v in a.variant:
        name, _, assigns = v.partition(":")
        variants.append((name, dict(kv.split("=", 1) for kv in assigns.split(",") if kv)))
    batches = [int(b) for b in a.batch.split(",")]
    rng = random.Random(0)
    tdir = Path(a.trace_dir) if a.trace_dir else None
    if tdir:
        tdir.mkdir(parents=True, exist_ok=True)
    rows = []
    with engine.BatchRunner(path, n_gpu_layers=999) as runner:
        tokens = [rng.randrange(runner.n_vocab) for _ in range(a.depth + 8)]
        for nseq in batches:
            for c in cfgs:
                for vname, env in variants:
                    if vname != "base" and c.name == "f16":
                        continue
                    with mock.patch.dict(os.environ, env):   # read by the engine when the context starts
                        n_ctx_seq = B._pad(a.depth + 3 * a.steps + 8)
                        with runner.context(nseq, n_ctx_seq, **c.engine_args()) as ctx:
                            ctx.prefill(tokens[:a.depth])
                            ctx.share_prefix(a.depth, dummy_token=tokens[a.depth])
                            st = [rng.randrange(runner.n_vocab) for _ in range(max(nseq, 8))]
                            pos = a.depth
                            ctx.decode_steps(st, pos, 3)
                            pos += 3
                            t = ctx.decode_steps(st, pos, a.steps)
                            pos += a.steps
                            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                                tp = ctx.decode_steps(st, pos, a.steps)
                            tr = Path(f"/tmp/trace_{c.name}_{vname}_{nseq}.json")
                            prof.export_chrome_trace(str(tr))
                    r = {"config": c.name, "variant": vname, "env": env, "batch": nseq, "depth": a.depth,
                         "wall_ms_per_step": 1000 * t / a.steps, "wall_ms_per_step_profiled": 1000 * tp / a.steps}
                    r.update(parse_trace(tr, a.steps))
                    if tdir:
                        with gzip.open(tdir / (tr.name + ".gz"), "wt") as f:
                            f.write(tr.read_text())
                    tr.unlink()
                    rows.append(r)
                    print(f"{c.name:>8} {vname:>10} x{nseq:<3} wall {r['wall_ms_per_step']:7.3f} ms "
                          f"kernels {r.get('kernels_per_step', 0):6.0f} sum {r.get('kernel_us_per_step', 0) / 1e3:7.3f} ms "
                          f"busy {r.get('busy_us_per_step', 0) / 1e3:7.3f} ms", flush=True)
    Path(a.out).write_text(json.dumps({"model": path.name, "rows": rows}, indent=1))
    # the table: every group, the difference to f16 at the same batch
    print()
    for nseq in batches:
        base = next((r for r in rows if r["config"] == "f16" and r["batch"] == nseq), None)
        groups = sorted({g for r in rows for g in r.get("groups", {})})
        print(f"## {nseq} sequence(s), depth {a.depth}: us per decode step (kernels per step)")
        print(f"{'config':>16} {'wall':>8} " + " ".join(f"{g[:12]:>16}" for g in groups))
        for r in rows:
            if r["batch"] != nseq:
                continue
            cells = []
            for g in groups:
                v = r.get("groups", {}).get(g, {"n": 0, "us": 0})
                cells.append(f"{v['us']:8.0f} ({v['n']:4.0f})")
            print(f"{r['config'] + ('/' + r['variant'] if r['variant'] != 'base' else ''):>16} "
                  f"{1000 * r['wall_ms_per_step']:8.0f} " + " ".join(f"{x:>16}" for x in cells))
        if base:
            print("top kernels of each config (us per step, launches per step):")
            for r in rows:
                if r["batch"] == nseq:
                    print(f"  {r['config']}/{r['variant']}: " + "; ".join(
                        f"{t['name'][:60]} {t['us']:.0f} ({t['n']:.0f})" for t in r.get("top", [])[:8]))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
