"""Host and GPU time of one decode step at one sequence (issue 12's fixed per-layer cost): for each
cache of the bench (the file's own, f16, q8_0, q4_0), with the Hadamard rotation on and off
(LLAMA_ATTN_ROT_DISABLE=1), depth 4096: llama_decode calls without a sync (the call then blocks on the
previous step), then calls each followed by llama_synchronize (the call's own time is the host part,
the sync the GPU part), then the bench's own loop of 32 steps.
    bash scripts/gpu_mmaq.sh py scripts/gpu_step_timing.py /root/llama3-8b-random.mix325.gguf
"""
import sys, os, time
sys.path.insert(0, os.getcwd())
from kvtuner_edge import engine, bench as B
from kvtuner_edge.gguf_io import model_info
path = sys.argv[1]
info = model_info(path)
cfgs = [c for c in B.resolve_configs(path, ["file"], info, None)]
variants = [("base", {}), ("rot_off", {"LLAMA_ATTN_ROT_DISABLE": "1"})]
with engine.BatchRunner(path, n_gpu_layers=999) as r:
    for c in cfgs:
        for vn, env in variants:
            if c.name == "f16" and vn != "base":
                continue
            os.environ.update(env)
            with r.context(1, 4352, **c.engine_args()) as ctx:
                for k in env: os.environ.pop(k)
                ctx.prefill(list(range(10, 4106)))
                pos = 4096
                ctx.decode_steps([5, 6, 7], pos, 4); pos += 4
                calls, syncs = [], []
                for step in range(48):
                    t0 = time.perf_counter()
                    ctx._decode([(100 + step, pos, 0, True)]); pos += 1
                    t1 = time.perf_counter()
                    if step >= 24:
                        ctx.sync()
                    t2 = time.perf_counter()
                    calls.append(t1 - t0); syncs.append(t2 - t1)
                t0 = time.perf_counter(); ctx.decode_steps([5, 6, 7], pos, 32); t_loop = time.perf_counter() - t0
                a = lambda xs: 1e3 * sum(xs) / len(xs)
                print(f"{c.name:>6} {vn:>8}: no-sync loop: decode call {a(calls[:24]):.3f} ms; "
                      f"synced: call {a(calls[24:]):.3f} + sync {a(syncs[24:]):.3f} ms; bench loop {1e3 * t_loop / 32:.3f} ms/step", flush=True)
