"""One protocol for prompt and decode speed against f16 on a noisy machine (issues 12, 13): every cache
of the bench in one process, interleaved, several repeats in rotated order, each context built the way
`kvtuner-edge bench` builds it (prefill the depth, share_prefix with a dummy token), then every decode
call timed on its own (llama_decode blocks on the previous step, so call-to-call wall time is the step
time; `--step-tokens N`: N tokens per sequence and step, as a speculative step verifying a draft).
Prints, per repeat and cache, the prefill tokens/s, the bench's own decode figure (steps after
`--warmup`, `--gen` of them) and the steady state (median of steps 16..end; all steps when fewer), with
ratios to f16 of the same repeat, the first steps' timeline (a warm-up effect such as CUDA graph
capture shows as such), and the medians over repeats.

    bash scripts/gpu_mmaq.sh py scripts/step_protocol.py /root/llama3-8b-random.mix325.gguf \
        --reps 3 --steps 96 --variant q4_0/rot_off:LLAMA_ATTN_ROT_DISABLE=1 --out $OUT/protocol.json
    python scripts/step_protocol.py MODEL.kvtuner.gguf --configs file,q3_kv,q2_kv --depth 2048 \
        --reps 5 --steps 24          # on the CPU

No torch in this process (the profile script's steps, torch in the process, were 0.2-0.6 ms slower).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtuner_edge import bench as B, engine  # noqa: E402
from kvtuner_edge.gguf_io import model_info  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--configs", default="file", help="bench --configs (f16, q8_0, q4_0 come with 'file')")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--warmup", type=int, default=2, help="the bench's warm-up steps (its default)")
    ap.add_argument("--gen", type=int, default=32, help="the bench's timed steps (its default)")
    ap.add_argument("--step-tokens", type=int, default=1,
                    help="tokens per sequence and step (2-16: a speculative step verifying a draft)")
    ap.add_argument("--variant", action="append", default=[],
                    help="CONFIG/NAME:VAR=VALUE[,VAR=VALUE]: that config again with the environment set "
                         "while its context is created and runs")
    ap.add_argument("--out")
    a = ap.parse_args()

    info = model_info(a.model)
    cfgs = B.resolve_configs(a.model, a.configs.split(","), info, None)
    runs = [(c, c.name, {}) for c in cfgs]
    by = {c.name: c for c in cfgs}
    for v in a.variant:
        head, _, env_s = v.partition(":")
        cname, _, vname = head.partition("/")
        env = dict(kv.split("=", 1) for kv in env_s.split(",") if kv)
        runs.append((by[cname], f"{cname}/{vname}", env))
    n_ctx = B._pad(a.depth + a.steps*a.step_tokens + 8)
    rng = random.Random(0)
    res = {"model": a.model, "depth": a.depth, "seqs": a.seqs, "step_tokens": a.step_tokens, "steps": a.steps,
           "warmup": a.warmup, "gen": a.gen, "reps": []}
    with engine.BatchRunner(a.model, n_gpu_layers=999) as r:
        prompt = [rng.randrange(r.n_vocab) for _ in range(a.depth + 1)]
        toks = [rng.randrange(r.n_vocab) for _ in range(max(8, a.seqs))]
        for rep in range(a.reps):
            order = runs[rep % len(runs):] + runs[:rep % len(runs)]   # rotate the order each repeat
            row = {}
            for c, name, env in order:
                # the variant's environment while its context starts and runs (some switches are read
                # when the context starts, KVTUNER_CPU_FA_GROUP at every op)
                env_cm = mock.patch.dict(os.environ, env)
                env_cm.__enter__()
                ctx_cm = r.context(a.seqs, n_ctx, **c.engine_args())
                ctx = ctx_cm.__enter__()
                try:
                    t_pp = ctx.prefill(prompt[:a.depth])
                    ctx.share_prefix(a.depth, dummy_token=prompt[a.depth])
                    ctx.sync()
                    times = []
                    pos = a.depth
                    t_prev = time.perf_counter()
                    for step in range(a.steps):
                        ctx._decode([(toks[(s + step + j) % len(toks)], pos + j, s, True)
                                     for s in range(a.seqs) for j in range(a.step_tokens)])
                        pos += a.step_tokens
                        t = time.perf_counter()
                        times.append(t - t_prev)
                        t_prev = t
                    ctx.sync()
                    times[-1] += time.perf_counter() - t_prev
                finally:
                    ctx_cm.__exit__(None, None, None)
                    env_cm.__exit__(None, None, None)
                ms = [1e3 * t for t in times]
                row[name] = {"prefill_tps": a.depth / t_pp,
                             "bench_ms": statistics.fmean(ms[a.warmup:a.warmup + a.gen]),
                             "steady_ms": statistics.median(ms[16:] if len(ms) > 24 else ms[a.warmup:]),
                             "first_ms": ms[:8]}
            res["reps"].append(row)
            f16 = row.get("f16")
            print(f"repeat {rep + 1}: order {', '.join(n for _, n, _ in order)}")
            for _, name, _ in runs:
                p = row[name]
                rb = f16["bench_ms"] / p["bench_ms"] if f16 else float("nan")
                rs = f16["steady_ms"] / p["steady_ms"] if f16 else float("nan")
                rp = p["prefill_tps"] / f16["prefill_tps"] if f16 else float("nan")
                print(f"  {name:>16}  prefill {p['prefill_tps']:8.1f} t/s ({rp:5.3f}x f16)  bench-style {p['bench_ms']:7.3f} ms ({rb:5.3f}x f16)  steady median "
                      f"{p['steady_ms']:7.3f} ms ({rs:5.3f}x f16)  first steps "
                      + " ".join(f"{x:6.2f}" for x in p["first_ms"]), flush=True)
    print("\nmedian over repeats of x f16 (prefill / decode bench-style / decode steady):")
    res["median_vs_f16"] = {}
    for _, name, _ in runs:
        rp = statistics.median(rw[name]["prefill_tps"] / rw["f16"]["prefill_tps"] for rw in res["reps"])
        rb = statistics.median(rw["f16"]["bench_ms"] / rw[name]["bench_ms"] for rw in res["reps"])
        rs = statistics.median(rw["f16"]["steady_ms"] / rw[name]["steady_ms"] for rw in res["reps"])
        ms = statistics.median(rw[name]["steady_ms"] for rw in res["reps"])
        res["median_vs_f16"][name] = {"prefill": rp, "decode_bench": rb, "decode_steady": rs}
        print(f"  {name:>16}  {rp:5.3f}  {rb:5.3f}  {rs:5.3f}   steady {ms:.3f} ms")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
